"""The MVTec AD family of layouts: MVTec AD, MPDD, BTAD, MVTec LOCO AD, MVTec 3D-AD (RGB).

They share one idea (a folder per category with ``train/`` and ``test/``, a folder per
defect type, ground truth beside) and differ in details, all handled here:

* **mvtec** (also MPDD and the iadkit synthetic generator): ``train/good``,
  ``test/good``, ``test/<defect>``, masks ``ground_truth/<defect>/<stem>_mask.png``.
* **btad**: ``train/ok``, ``test/ok``, ``test/ko``, masks ``ground_truth/ko/<stem>.png``
  (product 03 ships ``.bmp`` images; any image suffix is accepted for masks).
* **loco** (MVTec LOCO AD): ``validation/good`` as well; the test defect types are
  ``logical_anomalies`` and ``structural_anomalies`` (kept as ``defect_type``, so metrics
  can be reported per kind); each anomalous image has a *folder* of masks
  ``ground_truth/<defect>/<stem>/000.png, 001.png, ...`` (one per defect), merged into one
  mask through ``Sample.mask_paths``. Test samples are :class:`iadkit.data.loco.LocoSample`,
  which also read the defects one by one with the saturation thresholds of the category's
  ``defects_config.json`` (for sPRO); a malformed config is an error at load time.
* **mvtec3d** (MVTec 3D-AD): ``train/good/rgb``, ``validation/good/rgb``,
  ``test/<defect>/rgb/<stem>.png`` with masks ``test/<defect>/gt/<stem>.png``. Samples are
  :class:`iadkit.data.point_maps.PointMapSample`: where a folder has ``xyz/`` beside
  ``rgb/``, each image gets its point map ``xyz/<stem>.tiff`` (read by ``load_xyz()``,
  optionally with the background plane removed: ``remove_plane=True``); an image without
  its point map in such a folder is an error. ``xyz=True`` requires point maps everywhere,
  ``xyz=False`` ignores them.

Masks are matched by stem, with or without a ``_mask`` suffix, whatever the suffix of the
file, so re-encoded copies of these datasets still load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iadkit.data.layouts import (
    DatasetSplit,
    MaskIndex,
    handle_missing_masks,
    list_images,
    pick_category,
    require_dir,
    require_images,
)
from iadkit.data.loco import DEFECTS_CONFIG, LocoSample, read_defects_config
from iadkit.data.point_maps import XYZ_EXTENSIONS, PointMapSample
from iadkit.errors import DatasetLayoutError
from iadkit.types import ANOMALOUS, GOOD, Sample

VARIANTS = ("mvtec", "btad", "loco", "mvtec3d")
LOCO_DEFECT_TYPES = ("logical_anomalies", "structural_anomalies")

_EXPECTED = {
    "mvtec": "<root>/<category>/train/good/*.png, test/good, test/<defect>/*.png, ground_truth/<defect>/<stem>_mask.png",
    "btad": "<root>/<category>/train/ok, test/ok, test/ko, ground_truth/ko/<stem>.png",
    "loco": "<root>/<category>/train/good, validation/good, test/<defect>, ground_truth/<defect>/<stem>/000.png",
    "mvtec3d": "<root>/<category>/train/good/rgb, test/<defect>/rgb, test/<defect>/gt/<stem>.png",
}


def _good_name(variant: str) -> str:
    return "ok" if variant == "btad" else "good"


def is_category_dir(path: Path) -> bool:
    """A folder with ``train/`` and ``test/`` whose train part holds ``good`` or ``ok``."""
    train = path / "train"
    return (path / "test").is_dir() and ((train / "good").is_dir() or (train / "ok").is_dir())


def variant_of(cat_dir: Path) -> str:
    """Which member of the family one category folder belongs to."""
    if (cat_dir / "train" / "ok").is_dir() and not (cat_dir / "train" / "good").is_dir():
        return "btad"
    if (cat_dir / "train" / "good" / "rgb").is_dir():
        return "mvtec3d"
    test = cat_dir / "test"
    if any((test / d).is_dir() for d in LOCO_DEFECT_TYPES):
        return "loco"
    return "mvtec"


def _category_dirs(root: Path) -> list[Path]:
    if is_category_dir(root):
        return [root]
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and is_category_dir(d))


def detect_variant(root: Path) -> str | None:
    """The variant of a root (or category folder), or None when it is not MVTec-like."""
    dirs = _category_dirs(root)
    return variant_of(dirs[0]) if dirs else None


def list_mvtec_categories(root: Path, variant: str = "mvtec") -> list[str]:
    """Category folder names under ``root`` (the root's own name if it is a category folder)."""
    return [d.name for d in _category_dirs(Path(root))]


def _image_dir(split_dir: Path, variant: str) -> Path:
    return split_dir / "rgb" if variant == "mvtec3d" else split_dir


def _xyz_paths(split_dir: Path, xyz: bool | None, remove_plane: bool) -> dict[str, str | None]:
    """{image stem: its point map ``<split_dir>/xyz/<stem>.tiff``} for an MVTec 3D-AD folder."""
    images = list_images(split_dir / "rgb")
    if xyz is False:
        return {p.stem: None for p in images}
    xyz_dir = split_dir / "xyz"
    if not xyz_dir.is_dir():
        if xyz or remove_plane:
            raise DatasetLayoutError(
                f"{xyz_dir}: missing folder of point maps (xyz/<stem>.tiff beside rgb/<stem>.png)"
                + (" needed by remove_plane=True" if remove_plane and not xyz else "")
                + "; pass xyz=False to read the RGB images only"
            )
        return {p.stem: None for p in images}
    by_stem = {f.stem: f for f in sorted(xyz_dir.iterdir()) if f.is_file() and f.suffix.lower() in XYZ_EXTENSIONS}
    missing = [p.name for p in images if p.stem not in by_stem]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DatasetLayoutError(
            f"{xyz_dir}: {len(missing)} image(s) of {split_dir / 'rgb'} have no point map <stem>.tiff here "
            f"({shown}); restore the files, or pass xyz=False to read the RGB images only"
        )
    return {p.stem: str(by_stem[p.stem]) for p in images}


def load_mvtec(
    root: Path | str,
    category: str | None = None,
    *,
    variant: str = "mvtec",
    allow_missing_masks: bool = False,
    xyz: bool | None = None,
    remove_plane: bool = False,
) -> DatasetSplit:
    """Read one category of an MVTec-family dataset (see the module docstring for layouts).

    Parameters
    ----------
    root
        The dataset folder (holding category folders) or one category folder.
    category
        The category to read; may be omitted when there is only one.
    variant
        "mvtec", "btad", "loco" or "mvtec3d".
    allow_missing_masks
        Keep anomalous images without a mask (with a warning) instead of failing.
    xyz
        MVTec 3D-AD only: None reads point maps where an ``xyz/`` folder exists, True
        requires them for every image, False ignores them.
    remove_plane
        MVTec 3D-AD only: ``load_xyz()`` removes the background plane (BTF's preprocessing).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant != "mvtec3d" and (xyz or remove_plane):
        raise DatasetLayoutError(
            f"xyz / remove_plane apply to MVTec 3D-AD point maps only, not to the {variant!r} layout"
        )
    if remove_plane and xyz is False:
        raise DatasetLayoutError("remove_plane=True needs the point maps; it contradicts xyz=False")
    root = Path(root)
    expected = _EXPECTED[variant]
    dirs = {d.name: d for d in _category_dirs(root)}
    good = _good_name(variant)
    named = root / category if category is not None and root.name != category else root
    if category is not None and category not in dirs and named.is_dir() and (named / "test").is_dir():
        raise DatasetLayoutError(
            f"{named}: missing folder train/{good} (the good training images). Expected layout: {expected}"
        )
    if not dirs:
        raise DatasetLayoutError(f"{root}: no category folder with train/ and test/ found. Expected: {expected}")
    name = pick_category(sorted(dirs), category, root, variant)
    cat_dir = dirs[name]

    point_maps: dict[Path, dict[str, str | None]] = {}  # per folder, listed once

    def make(split_dir: Path, images: list[Path], **fields: Any) -> list[Sample]:
        """Samples of (some) images of one folder; with their point maps for MVTec 3D-AD."""
        if variant != "mvtec3d":
            return [Sample(path=str(p), category=name, **fields) for p in images]
        if split_dir not in point_maps:
            point_maps[split_dir] = _xyz_paths(split_dir, xyz, remove_plane)
        return [
            PointMapSample(
                path=str(p), category=name, xyz_path=point_maps[split_dir][p.stem], remove_plane=remove_plane, **fields
            )
            for p in images
        ]

    train_split = require_dir(cat_dir / "train" / good, f"training images, train/{good}", expected)
    train_images = require_images(_image_dir(train_split, variant), f"training images of {name!r}")
    train = make(train_split, train_images, label=GOOD, defect_type="good")

    validation: list[Sample] = []
    val_dir = cat_dir / "validation" / good
    if val_dir.is_dir():
        validation = make(val_dir, list_images(_image_dir(val_dir, variant)), label=GOOD, defect_type="good")

    test_root = require_dir(cat_dir / "test", "test images", expected)
    # good first, then the defect types alphabetically
    defect_dirs = sorted(
        (d for d in test_root.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: (d.name != good, d.name),
    )
    if not defect_dirs:
        raise DatasetLayoutError(
            f"{test_root}: no sub-folders; expected test/{good} and test/<defect_type>. Expected: {expected}"
        )

    loco_config = None
    if variant == "loco" and (cat_dir / DEFECTS_CONFIG).is_file():
        loco_config = read_defects_config(cat_dir / DEFECTS_CONFIG)

    test: list[Sample] = []
    missing: list[str] = []
    for ddir in defect_dirs:
        images = list_images(_image_dir(ddir, variant))
        if ddir.name == good:
            if variant == "loco":
                test += [
                    LocoSample(path=str(p), label=GOOD, category=name, defect_type="good", defects=loco_config)
                    for p in images
                ]
            else:
                test += make(ddir, images, label=GOOD, defect_type="good")
            continue
        defect_type = ddir.name
        if variant == "loco":
            gt_dir = cat_dir / "ground_truth" / defect_type
            for p in images:
                folder = gt_dir / p.stem
                masks = tuple(str(m) for m in list_images(folder))
                if not masks:
                    missing.append(str(p))
                test.append(
                    LocoSample(
                        path=str(p),
                        label=ANOMALOUS,
                        category=name,
                        defect_type=defect_type,
                        mask_paths=masks,
                        defects=loco_config,
                    )
                )
            continue
        if variant == "mvtec3d":
            index = MaskIndex([ddir / "gt"])
        else:
            index = MaskIndex([cat_dir / "ground_truth" / defect_type])
        for p in images:
            mask = index.find(p.stem)
            if mask is None:
                missing.append(str(p))
            test += make(
                ddir, [p], label=ANOMALOUS, defect_type=defect_type, mask_path=str(mask) if mask is not None else None
            )
    if not test:
        raise DatasetLayoutError(f"{test_root}: no test images found in its sub-folders. Expected: {expected}")
    handle_missing_masks(missing, allow_missing_masks, f"{cat_dir} ({variant} layout)")
    dataset_name = root.name if cat_dir != root else root.parent.name
    return DatasetSplit(
        name=dataset_name,
        category=name,
        train=train,
        test=test,
        validation=validation,
        layout=variant,
        root=str(root),
    )
