"""`iadkit serve`: a small HTTP server and web page in front of trained models.

The web layer (`app.py`, FastAPI + uvicorn) talks to models only through
`backend.Predictor`, so the runtime behind it can change without touching the API or the
page. The server's packages are optional: ``pip install 'iadkit[serve]'``.

Typical use::

    iadkit serve fabric.iad --port 8000     # then open http://127.0.0.1:8000/

or from Python::

    from iadkit.serve import create_app, load_predictor
    app = create_app([load_predictor("fabric.iad")])
    app = create_app([load_predictor("fabric.onnx", runtime="onnx")])   # exported: no torch in the process
"""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec
from typing import Any

from iadkit.errors import IadkitError

EXTRA_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "multipart": "python-multipart"}


class MissingExtraError(IadkitError, ImportError):
    """The optional packages of `iadkit serve` are not installed."""


def require_extra() -> None:
    """Raise a one-line error naming the install command when a server package is missing."""
    missing = [package for module, package in EXTRA_MODULES.items() if find_spec(module) is None]
    if missing:
        raise MissingExtraError(f"iadkit serve needs {', '.join(missing)}: pip install 'iadkit[serve]'")


def __getattr__(name: str) -> Any:
    # create_app/Limits/run live in app.py, which imports FastAPI: checked on first use.
    if name in ("create_app", "Limits", "run"):
        require_extra()
        return getattr(import_module("iadkit.serve.app"), name)
    if name in ("load_predictor", "Predictor", "TorchPredictor", "OnnxPredictor"):
        return getattr(import_module("iadkit.serve.backend"), name)
    raise AttributeError(f"module 'iadkit.serve' has no attribute {name!r}")


__all__ = [
    "Limits",
    "MissingExtraError",
    "OnnxPredictor",
    "Predictor",
    "TorchPredictor",
    "create_app",
    "load_predictor",
    "require_extra",
    "run",
]
