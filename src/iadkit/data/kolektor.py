"""KolektorSDD2 (Božič, Tabernik, Skočaj, Computers in Industry 2021).

Layout as published: ``<root>/train/<id>.png`` with its mask ``<root>/train/<id>_GT.png``,
the same in ``<root>/test``. Every image has a mask; an image is anomalous when its mask
has any nonzero pixel (the dataset has no other label file), so loading reads every mask
once (about 3,300 small PNGs).

Unsupervised protocol: ``train`` keeps only the good training images; the labelled
defective training images (246 in the full set) are exposed as
``DatasetSplit.train_anomalous`` for semi-/supervised settings. ``test`` keeps all test
images. A missing ``_GT`` file is always an error, because without it the image's label
is unknown.
"""

from __future__ import annotations

from pathlib import Path

from iadkit.data.io import read_mask
from iadkit.data.layouts import DatasetSplit, list_images, pick_category, require_dir
from iadkit.errors import DatasetLayoutError
from iadkit.types import ANOMALOUS, GOOD, Sample

KOLEKTOR2_CATEGORY = "ksdd2"
KOLEKTOR2_LICENSE = "CC BY-NC-SA 4.0"
GT_SUFFIX = "_GT"
_EXPECTED = "<root>/train/<id>.png + <id>_GT.png, <root>/test/<id>.png + <id>_GT.png"


def looks_like_kolektor2(root: Path) -> bool:
    def has_gt(d: Path) -> bool:
        return d.is_dir() and any(p.stem.endswith(GT_SUFFIX) for p in list_images(d))

    return has_gt(root / "train") and (root / "test").is_dir()


def list_kolektor2_categories(root: Path) -> list[str]:
    return [KOLEKTOR2_CATEGORY]


def _read_part(folder: Path) -> tuple[list[Sample], list[Sample]]:
    """(good, anomalous) samples of one folder; anomalous when the _GT mask has a nonzero pixel."""
    files = list_images(folder)
    masks = {p.stem[: -len(GT_SUFFIX)]: p for p in files if p.stem.endswith(GT_SUFFIX)}
    images = [p for p in files if not p.stem.endswith(GT_SUFFIX)]
    if not images:
        raise DatasetLayoutError(f"{folder}: no images found. Expected: {_EXPECTED}")
    without = [str(p) for p in images if p.stem not in masks]
    if without:
        shown = "\n  ".join(without[:5])
        raise DatasetLayoutError(
            f"{folder}: {len(without)} image(s) have no {GT_SUFFIX} mask, e.g.\n  {shown}\n"
            f"KolektorSDD2 labels an image by its mask (<id>{GT_SUFFIX}.png), so every image needs one."
        )
    good: list[Sample] = []
    anomalous: list[Sample] = []
    for p in images:
        mask_path = masks[p.stem]
        if read_mask(mask_path, nonzero=True).any():
            anomalous.append(
                Sample(
                    path=str(p),
                    label=ANOMALOUS,
                    category=KOLEKTOR2_CATEGORY,
                    defect_type="defect",
                    mask_path=str(mask_path),
                    mask_values="nonzero",
                )
            )
        else:
            good.append(Sample(path=str(p), label=GOOD, category=KOLEKTOR2_CATEGORY, defect_type="good"))
    return good, anomalous


def load_kolektor2(root: Path | str, category: str | None = None) -> DatasetSplit:
    """Read KolektorSDD2: good training images, labelled training defects, and the test set."""
    root = Path(root)
    pick_category([KOLEKTOR2_CATEGORY], category, root, "kolektor2")
    train_good, train_bad = _read_part(require_dir(root / "train", "training images", _EXPECTED))
    test_good, test_bad = _read_part(require_dir(root / "test", "test images", _EXPECTED))
    if not train_good:
        raise DatasetLayoutError(f"{root / 'train'}: every training mask marks a defect; no good image to train on.")
    return DatasetSplit(
        name=root.name,
        category=KOLEKTOR2_CATEGORY,
        train=train_good,
        test=sorted(test_good + test_bad, key=lambda s: s.path),
        train_anomalous=train_bad,
        layout="kolektor2",
        root=str(root),
        license=KOLEKTOR2_LICENSE,
    )
