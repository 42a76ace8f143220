"""`iadkit.runtime`: run an exported model (``iadkit export``) with onnxruntime, numpy and Pillow only.

Importing this module does not import torch (a test checks it in a fresh interpreter), so a
line PC next to a camera needs ``pip install onnxruntime numpy pillow`` and this package's
pure-Python files, not the training stack. The results equal the torch model's: images are
decoded by the same reader (`iadkit.data.io`: 16-bit kept, grayscale replicated, alpha
dropped), resized and cropped by `iadkit.data.pixels` (torch's antialiased bilinear, to
~1e-7), and everything after that — normalisation, network, method head, map upsampling and
blur, image score — is the exported graph itself. Tests compare scores and maps with
`Model.predict` for every method that exports (tests/test_export.py).

Typical use::

    import iadkit.runtime
    model = iadkit.runtime.load("fabric.onnx")
    result = model.predict(["part1.png", "part2.png"])     # PredictionResult, as Model.predict
    result.scores, result.verdicts, result.maps
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from iadkit.data.pixels import PixelPreprocess
from iadkit.errors import ExportError, ImageReadError, InvalidInputError, InvalidParameterError
from iadkit.results import PredictionResult
from iadkit.tiling import Tiling, predict_tiled, resolve_tiling

FORMAT = "iadkit-onnx"
FORMAT_VERSION = 1
METADATA_KEY = "iadkit"
UNKNOWN = -1
DEFAULT_BATCH = 4


class ExportedModel:
    """An exported iadkit model loaded in ONNX Runtime (CPU).

    Parameters
    ----------
    path : str or Path
        The ``.onnx`` file written by ``iadkit export`` / ``Model.export_onnx``.
    threads : int, optional
        ONNX Runtime intra-op threads (default: ONNX Runtime's choice, the physical cores).
    batch_size : int
        Images per graph run. ONNX Runtime keeps a buffer for the largest batch it has run
        for the session's life, so small batches bound its memory (4 is as fast as 16 on CPU).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, batch_size: int = DEFAULT_BATCH) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(
                f"{self.path}: no such exported model (write one with `iadkit export MODEL.iad --out {self.path.name}`)"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidParameterError(f"batch_size must be a positive integer, got {batch_size!r}")
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ExportError("iadkit.runtime needs onnxruntime: pip install onnxruntime (or 'iadkit[onnx]')") from exc
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ExportError(
                f"{self.path}: ONNX Runtime cannot load this file ({type(exc).__name__}: {str(exc)[:200]})"
            ) from exc
        self.metadata = _read_metadata(self.path, self.session)
        meta = self.metadata
        self.preprocess = PixelPreprocess.from_dict(meta["preprocess"])
        self.outputs: list[str] = list(meta["outputs"])
        self.per_image = meta.get("batch") == 1
        self.batch_size = 1 if self.per_image else batch_size
        self.input_name = str(meta["input"]["name"])
        self.tiling: Tiling | None = Tiling.from_dict(meta["tiling"]) if meta.get("tiling") else None
        thr = meta.get("threshold")
        self._threshold: float | None = None if thr is None else float(thr["value"])
        self._threshold_rule: str | None = None if thr is None else str(thr.get("rule"))
        rng = meta["postprocess"].get("map_range")
        self.map_range: tuple[float, float] | None = None if rng is None else (float(rng[0]), float(rng[1]))
        self._check_graph()

    def _check_graph(self) -> None:
        inputs = self.session.get_inputs()
        names = [o.name for o in self.session.get_outputs()]
        if len(inputs) != 1 or inputs[0].name != self.input_name or names != self.outputs:
            raise ExportError(
                f"{self.path}: the graph's inputs/outputs do not match its iadkit metadata (an edited file?)"
            )
        shape = list(inputs[0].shape)
        if len(shape) != 4 or [shape[2], shape[3]] != list(self.preprocess.output_size):
            raise ExportError(
                f"{self.path}: the graph takes {shape} but its metadata says {list(self.preprocess.output_size)} pixels"
            )

    # -- description -----------------------------------------------------------------------
    @property
    def method(self) -> str:
        return str(self.metadata["method"])

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.metadata["params"])

    @property
    def iadkit_version(self) -> str | None:
        v = self.metadata.get("iadkit_version")
        return None if v is None else str(v)

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.preprocess.output_size
        return int(h), int(w)

    @property
    def draws_maps(self) -> bool:
        return "maps" in self.outputs

    @property
    def threshold(self) -> float | None:
        return self._threshold

    @property
    def threshold_rule(self) -> str | None:
        return self._threshold_rule

    def set_threshold(self, value: float) -> None:
        """Move the operating point in this process (the file is not rewritten)."""
        self._threshold, self._threshold_rule = _finite_threshold(value), "manual"

    def __repr__(self) -> str:
        thr = "unset" if self._threshold is None else f"{self._threshold:.4g}"
        return (
            f"ExportedModel(method={self.method!r}, input={self.input_size}, threshold={thr}, file={str(self.path)!r})"
        )

    # -- inference -------------------------------------------------------------------------
    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The graph on preprocessed pixels [B, 3, H, W] float32 in [0, 1] -> (scores [B], maps [B, H, W] or None),
        in runs of `batch_size` images."""
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.input_size:
            raise InvalidParameterError(
                f"pixels must be [B, 3, {self.input_size[0]}, {self.input_size[1]}], got {x.shape}"
            )
        scores, maps = [], []
        for s in range(0, len(x), self.batch_size):
            out = self.session.run(None, {self.input_name: x[s : s + self.batch_size]})
            scores.append(out[0])
            if len(out) > 1:
                maps.append(out[1])
        return (
            np.concatenate(scores) if scores else np.zeros(0, np.float32),
            np.concatenate(maps) if maps else None,
        )

    def score_images(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Decoded image arrays (any size) -> (scores, maps at the input size), no tiling."""
        if not images:
            return np.zeros(0, np.float32), None
        return self.run(self.preprocess.batch(images))

    def predict(
        self,
        inputs: Sequence[Any],
        *,
        batch_size: int = 16,
        threshold: float | None = None,
        keep_maps: bool = True,
        tile: int | None = None,
        overlap: float | None = None,
    ) -> PredictionResult:
        """Score images like `Model.predict`: paths, HxW(xC) arrays, or samples (anything with
        ``load_image()``). `threshold` overrides the stored one; `tile`/`overlap` as in
        `Model.predict` (None: the model's stored tiling; 0: none).

        Parameters
        ----------
        inputs : sequence
            Image files, arrays or samples.
        batch_size : int
            Images decoded at a time (the graph runs `self.batch_size` at a time).
        threshold : float, optional
            Verdict threshold for this call.
        keep_maps : bool
            Return the anomaly maps.
        tile, overlap : optional
            Tiling of images larger than the tile (see `iadkit.tiling`).
        """
        if isinstance(inputs, (str, os.PathLike, np.ndarray)):
            raise InvalidInputError("predict takes a sequence of images: wrap a single one in a list")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidParameterError(f"batch_size must be a positive integer, got {batch_size!r}")
        if threshold is not None:
            threshold = _finite_threshold(threshold)  # a NaN threshold would call everything good
        items = [_as_item(x, i) for i, x in enumerate(inputs)]
        tiling = resolve_tiling(self.tiling, tile, overlap)
        if tiling is not None and self.preprocess.crop_size is not None:
            raise InvalidParameterError("tiling needs a model without a centre crop (each tile must be seen whole)")
        scores: list[np.ndarray] = []
        maps: list[np.ndarray] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            if tiling is None:
                pixels = np.stack([self._pixels(item) for item in chunk])
                s, m = self.run(pixels)
                scores.append(s)
                if keep_maps and m is not None:
                    maps.extend(m)
                continue
            for item in chunk:
                image = _load(item)
                with _naming(item[0]):
                    self.preprocess.check_channels(image, item[0])
                    s1, m1 = predict_tiled(image, tiling, self.score_images, batch_size=self.batch_size)
                scores.append(np.array([s1], np.float32))
                if keep_maps and m1 is not None:
                    maps.append(m1)
        thr = threshold if threshold is not None else self._threshold
        return PredictionResult(
            paths=[item[0] for item in items],
            scores=np.concatenate(scores) if scores else np.zeros(0),
            maps=(maps if tiling is not None else np.stack(maps)) if maps else None,
            threshold=thr,
            labels=np.array([item[2] for item in items], dtype=np.int64),
        )

    def _pixels(self, item: tuple[str, Any, int]) -> np.ndarray:
        """One input -> 3xHxW [0, 1] pixels, with the model's checks (gray/colour kind, dtype,
        finite values); an error names the image, as `Model.predict` does."""
        image = _load(item)
        with _naming(item[0]):
            self.preprocess.check_channels(image, item[0])
            return self.preprocess(image)


