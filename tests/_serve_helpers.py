"""Shared by the server tests: a tiny fitted model and a server on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from iadkit.model import Model

SIZE = 64


def fit_tiny_patchcore(split) -> Model:
    """PatchCore at 64 px with a 10 % coreset, threshold and heat-map range from held-out good images."""
    torch.manual_seed(0)
    model = Model.create("patchcore", image_size=SIZE, coreset_ratio=0.1)
    return model.fit(split.train, calibration_fraction=0.2, progress=False)


@contextmanager
def running_server(app) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on 127.0.0.1:<free port>; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; no race between choosing and binding
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def copy_named(samples, folder: Path, prefix: str) -> list[Path]:
    """Copy sample images under distinct names (the synthetic set reuses 000.png per defect type)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, s in enumerate(samples):
        target = folder / f"{prefix}_{i:02d}{Path(s.path).suffix}"
        target.write_bytes(Path(s.path).read_bytes())
        out.append(target)
    return out
