"""Model files: one safetensors file whose header carries a JSON manifest.

Loading never executes code: safetensors holds raw tensors, the manifest is JSON, and the
method class is looked up by name in our registry. Frozen pretrained backbones are not
copied into the file; the manifest records their name and weight sha256, and loading
rebuilds them from the backbone registry and refuses a different weight file.

Manifest (JSON, key ``iadkit_manifest`` in the safetensors metadata)::

    {"format": "iadkit-model", "format_version": 1, "iadkit_version": "0.1.0",
     "method": "patchcore", "params": {...hyper-parameters...},
     "preprocess": {...Preprocess.to_dict()...},
     "threshold": {"value": ..., "rule": ..., "details": {...}} | null,
     "map_range": [lo, hi] | null,
     "backbone": {"name": ..., "sha256": ...} | null,
     "info": {...training facts: n_train, dataset, category, created...}}

Writes are atomic: a temporary file in the same folder is renamed over the target, so a
killed save never leaves a truncated model behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import iadkit
from iadkit.data.transforms import Preprocess
from iadkit.errors import ModelFileError
from iadkit.thresholds import Threshold

FORMAT = "iadkit-model"
FORMAT_VERSION = 1
MANIFEST_KEY = "iadkit_manifest"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file + rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def backbone_record(detector: torch.nn.Module) -> dict[str, Any] | None:
    backbone = getattr(detector, "backbone", None)
    if backbone is None:
        return None
    return {"name": getattr(backbone, "name", None), "sha256": getattr(backbone, "weights_sha256", None)}


def manifest_of(model: "iadkit.model.Model") -> dict[str, Any]:
    _, config = model.detector.state()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "iadkit_version": iadkit.__version__,
        "method": config["method"],
        "params": config["params"],
        "preprocess": model.preprocess.to_dict(),
        "threshold": model.threshold.to_dict() if model.threshold else None,
        "map_range": list(model.map_range) if model.map_range else None,
        "backbone": backbone_record(model.detector),
        "info": {**model.info, "saved": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }


def save_model(model: "iadkit.model.Model", path: str | Path) -> Path:
    model.detector.check_fitted()
    tensors, _ = model.detector.state()
    manifest = manifest_of(model)
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
    _check_manifest(path, manifest)
    return manifest


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> "iadkit.model.Model":
    from iadkit.methods.base import get_method
    from iadkit.model import Model

    path = Path(path)
    manifest = read_manifest(path)
    try:
        tensors = st_load(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as exc:
        raise ModelFileError(f"{path}: corrupt model file ({exc})") from exc
    try:
        cls = get_method(manifest["method"])
    except KeyError as exc:
        raise ModelFileError(f"{path}: {exc.args[0]} (made by iadkit {manifest['iadkit_version']})") from exc
    detector = cls.from_state(tensors, {"method": manifest["method"], "params": manifest["params"]})
    recorded = manifest.get("backbone")
    current = backbone_record(detector)
    if recorded and current and recorded.get("sha256") and recorded["sha256"] != current["sha256"]:
        raise ModelFileError(
            f"{path}: the model was trained with backbone {recorded['name']} weights sha256 "
            f"{recorded['sha256'][:12]}…, but the weights found here hash to {str(current['sha256'])[:12]}…; "
            "install the same weight file the model was trained with"
        )
    threshold = Threshold.from_dict(manifest["threshold"]) if manifest.get("threshold") else None
    map_range = tuple(manifest["map_range"]) if manifest.get("map_range") else None
    model = Model(
        detector,
        Preprocess.from_dict(manifest["preprocess"]),
        threshold=threshold,
        map_range=map_range,
        info=manifest.get("info", {}),
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
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model file format {version} is newer than this iadkit understands ({FORMAT_VERSION}); "
            f"upgrade iadkit (file written by iadkit {manifest.get('iadkit_version')})"
        )
