"""The server's only door to a trained model: everything `app.py` needs, behind `Predictor`.

Why a layer of its own: the web layer must not care whether a model runs in torch
(`iadkit.Model`, `TorchPredictor`) or in the torch-free exported runtime (`iadkit.runtime`,
`OnnxPredictor`: ``iadkit serve model.onnx --runtime onnx``, a server process that never
imports torch), nor where the model keeps its heat-map range. Every access to `iadkit.model`,
`iadkit.store`, `iadkit.runtime` and `iadkit.viz` from the server happens in this file.

A `Predictor` takes decoded images (HxWxC arrays, as `iadkit.data.io.read_image` returns
them) and gives per image: the score, the verdict at the threshold in force when the call
started, and two PNGs at the model's input geometry (the image as the model saw it, and the
same image with the heat map blended over it). The page puts one over the other with an
opacity slider, so both must have the same size and framing. A model that tiles (fitted with
tiles, or served with ``--tile``) cuts images larger than a tile into tiles and shows them at
full resolution, with the stitched map.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from iadkit.errors import IadkitError, ModelFileError

if TYPE_CHECKING:  # the torch-free ONNX server must not import iadkit.model
    from iadkit.model import Model

RUNTIMES = ("torch", "onnx")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ImageResult:
    """One image's outcome. `anomalous` is None when the model has no threshold, and when
    the score is not a finite number: then `error` says so (NaN must never read as good)."""

    score: float
    anomalous: bool | None
    threshold: float | None
    image_png: bytes  # the image as the model saw it (resized/cropped), RGB
    overlay_png: bytes  # the same with the heat map blended over it
    error: str | None = None


@runtime_checkable
class Predictor(Protocol):
    """What the server needs from a model, whatever runs it."""

    name: str
    runtime: str

    @property
    def method(self) -> str: ...

    @property
    def model_version(self) -> str | None:
        """iadkit version that wrote the model file (None if unknown)."""

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model's input; maps and PNGs have this size."""

    @property
    def threshold(self) -> float | None: ...

    @property
    def threshold_rule(self) -> str | None: ...

    def set_threshold(self, value: float) -> None: ...

    @property
    def map_range(self) -> tuple[float, float] | None: ...

    def predict(self, images: Sequence[np.ndarray], names: Sequence[str] | None = None) -> list[ImageResult]:
        """Score decoded images; `names` (e.g. the uploaded file names) name them in errors."""


class TorchPredictor:
    """`Predictor` over an in-process `iadkit.Model`.

    Predictions are serialised by a lock: the server answers requests on a thread pool, and
    running several forward passes at once would multiply peak memory without making a
    CPU-bound model faster (torch already uses every core inside one pass). Decoding and
    PNG encoding happen outside the lock.

    Parameters
    ----------
    model
        A fitted `iadkit.Model`.
    name
        The name the model is served under (URL-safe: letters, digits, ``_ . -``).
    model_version
        iadkit version recorded in the model file, if known.
    batch_size
        Images per forward pass.
    """

    runtime = "torch"

    def __init__(self, model: Model, name: str, *, model_version: str | None = None, batch_size: int = 8) -> None:
        self.model = model
        self.name = check_name(name)
        self._model_version = model_version
        self.batch_size = int(batch_size)
        self._lock = threading.Lock()

    # -- description ----------------------------------------------------------------------
    @property
    def method(self) -> str:
        return str(self.model.method)

    @property
    def model_version(self) -> str | None:
        return self._model_version

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.model.preprocess.output_size
        return int(h), int(w)

    @property
    def threshold(self) -> float | None:
        thr = self.model.threshold
        return None if thr is None else float(thr.value)

    @property
    def threshold_rule(self) -> str | None:
        thr = self.model.threshold
        return None if thr is None else str(thr.rule)

    def set_threshold(self, value: float) -> None:
        """Move the operating point for this process only (the model file is not rewritten)."""
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"threshold must be a finite number, got {value}")
        self.model.set_threshold(value)

    @property
    def map_range(self) -> tuple[float, float] | None:
        rng = getattr(self.model, "map_range", None)
        return None if rng is None else (float(rng[0]), float(rng[1]))

    # -- inference ------------------------------------------------------------------------
    def predict(self, images: Sequence[np.ndarray], names: Sequence[str] | None = None) -> list[ImageResult]:
        if not images:
            return []
        from iadkit.types import Sample

        threshold = self.threshold  # read once: a concurrent PUT cannot split one request
        labels = list(names) if names is not None else [f"image {i + 1}" for i in range(len(images))]
        inputs = [Sample(path=name, image=image) for name, image in zip(labels, images)]
        with self._lock:
            result = self.model.predict(inputs, batch_size=self.batch_size, threshold=threshold, keep_maps=True)
        return _image_results(self.model, self.name, self.method, images, result, threshold)


