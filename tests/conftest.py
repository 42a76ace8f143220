"""Shared test fixtures. Tests run on tiny images, on the CPU, with few threads."""

import os
import tempfile

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

# Exported ONNX feature graphs go to a per-run folder, not the user's ~/.cache/iadkit.
os.environ.setdefault("IADKIT_CACHE_DIR", tempfile.mkdtemp(prefix="iadkit-test-cache-"))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Nothing in iadkit may reach beyond this machine: fail loudly if anything tries.

    Loopback and Unix sockets stay allowed (a local Ray instance uses them)."""
    import socket

    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and not (str(host).startswith("127.") or host in ("localhost", "::1")):
            raise RuntimeError(f"network access to {address!r} attempted in a test")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """Factory: ``synthetic(category, **generate_params) -> DatasetSplit`` of the synthetic set.

    The method tests train on a few tiny generated categories; most of them ask for the same
    ones, so each distinct (category, parameters) is generated once per session, in its own
    folder (the generator regenerates a category whose parameters change, which would pull the
    files from under a split already handed out). ``seed=0, preset="small"`` unless given.
    """
    from iadkit.data import load_dataset
    from iadkit.data.synthetic import generate

    cache = {}

    def make(category: str, **params):
        params = {"seed": 0, "preset": "small", **params}
        key = (category, tuple(sorted(params.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"synth-{category}")
            generate(root, categories=[category], **params)
            cache[key] = load_dataset(f"synthetic:{root}", category=category)
        return cache[key]

    return make
