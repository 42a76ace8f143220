"""A procedural industrial inspection dataset in the MVTec AD layout, made offline in seconds.

Why: tests, demos and benchmarks need data with pixel-exact ground truth that anyone can
regenerate bit for bit, without downloading anything. The generator draws textures (woven
fabric, brushed metal, wood) and objects (a flange washer, a printed label) with the natural
variation of a real line: part position and rotation, texture phase, thread thickness, print
registration and density, optical blur, a lighting gradient, gain and sensor noise. Defects
are small (0.3-3% of the image) and of realistic contrast, so global image statistics do
not give them away and a detector has to look locally. Logical anomalies (a missing bolt
hole, a missing or duplicated printed element) are locally normal: only the arrangement is
wrong.

Layout written under ``out_dir`` (as MVTec AD)::

    <category>/train/good/000.png ...
    <category>/test/good/000.png ...
    <category>/test/<defect_type>/000.png ...
    <category>/ground_truth/<defect_type>/000_mask.png    (0/255, same size as the image)
    synthetic.json                                      (how it was made: seed, sizes, counts)

Ground truth: each defective image is rendered twice with the same nuisances, with and without
the defect, before sensor noise. A pixel is in the mask when the defect changed it by at
least 15% of the defect's largest change and by at least 3/255 (so faint anti-aliasing
fringes are left out); for blob-like defects enclosed gaps are filled, as an annotator would.

Determinism: every image has its own random stream, seeded by (seed, category, split, defect
type, index). The same seed gives byte-identical files, whatever subset of categories is made
(on the same numpy/scipy/Pillow versions; floating-point details may differ across them).
`synthetic.json` records each category's parameters and a fingerprint of the generator's
source, so a re-run with the same parameters keeps the files and anything else rewrites them.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import shutil
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from iadkit.data.synth_3d import CATEGORIES_3D, Spec3D, Synth3DImage
from iadkit.data.synth_3d import synthesize_3d as draw_3d
from iadkit.data.synth_defects import DEFECTS, DefectContext
from iadkit.data.synth_scenes import SCENES
from iadkit.errors import DatasetLayoutError, IadkitError

GENERATOR_VERSION = 1  # bump when drawing changes; the source fingerprint below catches the rest
MANIFEST = "synthetic.json"
DEFECT_AREA_RANGE = (0.003, 0.03)  # fraction of the image a defect's mask covers
MASK_REL_THRESHOLD = 0.15  # of the defect's peak change
MASK_ABS_THRESHOLD = 3 / 255
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024
_MAX_DEFECT_ATTEMPTS = 50
LOGICAL_FAMILIES = frozenset({"missing_part", "extra_part", "swapped_parts", "reversed_part"})
_BLOB_FAMILIES = frozenset({"hole", "dent", "stain", "missing_part", "extra_part", "swapped_parts", "reversed_part"})


class SynthConfigError(IadkitError, ValueError):
    """Invalid parameters for the synthetic generator; the message says which and what is allowed."""


@dataclass(frozen=True)
class CategorySpec:
    """What a synthetic category is: texture or object, channels, and its defect types.

    `defects` maps each defect type (the folder name under ``test/``) to its family:
    scratch, crack, hole, dent, stain (structural) or missing_part, extra_part,
    swapped_parts, reversed_part (logical).
    """

    name: str
    kind: str  # "texture" | "object"
    channels: int  # 1 = grayscale PNG, 3 = RGB PNG
    defects: Mapping[str, str]
    description: str

    @property
    def defect_types(self) -> tuple[str, ...]:
        return tuple(self.defects)

    @property
    def logical_defect_types(self) -> tuple[str, ...]:
        return tuple(d for d, fam in self.defects.items() if fam in LOGICAL_FAMILIES)


def _spec(name: str, kind: str, channels: int, defects: dict[str, str], description: str) -> CategorySpec:
    return CategorySpec(name, kind, channels, MappingProxyType(defects), description)


CATEGORIES: dict[str, CategorySpec] = {
    "fabric": _spec(
        "fabric", "texture", 3, {"hole": "hole", "stain": "stain", "thread": "scratch"}, "plain-weave linen, RGB"
    ),
    "metal": _spec(
        "metal", "texture", 1, {"scratch": "scratch", "dent": "dent", "stain": "stain"}, "brushed steel, grayscale"
    ),
    "wood": _spec(
        "wood",
        "texture",
        3,
        {"crack": "crack", "hole": "hole", "stain": "stain", "scratch": "scratch"},
        "plank with growth rings, RGB",
    ),
    "washer": _spec(
        "washer",
        "object",
        1,
        {"scratch": "scratch", "dent": "dent", "missing_hole": "missing_part"},
        "flange washer with six bolt holes on a belt, grayscale",
    ),
    "label": _spec(
        "label",
        "object",
        3,
        {"stain": "stain", "scratch": "scratch", "missing_print": "missing_part", "extra_print": "extra_part"},
        "printed label (logo, text, three icons) on cardboard, RGB",
    ),
}

LOGICAL_CATEGORIES: dict[str, CategorySpec] = {
    # Made on request (not in the default set): designed for MVTec LOCO's logical anomalies.
    "tray": _spec(
        "tray",
        "object",
        3,
        {
            "missing_part": "missing_part",
            "extra_part": "extra_part",
            "swapped_parts": "swapped_parts",
            "reversed_part": "reversed_part",
            "scratch": "scratch",
            "stain": "stain",
        },
        "compartment tray, three brass nuts in one row and three steel bolts in the other, RGB "
        "(logical: a part missing, one too many, a nut and a bolt swapped, a bolt turned round)",
    ),
}

PRESETS: dict[str, dict[str, int]] = {
    # Tests: every category in about a second.
    "small": {"image_size": 64, "n_train": 16, "n_test_good": 6, "n_test_per_defect": 3},
    # Demos and quick benchmarks.
    "demo": {"image_size": 128, "n_train": 60, "n_test_good": 20, "n_test_per_defect": 8},
}

_SPLIT_CODES = {"train": 0, "test": 1, "validation": 2}

LAYOUTS: dict[str, str] = {"mvtec": "mvtec_ad", "loco": "mvtec_loco_ad", "mvtec3d": "mvtec_3d_ad"}
"""Layouts `generate` writes (``layout=``) and the name each one is recorded under."""

__all__ = [
    "CATEGORIES",
    "CATEGORIES_3D",
    "DEFECT_AREA_RANGE",
    "LAYOUTS",
    "LOGICAL_CATEGORIES",
    "PRESETS",
    "CategoryCounts",
    "CategorySpec",
    "SynthConfigError",
    "SynthImage",
    "SynthSummary",
    "generate",
    "loco_defects_config",
    "synthesize",
    "synthesize_3d",
]


# -- one image ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthImage:
    """One generated image (HxWxC uint8, C = 1 or 3) and its mask (HxW bool; None for good).

    For a defective image, `reference` is the very same shot without the defect (same part,
    lighting and sensor noise): ``image != reference`` exactly where the defect shows.
    """

    image: np.ndarray
    mask: np.ndarray | None
    reference: np.ndarray | None = None


def _stable_id(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _streams(
    seed: int, category: str, split: str, defect_type: str | None, index: int, n: int = 4
) -> list[np.random.Generator]:
    """Independent generators (scene, optics, noise, defect[, depth noise]) for one image."""
    key = [seed, _stable_id(category), _SPLIT_CODES[split], _stable_id(defect_type) if defect_type else 0, index]
    return [np.random.default_rng(s) for s in np.random.SeedSequence(key).spawn(n)]


def _sample_optics(rng: np.random.Generator, channels: int) -> dict[str, Any]:
    """Camera and lighting nuisances of one shot."""
    return {
        "blur": rng.uniform(0.3, 0.7),  # optics, px
        "gain": rng.uniform(0.9, 1.1),
        "gradient": rng.uniform(0.0, 0.15),  # relative change across the image
        "gradient_dir": rng.uniform(0, 2 * np.pi),
        "balance": rng.uniform(0.97, 1.03, channels) if channels == 3 else np.ones(1),
        "noise": rng.uniform(0.006, 0.02),
    }


def _apply_optics(img: np.ndarray, o: dict[str, Any]) -> np.ndarray:
    size = img.shape[0]
    out = ndimage.gaussian_filter(img, (o["blur"], o["blur"], 0), mode="nearest")
    c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ramp = np.cos(o["gradient_dir"]) * c[None, :] + np.sin(o["gradient_dir"]) * c[:, None]
    light = o["gain"] * (1 + o["gradient"] * ramp)
    return out * light[..., None] * o["balance"]


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _all_2d() -> dict[str, CategorySpec]:
    return {**CATEGORIES, **LOGICAL_CATEGORIES}


def _check_category(category: str) -> CategorySpec:
    known = _all_2d()
    if category not in known:
        raise SynthConfigError(f"unknown synthetic category {category!r}; choose from {', '.join(known)}")
    return known[category]


def synthesize(
    category: str,
    defect_type: str | None = None,
    *,
    seed: int = 0,
    index: int = 0,
    image_size: int = 64,
    split: str = "test",
) -> SynthImage:
    """Generate one image in memory, exactly as `generate` writes it.

    `defect_type=None` gives a good image (`split` "train", "validation" or "test");
    otherwise a test image with that defect and its mask.
    """
    if category in CATEGORIES_3D:
        raise SynthConfigError(f"{category!r} is a 3D category; use synthesize_3d for it")
    spec = _check_category(category)
    _check_size(image_size)
    if defect_type is not None and defect_type not in spec.defects:
        raise SynthConfigError(
            f"category {category!r} has no defect type {defect_type!r}; choose from {', '.join(spec.defect_types)}"
        )
    _check_split(split, defect_type)
    scene = SCENES[category]
    r_scene, r_optics, r_noise, r_defect = _streams(seed, category, split, defect_type, index)
    params = scene.sample(r_scene, image_size)
    good = scene.render(params, image_size)
    optics = _sample_optics(r_optics, spec.channels)
    clean = _apply_optics(good.image, optics)
    noise = r_noise.normal(0.0, optics["noise"], clean.shape).astype(np.float32)
    if defect_type is None:
        return SynthImage(_to_uint8(clean + noise), None)
    ctx = DefectContext(scene, params, good, image_size)
    defective, mask = _apply_defect(ctx, DEFECTS[defect_type], spec.defects[defect_type], clean, optics, r_defect)
    return SynthImage(_to_uint8(defective + noise), mask, reference=_to_uint8(clean + noise))


def _check_split(split: str, defect_type: str | None) -> None:
    if split not in _SPLIT_CODES or (defect_type is not None and split != "test"):
        raise SynthConfigError(f"split must be 'train', 'validation' or 'test' (defects only in 'test'), got {split!r}")


def synthesize_3d(
    category: str,
    defect_type: str | None = None,
    *,
    seed: int = 0,
    index: int = 0,
    image_size: int = 64,
    split: str = "test",
) -> Synth3DImage:
    """Generate one RGB + point-map shot of a 3D category in memory, exactly as `generate` writes it.

    Parameters
    ----------
    category
        A key of :data:`CATEGORIES_3D`.
    defect_type
        None for a good shot, else one of the category's defect types.
    seed, index
        Which shot (each has its own random streams).
    image_size
        Side in pixels.
    split
        "train", "validation" or "test" (defects only in "test").

    `defect_type=None` gives a good shot; otherwise a test shot with that defect, its mask
    and the defect-free twin (`reference`, `reference_xyz`). See :mod:`iadkit.data.synth_3d`.
    """
    if category not in CATEGORIES_3D:
        raise SynthConfigError(f"unknown synthetic 3D category {category!r}; choose from {', '.join(CATEGORIES_3D)}")
    spec = CATEGORIES_3D[category]
    _check_size(image_size)
    if defect_type is not None and defect_type not in spec.defects:
        raise SynthConfigError(
            f"category {category!r} has no defect type {defect_type!r}; choose from {', '.join(spec.defect_types)}"
        )
    _check_split(split, defect_type)
    return draw_3d(
        category,
        defect_type,
        image_size=image_size,
        streams=_streams(seed, category, split, defect_type, index, n=5),
        optics=_apply_optics,
        sample_optics=_sample_optics,
        to_uint8=_to_uint8,
    )


def _apply_defect(
    ctx: DefectContext, fn: Any, family: str, clean_good: np.ndarray, optics: dict[str, Any], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the defect until its visible region lies within DEFECT_AREA_RANGE; return image and mask."""
    lo, hi = DEFECT_AREA_RANGE
    for _ in range(_MAX_DEFECT_ATTEMPTS):
        clean = _apply_optics(fn(ctx, rng), optics)
        diff = np.abs(clean - clean_good).max(axis=2)
        peak = float(diff.max())
        if peak < MASK_ABS_THRESHOLD:
            continue
        mask = diff >= max(MASK_ABS_THRESHOLD, MASK_REL_THRESHOLD * peak)
        if family in _BLOB_FAMILIES:
            mask = ndimage.binary_fill_holes(mask)
        if lo <= mask.mean() <= hi:
            return clean, mask
    raise RuntimeError(  # a generator bug, not a user error: the defect sizes do not fit the image size
        f"could not draw a {fn.__name__} defect of {lo:.1%}-{hi:.1%} of a {ctx.size}px image "
        f"in {_MAX_DEFECT_ATTEMPTS} tries"
    )