def load(path: str | Path, *, threads: int | None = None, batch_size: int = DEFAULT_BATCH) -> ExportedModel:
    """Open an exported model (see `ExportedModel`)."""
    return ExportedModel(path, threads=threads, batch_size=batch_size)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The iadkit metadata of an exported file, read with the `onnx` package if it is installed
    (no session is built), else with ONNX Runtime."""
    path = Path(path)
    try:
        import onnx
    except ImportError:
        import onnxruntime as ort

        return _read_metadata(path, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    return _parse_metadata(path, props.get(METADATA_KEY))


def _read_metadata(path: Path, session: Any) -> dict[str, Any]:
    return _parse_metadata(path, session.get_modelmeta().custom_metadata_map.get(METADATA_KEY))


def _parse_metadata(path: Path, text: str | None) -> dict[str, Any]:
    if text is None:
        raise ExportError(f"{path}: an ONNX file without iadkit metadata; export models with `iadkit export`")
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise ExportError(f"{path}: unreadable iadkit metadata ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(
            f"{path}: not an iadkit export (format {meta.get('format') if isinstance(meta, dict) else None!r})"
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ExportError(
            f"{path}: export format {version} is newer than this runtime reads ({FORMAT_VERSION}); "
            f"upgrade iadkit (exported by iadkit {meta.get('iadkit_version')})"
        )
    missing = [k for k in ("method", "preprocess", "postprocess", "outputs", "input") if k not in meta]
    if missing:
        raise ExportError(f"{path}: malformed iadkit metadata, missing {', '.join(missing)}")
    thr = meta.get("threshold")
    if thr is not None and not math.isfinite(float(thr.get("value", float("nan")))):
        raise ExportError(f"{path}: the stored threshold is not a finite number; recalibrate and export again")
    return meta


class _naming:
    """Prefix an `ImageReadError` raised inside the block with the image's name (once)."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if isinstance(exc, ImageReadError) and not str(exc).startswith(f"{self.where}:"):
            raise ImageReadError(f"{self.where}: {exc}") from None


def _finite_threshold(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"threshold must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise InvalidParameterError(f"threshold must be a finite number, got {value!r}")
    return v


def _as_item(x: Any, i: int) -> tuple[str, Any, int]:
    """(path label, source, label) of one input."""
    if isinstance(x, np.ndarray):
        return f"array://{i}", x, UNKNOWN
    if isinstance(x, (str, os.PathLike)):
        return os.fspath(x), x, UNKNOWN
    if hasattr(x, "load_image") and hasattr(x, "path"):
        label = getattr(x, "label", None)
        return str(x.path), x, UNKNOWN if label is None else int(label)
    raise InvalidInputError(f"cannot predict on {type(x).__name__}: give a Sample, a path or an HxWxC array")


def _load(item: tuple[str, Any, int]) -> np.ndarray:
    source = item[1]
    if isinstance(source, np.ndarray):
        return source
    if isinstance(source, (str, os.PathLike)):
        from iadkit.data.io import read_image

        return read_image(source)
    return np.asarray(source.load_image())


__all__ = ["ExportedModel", "load", "read_metadata"]
