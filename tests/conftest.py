"""Shared test fixtures. Tests run on tiny images, on the CPU, with few threads."""

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


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