# -- summary --------------------------------------------------------------------------------------
@dataclass
class CategoryCounts:
    kind: str
    channels: int
    train_good: int
    test_good: int
    test_defects: dict[str, int]
    written: bool = True  # False when an identical earlier run's files were kept
    validation_good: int = 0  # LOCO and 3D layouts only

    @property
    def total(self) -> int:
        return self.train_good + self.validation_good + self.test_good + sum(self.test_defects.values())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "channels": self.channels,
            "train_good": self.train_good,
            "test_good": self.test_good,
            "test_defects": dict(self.test_defects),
            "total": self.total,
            "written": self.written,
        }
        if self.validation_good:
            out["validation_good"] = self.validation_good
        return out


@dataclass
class SynthSummary:
    """What `generate` made: counts per category, the root folder and the parameters."""

    root: Path
    seed: int
    preset: str
    image_size: int
    categories: dict[str, CategoryCounts] = field(default_factory=dict)
    seconds: float = 0.0
    layout: str = "mvtec"

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "seed": self.seed,
            "preset": self.preset,
            "image_size": self.image_size,
            "layout": self.layout,
            "seconds": round(self.seconds, 3),
            "categories": {k: v.to_dict() for k, v in self.categories.items()},
        }

    def table(self) -> Any:
        """A rich Table with one row per category (for the CLI)."""
        from rich.table import Table

        layout = "" if self.layout == "mvtec" else f", {LAYOUTS[self.layout]} layout"
        t = Table(title=f"Synthetic dataset in {self.root} (seed {self.seed}, {self.image_size}px{layout})")
        t.add_column("category")
        t.add_column("kind")
        t.add_column("image")
        for col in ("train good", "test good", "test defective"):
            t.add_column(col, justify="right")
        t.add_column("defect types")
        t.add_column("files")
        for name, c in self.categories.items():
            per = set(c.test_defects.values())
            types = ", ".join(c.test_defects)
            types += f" ({per.pop()} each)" if len(per) == 1 else ""
            t.add_row(
                name,
                c.kind,
                "gray" if c.channels == 1 else "RGB",
                str(c.train_good),
                str(c.test_good),
                str(sum(c.test_defects.values())),
                types,
                "written" if c.written else "kept",
            )
        return t


