"""Plain folders: the layout a factory's own images usually arrive in.

::

    <root>/good/            good images (required)
    <root>/defect/          defect images, flat, or one sub-folder per defect type (optional)
    <root>/mask/            masks matched by stem: 003.png, 003_mask.png or 003_GT.png (optional;
                            for typed defects also mask/<type>/...)
    <root>/test_good/       good images kept for testing only (optional)

Folder names are matched case-insensitively among common synonyms: defects in
``defect``, ``defects``, ``bad``, ``anomalous``, ``anomaly``, ``ng``, ``ko``; masks in
``mask``, ``masks``, ``ground_truth``, ``gt``; test images in ``test_good``,
``good_test``. Any of them can be given explicitly (``defect=``, ``mask=``,
``test_good=``; relative to the root).

Split: without ``test_good/``, the good images are divided reproducibly: ``floor(n *
train_fraction)`` of them (default 0.8) go to training, chosen by
``numpy.random.default_rng(seed).permutation(n)``; the rest, plus every defect image, form
the test set. Defect images never go to training.

Masks are optional for this layout as a whole (without a mask folder the split simply has
no masks). When a mask folder exists, every defect image needs its mask, unless
``allow_missing_masks=True``. A root whose sub-folders each hold ``good/`` is read as one
category per sub-folder.
"""

from __future__ import annotations

from pathlib import Path

from iadkit.data.layouts import (
    DatasetSplit,
    MaskIndex,
    handle_missing_masks,
    list_images,
    pick_category,
    require_images,
    seeded_split,
)
from iadkit.errors import DatasetLayoutError
from iadkit.types import ANOMALOUS, GOOD, Sample

DEFECT_DIR_NAMES = ("defect", "defects", "bad", "anomalous", "anomaly", "ng", "ko")
MASK_DIR_NAMES = ("mask", "masks", "ground_truth", "gt")
TEST_GOOD_DIR_NAMES = ("test_good", "good_test")
_EXPECTED = "<root>/good/*.png, optional <root>/defect/[<type>/]*.png, optional <root>/mask/<stem>[_mask].png"


def _find_dir(cat_dir: Path, names: tuple[str, ...]) -> Path | None:
    by_lower = {p.name.lower(): p for p in cat_dir.iterdir() if p.is_dir()}
    for n in names:
        if n in by_lower:
            return by_lower[n]
    return None


def _good_dir(cat_dir: Path, good: str) -> Path | None:
    return _find_dir(cat_dir, (good.lower(),))


def _category_dirs(root: Path, good: str = "good") -> list[Path]:
    if _good_dir(root, good) is not None:
        return [root]
    return sorted(
        d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _good_dir(d, good) is not None
    )


def looks_like_folder(root: Path) -> bool:
    return bool(_category_dirs(root))


def list_folder_categories(root: Path, good: str = "good") -> list[str]:
    return [d.name for d in _category_dirs(Path(root), good)]


def _named(cat_dir: Path, given: str | None, synonyms: tuple[str, ...], what: str) -> Path | None:
    if given is None:
        return _find_dir(cat_dir, synonyms)
    path = cat_dir / given
    if not path.is_dir():
        raise DatasetLayoutError(f"{path}: {what} folder not found (given explicitly). Expected: {_EXPECTED}")
    return path


def load_folder(
    root: Path | str,
    category: str | None = None,
    *,
    good: str = "good",
    defect: str | None = None,
    mask: str | None = None,
    test_good: str | None = None,
    train_fraction: float = 0.8,
    seed: int = 0,
    allow_missing_masks: bool = False,
) -> DatasetSplit:
    """Read a plain folder layout (see the module docstring)."""
    root = Path(root)
    dirs = {d.name: d for d in _category_dirs(root, good)}
    if not dirs:
        raise DatasetLayoutError(f"{root}: no {good}/ folder found. Expected: {_EXPECTED}")
    name = pick_category(sorted(dirs), category, root, "folder")
    cat_dir = dirs[name]

    good_dir = _good_dir(cat_dir, good)
    assert good_dir is not None
    good_images = require_images(good_dir, f"good images of {name!r}")
    test_good_dir = _named(cat_dir, test_good, TEST_GOOD_DIR_NAMES, "test_good")
    if test_good_dir is not None:
        train_paths, test_good_paths = good_images, require_images(test_good_dir, "good test images")
    else:
        train_paths, test_good_paths = seeded_split(good_images, train_fraction, seed)
    if not train_paths:
        raise DatasetLayoutError(
            f"{good_dir}: {len(good_images)} good image(s) and train_fraction={train_fraction} leave none "
            "for training; add good images or raise train_fraction."
        )

    def good_sample(p: Path) -> Sample:
        return Sample(path=str(p), label=GOOD, category=name, defect_type="good")

    train = [good_sample(p) for p in train_paths]
    test = [good_sample(p) for p in test_good_paths]

    defect_dir = _named(cat_dir, defect, DEFECT_DIR_NAMES, "defect")
    mask_dir = _named(cat_dir, mask, MASK_DIR_NAMES, "mask")
    missing: list[str] = []
    if defect_dir is not None:
        typed = [(defect_dir.name.lower(), defect_dir, list_images(defect_dir))]
        typed += [
            (d.name, d, list_images(d))
            for d in sorted(defect_dir.iterdir())
            if d.is_dir() and not d.name.startswith(".")
        ]
        for defect_type, ddir, images in typed:
            index = None
            if mask_dir is not None:
                folders = [mask_dir / ddir.name, mask_dir] if ddir != defect_dir else [mask_dir]
                index = MaskIndex(folders)
            for p in images:
                mpath = index.find(p.stem) if index is not None else None
                if index is not None and mpath is None:
                    missing.append(str(p))
                test.append(
                    Sample(
                        path=str(p),
                        label=ANOMALOUS,
                        category=name,
                        defect_type="defect" if ddir == defect_dir else defect_type,
                        mask_path=str(mpath) if mpath is not None else None,
                    )
                )
    handle_missing_masks(missing, allow_missing_masks, f"{cat_dir} (folder layout)")
    notes = (
        "" if test_good_dir is not None else f"good images split {train_fraction:g} train / rest test with seed {seed}"
    )
    return DatasetSplit(
        name=root.name,
        category=name,
        train=train,
        test=test,
        layout="folder",
        root=str(root),
        notes=notes,
    )
