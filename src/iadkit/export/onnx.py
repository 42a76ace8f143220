"""Export a fitted `iadkit.Model` as ONE ONNX file: the whole inference graph plus its facts.

What is in the graph, and what is not
-------------------------------------
The graph takes ``pixels`` [B, 3, H, W] float32 in [0, 1] — the image after the model's
resize and crop (`iadkit.data.pixels` does those in numpy, to the same numbers as torch) —
and returns ``scores`` [B] and, for methods that draw maps, ``maps`` [B, H, W]:

    normalisation ((x - mean) / std) -> backbone -> method head -> raw maps
    -> upsampling to the input size -> Gaussian blur (banded matrix products) -> image score

Resize and crop stay outside: images arrive in any size, a graph has one input size, and
ONNX Runtime's antialiased ``Resize`` does not compute what torch computes (see
`iadkit.data.pixels`). The input size is fixed (the model's); the batch is dynamic, except
for methods that loop over a batch's images in Python (listed in `PER_IMAGE_METHODS`): a
trace unrolls such a loop, so their graph takes one image and the runtime feeds images one
by one.

The file's metadata (``metadata_props``, key ``iadkit``, JSON) holds what a runtime needs
besides the graph: the preprocessing, the post-processing (sigma, heat-map range), the
threshold, the tiling, the method and its hyper-parameters, the backbone's weight hash, the
iadkit and torch versions, and the result of the export's self-check.

Self-check: after exporting, the graph is run by ONNX Runtime on seeded random pixels (a
batch of 3, the trace having seen 2) and compared with the torch model; a difference beyond
float tolerance (e.g. a loop the trace unrolled) makes the export fail with `ExportError`
instead of writing a file that scores differently.

Methods that do not export
--------------------------
* PatchCore with ``search`` = faiss ``ivf`` / ``hnsw`` / ``faiss_flat``: a faiss index is not a
  tensor program. The exact search (the paper's) exports: the memory bank becomes a graph
  constant and nearest neighbours a matrix product + min/top-k. Switch with
  ``model.detector.set_params(search="exact")`` (an inference setting: no refit).
* Every registered method whose predict is tensor code exports (tests/test_export.py runs
  them all); a new method that cannot gets `ExportError` naming the failing operation.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

import iadkit
from iadkit.errors import ExportError

if TYPE_CHECKING:
    from iadkit.model import Model

ONNX_OPSET = 18
FORMAT = "iadkit-onnx"
FORMAT_VERSION = 1
METADATA_KEY = "iadkit"
INPUT_NAME = "pixels"

# Methods whose predict loops over the images of a batch in Python: exported for one image.
PER_IMAGE_METHODS: dict[str, str] = {
    "spade": "SPADE searches each image's own gallery of retrieved training images in a per-image loop",
}
TRACE_BATCH = 2  # the batch the tracer sees (the self-check then runs 3)
CHECK_BATCH = 3


class InferenceGraph(nn.Module):
    """[0, 1] pixels -> (scores, maps): a model's normalisation, detector and post-processing.

    Parameters
    ----------
    model : Model
        A fitted model; its detector is used as it is (not copied).
    """

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.detector = model.detector
        self.postprocess = model.postprocess
        h, w = model.preprocess.output_size
        self.size = (int(h), int(w))
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(model.preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.preprocess.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (pixels - self.mean) / self.std  # as Preprocess.normalize
        pred = self.postprocess(self.detector.predict(x), self.size)
        assert pred.scores is not None
        scores = pred.scores.float()
        return (scores,) if pred.maps is None else (scores, pred.maps.float())


def check_exportable(model: Model) -> None:
    """Raise `ExportError` when `model` cannot be exported, saying why and what to do."""
    det = model.detector
    det.check_fitted()
    search = getattr(det, "search", "exact")
    if search != "exact":
        raise ExportError(
            f"{det.name} with search={search!r} cannot be exported: a faiss index is not a tensor program ONNX "
            "can hold. Use the exact search (the paper's; an inference setting, no refit needed): "
            "model.detector.set_params(search='exact'), then export again"
        )
    if det.uses_depth:
        raise ExportError(
            f"{det.name} reads depth / point maps besides the image; the exported graph takes images only"
        )
    if det.transductive:
        raise ExportError(
            f"{det.name} is transductive: each image is scored against the other images of its set, which a "
            "graph run batch by batch cannot see; predict with the torch model (Model.predict / iadkit predict)"
        )


def export_onnx(model: Model, path: str | Path, *, check: bool = True, opset: int = ONNX_OPSET) -> Path:
    """Write `model`'s whole inference graph and its metadata to one ONNX file.

    Parameters
    ----------
    model : Model
        A fitted model.
    path : str or Path
        The ``.onnx`` file to write (atomically).
    check : bool
        Run the exported graph with ONNX Runtime on random pixels and compare it with the
        torch model before writing (needs onnxruntime); a mismatch raises `ExportError`.
    opset : int
        ONNX opset version.

    Returns
    -------
    Path
        The written file. Load it with ``iadkit.runtime.load(path)``.
    """
    check_exportable(model)
    det = model.detector
    per_image = det.name in PER_IMAGE_METHODS
    h, w = (int(s) for s in model.preprocess.output_size)
    graph = InferenceGraph(model).eval()
    outputs = ["scores", "maps"] if det.draws_maps() else ["scores"]
    device = det.device
    was_training = det.training
    det.to("cpu").eval()
    try:
        data = _trace(graph, outputs, 1 if per_image else TRACE_BATCH, (h, w), per_image, opset)
        report = _self_check(model, graph, data, outputs, per_image) if check else None
    finally:
        det.to(device)
        det.train(was_training)
    data = _with_metadata(data, metadata(model, outputs=outputs, per_image=per_image, opset=opset, check=report))
    from iadkit.files import atomic_write_bytes

    return atomic_write_bytes(path, data)


def metadata(
    model: Model, *, outputs: list[str], per_image: bool, opset: int, check: dict[str, Any] | None
) -> dict[str, Any]:
    """The JSON stored under ``metadata_props["iadkit"]``."""
    from iadkit.methods.base import jsonable
    from iadkit.store import backbone_record

    det = model.detector
    h, w = (int(s) for s in model.preprocess.output_size)
    tiling = getattr(model, "tiling", None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "iadkit_version": iadkit.__version__,
        "torch_version": torch.__version__,
        "opset": opset,
        "method": det.name,
        "params": jsonable(det.get_params()),
        "preprocess": model.preprocess.to_dict(),
        "postprocess": model.postprocess.to_dict(),
        "threshold": model.threshold.to_dict() if model.threshold else None,
        "tiling": tiling.to_dict() if tiling is not None else None,
        "backbone": backbone_record(det),
        "info": model.info,
        "input": {
            "name": INPUT_NAME,
            "shape": [1 if per_image else None, 3, h, w],
            "pixels": "float32 in [0, 1] after the resize and crop of `preprocess`; normalised inside the graph",
        },
        "outputs": outputs,
        "batch": 1 if per_image else "dynamic",
        "per_image_reason": PER_IMAGE_METHODS.get(det.name),
        "self_check": check,
    }


def _trace(
    graph: InferenceGraph, outputs: list[str], batch: int, size: tuple[int, int], per_image: bool, opset: int
) -> bytes:
    dummy = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    dynamic = None if per_image else {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                (dummy,),
                buf,  # type: ignore[arg-type]  # the exporter writes to file objects too
                input_names=[INPUT_NAME],
                output_names=outputs,
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except ExportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"{graph.detector.name} cannot be exported to ONNX: {type(exc).__name__}: {first[:300]}"
        ) from exc
    return buf.getvalue()


def _session(data: bytes) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - onnxruntime is in the onnx extra
        raise ExportError(
            "checking the exported graph needs onnxruntime: pip install 'iadkit[onnx]' (or check=False)"
        ) from exc
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _self_check(
    model: Model, graph: InferenceGraph, data: bytes, outputs: list[str], per_image: bool
) -> dict[str, Any]:
    """Run the exported graph on seeded random pixels and compare with torch; raise on a mismatch."""
    h, w = (int(s) for s in model.preprocess.output_size)
    pixels = torch.rand(CHECK_BATCH, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = [t.numpy() for t in graph(pixels)]
    sess = _session(data)
    arr = pixels.numpy()
    if per_image:
        parts = [sess.run(None, {INPUT_NAME: arr[i : i + 1]}) for i in range(len(arr))]
        got = [np.concatenate([p[j] for p in parts]) for j in range(len(outputs))]
    else:
        got = sess.run(None, {INPUT_NAME: arr})
    report: dict[str, Any] = {"batch": CHECK_BATCH, "inputs": "seeded uniform random pixels"}
    for name, e, g in zip(outputs, expected, got):
        if e.shape != g.shape:
            raise ExportError(
                f"the exported {model.method} graph returns {name} of shape {g.shape} for a batch of {CHECK_BATCH}, "
                f"the model {e.shape}: the graph depends on the batch size it was traced with (an iadkit bug; please report it)"
            )
        scale = max(1.0, float(np.abs(e).max())) if e.size else 1.0
        diff = float(np.abs(e.astype(np.float64) - g).max()) if e.size else 0.0
        report[f"{name}_max_abs_diff"] = diff
        report[f"{name}_scale"] = scale
        if not np.isfinite(diff) or diff > 1e-3 * scale:
            raise ExportError(
                f"the exported {model.method} graph disagrees with the model on {name}: largest difference {diff:.3g} "
                f"(values up to {scale:.3g}); the file was not written (an iadkit bug; please report it)"
            )
    return report


def _with_metadata(data: bytes, meta: dict[str, Any]) -> bytes:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is in the onnx extra
        raise ExportError("exporting needs the onnx package: pip install 'iadkit[onnx]'") from exc

    proto = onnx.load_from_string(data)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, allow_nan=False)
    proto.producer_name = "iadkit"
    proto.producer_version = iadkit.__version__
    proto.doc_string = (
        f"iadkit {meta['method']} model: pixels [B, 3, {meta['input']['shape'][2]}, {meta['input']['shape'][3]}] "
        "in [0, 1] -> scores [B]" + (", maps [B, H, W]" if "maps" in meta["outputs"] else "")
    )
    return proto.SerializeToString()


__all__ = [
    "FORMAT",
    "METADATA_KEY",
    "PER_IMAGE_METHODS",
    "InferenceGraph",
    "check_exportable",
    "export_onnx",
    "metadata",
]