# -- writing ----------------------------------------------------------------------------------------
def _check_size(image_size: int) -> None:
    if not isinstance(image_size, (int, np.integer)) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise SynthConfigError(
            f"image_size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} px, got {image_size!r}"
        )


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write a PNG atomically (temp file in the same folder, then rename)."""
    arr = array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(f, format="PNG")  # 2-D -> L, HxWx3 -> RGB
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_tiff(array: np.ndarray, path: Path) -> None:
    """Write an H x W x 3 float32 point map as one TIFF page (as MVTec 3D-AD), atomically."""
    import tifffile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tifffile.imwrite(tmp, np.ascontiguousarray(array, dtype=np.float32), photometric="rgb")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(data: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("categories", {}), dict):
            raise ValueError("not a synthetic dataset manifest")
        return data
    except (ValueError, OSError) as exc:
        raise DatasetLayoutError(
            f"{path}: cannot read the synthetic dataset record ({exc}); delete the file (and the category "
            "folders it described) or choose another output folder"
        ) from exc


def _width(n: int) -> int:
    return max(3, len(str(n - 1)))  # MVTec's 000.png, wider if needed


def _jobs(
    spec: CategorySpec | Spec3D, n_train: int, n_test_good: int, n_per_defect: int, n_validation: int = 0
) -> Iterator[tuple[str, str | None, int, str]]:
    """(split, defect_type or None, index, MVTec-style folder/stem) for every image of a category."""
    for i in range(n_train):
        yield "train", None, i, f"train/good/{i:0{_width(n_train)}d}"
    for i in range(n_validation):
        yield "validation", None, i, f"validation/good/{i:0{_width(n_validation)}d}"
    for i in range(n_test_good):
        yield "test", None, i, f"test/good/{i:0{_width(n_test_good)}d}"
    for d in spec.defect_types:
        for i in range(n_per_defect):
            yield "test", d, i, f"test/{d}/{i:0{_width(n_per_defect)}d}"


def loco_kind(spec: CategorySpec, defect_type: str) -> str:
    """MVTec LOCO's folder for a defect type: logical_anomalies or structural_anomalies.

    Parameters
    ----------
    spec
        The category.
    defect_type
        One of its defect types; logical families (missing, extra, swapped parts) are logical.
    """
    return "logical_anomalies" if spec.defects[defect_type] in LOGICAL_FAMILIES else "structural_anomalies"


EXTRA_PART_SATURATION = 0.0025
"""Absolute saturation of an extra part, as a fraction of the image area: half a typical part."""


def loco_defects_config(spec: CategorySpec, image_size: int) -> list[dict[str, Any]]:
    """The ``defects_config.json`` entries of a category written in the LOCO layout.

    Parameters
    ----------
    spec
        The category.
    image_size
        Side of the images in pixels (absolute saturations scale with it).

    Pixel values 255, 254, ... in defect-type order. Saturation (what detecting a defect
    fully takes): structural defects 100 % of their area (plain PRO); the other logical
    defects 50 % of the ground truth (finding the empty slot, one of two exchanged places,
    or one end of a reversed bolt is enough); an extra part an absolute half of a typical part,
    round(0.0025 * image_size ** 2) pixels (LOCO's configs use both kinds of threshold).
    """
    entries = []
    for k, d in enumerate(spec.defect_types):
        family = spec.defects[d]
        if family == "extra_part":
            threshold: float = max(1, round(EXTRA_PART_SATURATION * image_size**2))
            relative = False
        elif family in LOGICAL_FAMILIES:
            threshold, relative = 0.5, True
        else:
            threshold, relative = 1.0, True
        entries.append(
            {
                "defect_name": d,
                "pixel_value": 255 - k,
                "saturation_threshold": threshold,
                "relative_saturation": relative,
            }
        )
    return entries


def _write_mvtec_files(
    tmp: Path, spec: CategorySpec, seed: int, size: int, counts: tuple[int, ...], advance: Any
) -> None:
    for split, defect, index, rel in _jobs(spec, *counts):
        out = synthesize(spec.name, defect, seed=seed, index=index, image_size=size, split=split)
        path = tmp / f"{rel}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_png(out.image, path)
        if out.mask is not None:
            mpath = tmp / "ground_truth" / str(defect) / (Path(rel).name + "_mask.png")
            mpath.parent.mkdir(parents=True, exist_ok=True)
            _save_png(out.mask.astype(np.uint8) * 255, mpath)
        advance()


def _write_loco_files(
    tmp: Path, spec: CategorySpec, seed: int, size: int, counts: tuple[int, ...], advance: Any
) -> dict[str, Any]:
    """MVTec LOCO layout: anomalies grouped by kind, one mask folder per image, defects_config.json."""
    config = loco_defects_config(spec, size)
    value = {e["defect_name"]: e["pixel_value"] for e in config}
    n_per_kind: dict[str, int] = {}
    for d in spec.defect_types:
        n_per_kind[loco_kind(spec, d)] = n_per_kind.get(loco_kind(spec, d), 0) + counts[2]
    next_index = dict.fromkeys(n_per_kind, 0)
    files: dict[str, str] = {}
    for split, defect, index, rel in _jobs(spec, *counts):
        out = synthesize(spec.name, defect, seed=seed, index=index, image_size=size, split=split)
        if defect is None:
            rel_image = f"{rel}.png"
        else:
            kind = loco_kind(spec, defect)
            stem = f"{next_index[kind]:0{_width(n_per_kind[kind])}d}"
            next_index[kind] += 1
            rel_image = f"test/{kind}/{stem}.png"
            files[f"{kind}/{stem}"] = defect
            mpath = tmp / "ground_truth" / kind / stem / "000.png"
            mpath.parent.mkdir(parents=True, exist_ok=True)
            _save_png(out.mask.astype(np.uint8) * np.uint8(value[defect]), mpath)  # type: ignore[union-attr]
        path = tmp / rel_image
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_png(out.image, path)
        advance()
    _write_json(config, tmp / "defects_config.json")
    return {"defects_config": config, "defect_of_image": files}


def _write_mvtec3d_files(tmp: Path, spec: Spec3D, seed: int, size: int, counts: tuple[int, ...], advance: Any) -> None:
    """MVTec 3D-AD layout: <split>/<type>/rgb/<stem>.png, xyz/<stem>.tiff, gt/<stem>.png."""
    for split, defect, index, rel in _jobs(spec, *counts):
        out = synthesize_3d(spec.name, defect, seed=seed, index=index, image_size=size, split=split)
        folder, stem = tmp / Path(rel).parent, Path(rel).name
        for sub in ("rgb", "xyz"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        _save_png(out.image, folder / "rgb" / f"{stem}.png")
        _save_tiff(out.xyz, folder / "xyz" / f"{stem}.tiff")
        if out.mask is not None:
            (folder / "gt").mkdir(exist_ok=True)
            _save_png(out.mask.astype(np.uint8) * 255, folder / "gt" / f"{stem}.png")
        advance()


def _write_category(
    root: Path,
    spec: CategorySpec | Spec3D,
    seed: int,
    size: int,
    counts: tuple[int, ...],
    advance: Any,
    layout: str = "mvtec",
) -> dict[str, Any]:
    """Write one category into a hidden temp folder, then rename it into place (never half-written).

    Returns what the layout adds to the category's record (LOCO: its defects config).
    """
    final = root / spec.name
    tmp = root / f".{spec.name}.partial-{uuid.uuid4().hex[:8]}"
    extra: dict[str, Any] = {}
    try:
        if layout == "loco":
            extra = _write_loco_files(tmp, spec, seed, size, counts, advance)  # type: ignore[arg-type]
        elif layout == "mvtec3d":
            _write_mvtec3d_files(tmp, spec, seed, size, counts, advance)  # type: ignore[arg-type]
        else:
            _write_mvtec_files(tmp, spec, seed, size, counts, advance)  # type: ignore[arg-type]
        old = None
        if final.exists():
            old = root / f".{spec.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return extra


def _resolve(preset: str, **overrides: int | None) -> dict[str, int]:
    if preset not in PRESETS:
        raise SynthConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    for key, val in overrides.items():
        if val is not None:
            values[key] = val
    _check_size(values["image_size"])
    for key in ("n_train", "n_test_good", "n_test_per_defect"):
        v = values[key]
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise SynthConfigError(f"{key} must be a positive integer, got {v!r}")
    return values


def generate(
    out_dir: str | Path,
    *,
    seed: int = 0,
    preset: str = "small",
    image_size: int | None = None,
    categories: Sequence[str] | None = None,
    n_train: int | None = None,
    n_test_good: int | None = None,
    n_test_per_defect: int | None = None,
    progress: bool = False,
    layout: str = "mvtec",
    n_validation: int | None = None,
) -> SynthSummary:
    """Write the synthetic dataset under `out_dir` and return what was made.

    Parameters
    ----------
    out_dir
        Output folder (created); one layout per folder.
    seed
        The same seed gives byte-identical files.
    preset
        "small" (tests) or "demo": image size and counts; explicit arguments override it.
    image_size, n_train, n_test_good, n_test_per_defect
        Overrides of the preset.
    categories
        Names to make. Default per layout: ``mvtec`` the classic set :data:`CATEGORIES`;
        ``loco`` the 2D categories with both logical and structural defects (washer,
        label, tray); ``mvtec3d`` :data:`CATEGORIES_3D`. :data:`LOGICAL_CATEGORIES` (the
        tray) are made on request in any 2D layout.
    progress
        Show a progress bar.
    layout
        ``"mvtec"`` (MVTec AD), ``"loco"`` (MVTec LOCO AD: ``validation/good``,
        ``test/{logical,structural}_anomalies``, ``ground_truth/<kind>/<stem>/000.png``
        holding the defect's pixel value, ``defects_config.json``; the images are those
        of the MVTec layout, regrouped) or ``"mvtec3d"`` (MVTec 3D-AD: ``rgb/*.png``,
        ``xyz/*.tiff``, ``gt/*.png`` per folder, for the 3D categories).
    n_validation
        Good validation images (loco and mvtec3d; default ceil(n_train / 6), LOCO's ratio).

    Re-running with the same parameters keeps the existing files (a no-op); different
    parameters regenerate the category. Each category is written to a hidden temp folder
    and renamed into place, so an interrupted run leaves no partial category. A category
    folder not made by this generator is never overwritten.
    """
    t0 = time.perf_counter()
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise SynthConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if layout not in LAYOUTS:
        raise SynthConfigError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    values = _resolve(
        preset, image_size=image_size, n_train=n_train, n_test_good=n_test_good, n_test_per_defect=n_test_per_defect
    )
    if layout == "mvtec" and n_validation:
        raise SynthConfigError("n_validation applies to the loco and mvtec3d layouts (MVTec AD has no validation set)")
    if n_validation is None:
        n_validation = 0 if layout == "mvtec" else math.ceil(int(values["n_train"]) / 6)
    if not isinstance(n_validation, (int, np.integer)) or n_validation < 0:
        raise SynthConfigError(f"n_validation must be a non-negative integer, got {n_validation!r}")
    if isinstance(categories, str):  # one name, not a sequence of letters
        categories = [categories]
    default = _default_categories(layout)
    names = list(default) if categories is None else list(dict.fromkeys(categories))
    if not names:
        raise SynthConfigError("categories is empty; leave it out to generate all of " + ", ".join(default))
    specs = [_check_layout_category(n, layout) for n in names]
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise SynthConfigError(f"{root} exists and is not a folder; choose another output folder")
    manifest = _read_manifest(root) if root.exists() else {}
    if manifest.get("categories") and manifest.get("layout", LAYOUTS["mvtec"]) != LAYOUTS[layout]:
        raise SynthConfigError(
            f"{root} holds a synthetic dataset in the {manifest.get('layout')} layout; write the {LAYOUTS[layout]} "
            "layout to another folder (one layout per folder, so that loaders detect it)"
        )
    root.mkdir(parents=True, exist_ok=True)
    recorded: dict[str, Any] = dict(manifest.get("categories", {}))

    size = int(values["image_size"])
    counts = (int(values["n_train"]), int(values["n_test_good"]), int(values["n_test_per_defect"]))
    all_counts = counts + ((int(n_validation),) if layout != "mvtec" else ())
    summary = SynthSummary(root=root, seed=int(seed), preset=preset, image_size=size, layout=layout)
    todo: list[Any] = []
    for spec in specs:
        params = _category_params(spec, int(seed), size, all_counts, layout)
        entry = recorded.get(spec.name)
        exists = (root / spec.name).exists()
        if exists and entry is None:
            raise DatasetLayoutError(
                f"{root / spec.name} exists but was not made by the synthetic generator (no record in "
                f"{root / MANIFEST}); choose another output folder or remove it"
            )
        keep = exists and entry is not None and entry.get("parameters") == params
        summary.categories[spec.name] = CategoryCounts(
            spec.kind,
            spec.channels,
            counts[0],
            counts[1],
            dict.fromkeys(spec.defect_types, counts[2]),
            written=not keep,
            validation_good=int(n_validation),
        )
        if not keep:
            todo.append(spec)
    known = {**_all_2d(), **CATEGORIES_3D}
    for stale in root.glob(".*.partial-*"):  # left by a killed run
        if stale.is_dir() and stale.name.split(".partial-")[0][1:] in known:
            shutil.rmtree(stale, ignore_errors=True)

    total = sum(summary.categories[s.name].total for s in todo)
    bar = _progress_bar(progress, total)
    with bar as (advance, describe):
        for spec in todo:
            describe(spec.name)
            extra = _write_category(root, spec, int(seed), size, all_counts, advance, layout)
            recorded[spec.name] = {
                "parameters": _category_params(spec, int(seed), size, all_counts, layout),
                "preset": preset,
                "kind": spec.kind,
                "channels": spec.channels,
                "description": spec.description,
                "defect_families": _families(spec),
                "counts": {k: v for k, v in summary.categories[spec.name].to_dict().items() if k != "written"},
                **extra,
            }
            _write_json(_manifest(recorded, layout), root / MANIFEST)
    if not todo and not (root / MANIFEST).exists():
        _write_json(_manifest(recorded, layout), root / MANIFEST)
    summary.seconds = time.perf_counter() - t0
    return summary


@functools.lru_cache(maxsize=1)
def _source_fingerprint() -> str:
    """sha256 (short) of the generator's source, so files from an older generator are not kept."""
    import hashlib

    from iadkit.data import synth_3d, synth_defects, synth_scenes

    h = hashlib.sha256()
    for mod in (synth_scenes, synth_defects, synth_3d):
        h.update(Path(inspect.getfile(mod)).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def _category_params(
    spec: CategorySpec | Spec3D, seed: int, size: int, counts: tuple[int, ...], layout: str = "mvtec"
) -> dict[str, Any]:
    """What determines a category's files; equal parameters mean byte-identical files."""
    params = {
        "generator_version": GENERATOR_VERSION,
        "generator_source": _source_fingerprint(),
        "seed": seed,
        "image_size": size,
        "n_train": counts[0],
        "n_test_good": counts[1],
        "n_test_per_defect": counts[2],
        "defect_types": list(spec.defect_types),
    }
    if layout != "mvtec":  # (kept out of MVTec-layout records, which stay as they were)
        params["layout"] = layout
        params["n_validation"] = counts[3]
    return params


def _families(spec: CategorySpec | Spec3D) -> dict[str, Any]:
    if isinstance(spec, Spec3D):
        return {d: {"geometry": geo, "rgb": rgb} for d, (geo, rgb) in spec.defects.items()}
    return dict(spec.defects)


def _default_categories(layout: str) -> list[str]:
    if layout == "mvtec3d":
        return list(CATEGORIES_3D)
    if layout == "loco":
        both = lambda spec: (
            {loco_kind(spec, d) for d in spec.defect_types}
            == {
                "logical_anomalies",
                "structural_anomalies",
            }
        )
        return [name for name, spec in _all_2d().items() if both(spec)]
    return list(CATEGORIES)


def _check_layout_category(name: str, layout: str) -> CategorySpec | Spec3D:
    if layout == "mvtec3d":
        if name not in CATEGORIES_3D:
            raise SynthConfigError(
                f"the mvtec3d layout needs a 3D category (with point maps); choose from {', '.join(CATEGORIES_3D)}, "
                f"got {name!r}"
            )
        return CATEGORIES_3D[name]
    if name in CATEGORIES_3D:
        raise SynthConfigError(f"{name!r} is a 3D category; write it with layout='mvtec3d'")
    return _check_category(name)


def _manifest(categories: dict[str, Any], layout: str = "mvtec") -> dict[str, Any]:
    return {
        "generator": "iadkit.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "layout": LAYOUTS[layout],
        "how_to_regenerate": "iadkit.data.synthetic.generate(out_dir, seed=..., image_size=..., n_train=..., "
        "n_test_good=..., n_test_per_defect=..., categories=[...]) with a category's parameters below",
        "mask_rule": (
            f"pixel changed by the defect by >= {MASK_REL_THRESHOLD:.0%} of its peak change and >= 3/255 "
            "(before sensor noise); enclosed gaps of blob-like defects filled"
        ),
        "defect_area_range": list(DEFECT_AREA_RANGE),
        "categories": {k: categories[k] for k in sorted(categories)},
    }


class _NoBar:
    def __enter__(self) -> tuple[Any, Any]:
        return (lambda: None), (lambda name: None)

    def __exit__(self, *exc: object) -> None:
        return None


class _RichBar:
    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
        )
        self._total = total

    def __enter__(self) -> tuple[Any, Any]:
        self._progress.__enter__()
        task = self._progress.add_task("synthetic", total=self._total)
        return (
            lambda: self._progress.advance(task),
            lambda name: self._progress.update(task, description=f"synthetic {name}"),
        )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.__exit__(exc_type, exc, tb)


def _progress_bar(enabled: bool, total: int) -> Any:
    return _RichBar(total) if enabled and total else _NoBar()
