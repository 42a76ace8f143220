"""Model files: one safetensors file whose header carries a JSON manifest.

Loading never executes code: safetensors holds raw tensors, the manifest is JSON, and the
method class is looked up by name in our registry. Frozen pretrained backbones are not
copied into the file; the manifest records their name and weight sha256, and loading
rebuilds them from the backbone registry and refuses a different weight file.

Manifest (JSON, key ``iadkit_manifest`` in the safetensors metadata), format 2::

    {"format": "iadkit-model", "format_version": 2, "iadkit_version": "0.2.0",
     "method": "patchcore", "params": {...hyper-parameters...},
     "preprocess": {...Preprocess.to_dict()...},
     "postprocess": {"sigma": 4.0, "reference_size": 224, "map_range": [lo, hi] | null},
     "threshold": {"value": ..., "rule": ..., "details": {...}} | null,
     "tiling": {"tile": 256, "overlap": 0.25} | null,   # fitted on tiles (optional key)
     "backbone": {"name": ..., "sha256": ...} | null,
     "tensors_sha256": "...",   # over every tensor's name, dtype, shape and bytes
     "info": {...training facts: n_train, dataset, category, saved...}}

The tensor checksum makes a corrupted or edited file (a flipped byte turning a weight into
NaN) an error at load time instead of silent wrong scores. Writes are atomic
(`iadkit.files`): a killed save never leaves a truncated model behind.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import iadkit
from iadkit.components.postprocess import Postprocess
from iadkit.data.transforms import Preprocess
from iadkit.errors import IadkitError, ModelFileError
from iadkit.files import atomic_write_bytes
from iadkit.thresholds import Threshold
from iadkit.tiling import Tiling

FORMAT = "iadkit-model"
FORMAT_VERSION = 2
MANIFEST_KEY = "iadkit_manifest"


def backbone_record(detector: torch.nn.Module) -> dict[str, Any] | None:
    """Name and weight sha256 of a detector's frozen backbone (None for methods without one)."""
    backbone = getattr(detector, "backbone_", None)
    if backbone is None:
        return None
    return {"name": getattr(backbone, "name", None), "sha256": getattr(backbone, "weights_sha256", None)}


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def manifest_of(model: iadkit.model.Model, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    _, config = model.detector.state()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "iadkit_version": iadkit.__version__,
        "method": config["method"],
        "params": config["params"],
        "preprocess": model.preprocess.to_dict(),
        "postprocess": model.postprocess.to_dict(),
        "threshold": model.threshold.to_dict() if model.threshold else None,
        "tiling": model.tiling.to_dict() if model.tiling is not None else None,
        "backbone": backbone_record(model.detector),
        "tensors_sha256": tensors_digest(tensors),
        "info": {**model.info, "saved": datetime.now(UTC).isoformat(timespec="seconds")},
    }


def save_model(model: iadkit.model.Model, path: str | Path) -> Path:
    model.detector.check_fitted()
    tensors, _ = model.detector.state()
    manifest = manifest_of(model, tensors)
    try:
        text = json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"model manifest is not JSON-serialisable: {exc}") from exc
    data = st_save(tensors, metadata={MANIFEST_KEY: text})
    return atomic_write_bytes(path, data)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest alone, without building the model (reads only the file header)."""
    path = Path(path)
    _check_exists(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path}: not an iadkit model file (too short)")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > 100_000_000:
            raise ModelFileError(f"{path}: not an iadkit model file (bad header)")
        header_bytes = f.read(n)
    try:
        header = json.loads(header_bytes)
        manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{path}: not an iadkit model file (no manifest: {exc})") from exc
    if not isinstance(manifest, dict):
        raise ModelFileError(f"{path}: not an iadkit model file (manifest is not an object)")
    _check_manifest(path, manifest)
    return manifest


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> iadkit.model.Model:
    from iadkit.methods.base import get_method
    from iadkit.model import Model

    path = Path(path)
    manifest = read_manifest(path)
    try:
        tensors = st_load(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as exc:
        raise ModelFileError(f"{path}: corrupt model file ({exc})") from exc
    if tensors_digest(tensors) != manifest["tensors_sha256"]:
        raise ModelFileError(
            f"{path}: the tensor data does not match the checksum in its manifest: the file was "
            "corrupted or edited; use an intact copy or refit the model"
        )
    try:
        cls = get_method(manifest["method"])
        detector = cls.from_state(tensors, {"method": manifest["method"], "params": manifest["params"]})
    except IadkitError as exc:
        raise ModelFileError(f"{path}: {exc} (made by iadkit {manifest['iadkit_version']})") from None
    recorded = manifest.get("backbone")
    current = backbone_record(detector)
    if recorded and current and recorded.get("sha256") and recorded["sha256"] != current["sha256"]:
        raise ModelFileError(
            f"{path}: the model was trained with backbone {recorded['name']} weights sha256 "
            f"{recorded['sha256'][:12]}…, but the weights found here hash to {str(current['sha256'])[:12]}…; "
            "install the same weight file the model was trained with"
        )
    try:
        threshold = Threshold.from_dict(manifest["threshold"]) if manifest.get("threshold") else None
        postprocess = Postprocess.from_dict(manifest["postprocess"])
        preprocess = Preprocess.from_dict(manifest["preprocess"])
        tiling = Tiling.from_dict(manifest["tiling"]) if manifest.get("tiling") else None
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from None
    if threshold is not None and not math.isfinite(threshold.value):
        raise ModelFileError(
            f"{path}: the stored threshold is {threshold.value}, not a finite number; recalibrate the model"
        )
    model = Model(
        detector, preprocess, postprocess=postprocess, threshold=threshold, info=manifest.get("info", {}), tiling=tiling
    )
    return model.to(device)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise ModelFileError(f"{path}: no such model file (create one with `iadkit fit ... --out {path}`)")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, not a model file")


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    if manifest.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an iadkit model file (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    written_by = manifest.get("iadkit_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model file format {version} is newer than this iadkit understands ({FORMAT_VERSION}); "
            f"upgrade iadkit (file written by iadkit {written_by})"
        )
    if version < FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model file format {version} (written by iadkit {written_by}) is no longer supported; "
            f"this iadkit reads format {FORMAT_VERSION}: refit the model with this version"
        )
    missing = [k for k in ("method", "params", "preprocess", "postprocess", "tensors_sha256") if k not in manifest]
    if missing:
        raise ModelFileError(f"{path}: malformed manifest, missing {', '.join(missing)}")