class OnnxPredictor:
    """`Predictor` over an exported model in ONNX Runtime (`iadkit.runtime.ExportedModel`).

    The process serving it imports no torch. Predictions are serialised by a lock, as in
    `TorchPredictor` (ONNX Runtime already uses every core inside one run).

    Parameters
    ----------
    model
        An `iadkit.runtime.ExportedModel`.
    name
        The name the model is served under (URL-safe: letters, digits, ``_ . -``).
    batch_size
        Images decoded and scored per call of the runtime.
    """

    runtime = "onnx"

    def __init__(self, model: Any, name: str, *, batch_size: int = 8) -> None:
        self.model = model
        self.name = check_name(name)
        self.batch_size = int(batch_size)
        self._lock = threading.Lock()

    @property
    def method(self) -> str:
        return str(self.model.method)

    @property
    def model_version(self) -> str | None:
        return self.model.iadkit_version

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.model.input_size
        return int(h), int(w)

    @property
    def threshold(self) -> float | None:
        return self.model.threshold

    @property
    def threshold_rule(self) -> str | None:
        return self.model.threshold_rule

    def set_threshold(self, value: float) -> None:
        """Move the operating point for this process only (the exported file is not rewritten)."""
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"threshold must be a finite number, got {value}")
        self.model.set_threshold(value)

    @property
    def map_range(self) -> tuple[float, float] | None:
        rng = self.model.map_range
        return None if rng is None else (float(rng[0]), float(rng[1]))

    def predict(self, images: Sequence[np.ndarray], names: Sequence[str] | None = None) -> list[ImageResult]:
        if not images:
            return []
        threshold = self.threshold  # read once: a concurrent PUT cannot split one request
        labels = list(names) if names is not None else [f"image {i + 1}" for i in range(len(images))]
        # named inputs, so that an error names the uploaded file (the runtime takes anything
        # with a path and load_image(), without importing torch for iadkit.types.Sample)
        inputs = [_NamedImage(name, image) for name, image in zip(labels, images)]
        with self._lock:
            result = self.model.predict(inputs, batch_size=self.batch_size, threshold=threshold, keep_maps=True)
        return _image_results(self.model, self.name, self.method, images, result, threshold)


@dataclass(frozen=True)
class _NamedImage:
    """A decoded upload under its file name (what `iadkit.runtime` accepts as a sample)."""

    path: str
    image: np.ndarray
    label: None = None

    def load_image(self) -> np.ndarray:
        return self.image


def _image_results(
    model: Any, name: str, method: str, images: Sequence[np.ndarray], result: Any, threshold: float | None
) -> list[ImageResult]:
    scores = np.asarray(result.scores, dtype=np.float64)
    maps = result.maps
    if maps is None:
        raise IadkitError(f"model {name!r} ({method}) gives no anomaly map; the server needs one to draw")
    from iadkit.viz import model_overlay, model_view

    out = []
    for image, amap, score in zip(images, maps, scores):
        finite = math.isfinite(float(score))
        out.append(
            ImageResult(
                score=float(score),
                anomalous=None if threshold is None or not finite else bool(score > threshold),
                threshold=threshold,
                error=None if finite else f"the model scored this image {float(score)}: not a number it can judge",
                image_png=_png(_to_uint8(model_view(model, image))),
                # the model's own colour range (iadkit.viz: one rule everywhere)
                overlay_png=model_overlay(model, image, amap),
            )
        )
    return out


def load_predictor(
    path: str | Path,
    name: str | None = None,
    *,
    runtime: str = "torch",
    device: str = "cpu",
    tile: int | None = None,
    overlap: float | None = None,
) -> Predictor:
    """Open a model file given on the command line (never a path from a request).

    Parameters
    ----------
    path
        Model file written by `iadkit fit` / `Model.save` (``runtime="torch"``), or an ONNX
        file written by `iadkit export` (``runtime="onnx"``).
    name
        Name to serve it under; the file name without its suffix by default.
    runtime
        ``torch`` (the model in this process) or ``onnx`` (the exported graph in ONNX Runtime;
        torch is not imported).
    device
        Torch device for ``runtime="torch"``.
    tile, overlap
        Tiling of images larger than `tile` pixels (see `iadkit.tiling`); None keeps the
        model's own (a model fitted with tiles), 0 turns it off.
    """
    path = Path(path)
    name = check_name(name if name is not None else path.stem)
    if runtime not in RUNTIMES:
        raise IadkitError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if not path.is_file():
        what = (
            "the .onnx file written by `iadkit export`"
            if runtime == "onnx"
            else "the .iad file written by `iadkit fit`"
        )
        raise ModelFileError(f"{path}: no such model file (give {what})")
    from iadkit.tiling import resolve_tiling

    if runtime == "onnx":
        if _is_onnx(path) is False:
            raise ModelFileError(
                f"{path}: not an exported model; --runtime onnx serves ONNX files: "
                f"iadkit export {path} --out {path.with_suffix('.onnx').name}, then serve that file"
            )
        from iadkit.runtime import ExportedModel

        exported = ExportedModel(path)
        exported.tiling = resolve_tiling(exported.tiling, tile, overlap)
        _check_tiling(exported)
        return OnnxPredictor(exported, name)
    if _is_onnx(path) is True:
        raise ModelFileError(f"{path}: an exported ONNX model; serve it with --runtime onnx")
    from iadkit.model import Model
    from iadkit.store import read_manifest

    version = read_manifest(path).get("iadkit_version")
    model = Model.load(path, device=device)
    model.tiling = resolve_tiling(model.tiling, tile, overlap)
    _check_tiling(model)
    return TorchPredictor(model, name, model_version=None if version is None else str(version))


def _is_onnx(path: Path) -> bool | None:
    """True for an ONNX file (a protobuf ModelProto starts with field 1, ir_version: byte 0x08),
    False for an iadkit model file (safetensors: an 8-byte header length, then '{'), None
    for anything else (the loader then says what is wrong)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000:
        return False
    if head[:1] == b"\x08":
        return True
    return None


def _check_tiling(model: Any) -> None:
    tiling = getattr(model, "tiling", None)
    if tiling is not None and model.preprocess.crop_size is not None:
        raise IadkitError("--tile needs a model without a centre crop (each tile must be seen whole)")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise IadkitError(
            f"model name {name!r} is not usable in a URL: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit (give NAME=PATH to choose one)"
        )
    return name


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def _png(rgb8: np.ndarray) -> bytes:
    from iadkit.viz import png_bytes

    return png_bytes(rgb8)
