"""Deployment: a fitted model as one ONNX file (`export_onnx`), run without torch by `iadkit.runtime`.

Typical use::

    model = iadkit.Model.load("fabric.iad")
    model.export_onnx("fabric.onnx")            # or: iadkit export fabric.iad --out fabric.onnx

    import iadkit.runtime                       # onnxruntime + numpy + Pillow; no torch
    exported = iadkit.runtime.load("fabric.onnx")
    result = exported.predict(["part1.png", "part2.png"])   # scores, verdicts, maps

`export_onnx` (in `iadkit.export.onnx`) needs torch and onnx; it is imported on first use so
that this package stays importable where only the runtime is installed.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from iadkit.errors import ExportError

_LAZY = {
    "export_onnx": "iadkit.export.onnx",
    "check_exportable": "iadkit.export.onnx",
    "InferenceGraph": "iadkit.export.onnx",
    "PER_IMAGE_METHODS": "iadkit.export.onnx",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'iadkit.export' has no attribute {name!r}")


__all__ = ["PER_IMAGE_METHODS", "ExportError", "InferenceGraph", "check_exportable", "export_onnx"]
