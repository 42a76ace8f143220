"""VisA (Visual Anomaly dataset, Zou et al., ECCV 2022) read from its published split file.

The download holds ``<root>/<object>/Data/Images/{Normal,Anomaly}/*.JPG``, masks in
``<object>/Data/Masks/Anomaly/*.png`` and the official splits in ``<root>/split_csv/``.
The 1-class split ``1cls.csv`` (the standard unsupervised protocol) has the columns
``object, split, label, image, mask``: ``split`` is ``train`` or ``test``, ``label`` is
``normal`` or ``anomaly``, paths are relative to the root and ``mask`` is empty for
normal images. The 2-class splits (``2cls_fewshot.csv``, ``2cls_highshot.csv``) have the
same columns and also list anomalous *training* images; those go to
``DatasetSplit.train_anomalous``.

VisA's masks number each defect region (pixel values 0, 1, 2, ...) instead of 0/255, so
anomalous samples are :class:`~iadkit.types.Sample` with ``mask_values="nonzero"``: any nonzero pixel is
a defect. A copy reorganised into the MVTec layout (``visa_pytorch``) is read by the
``mvtec`` layout instead.
"""

from __future__ import annotations

import csv
from pathlib import Path

from iadkit.data.layouts import DatasetSplit, handle_missing_masks, pick_category
from iadkit.errors import DatasetLayoutError
from iadkit.types import ANOMALOUS, GOOD, Sample

VISA_LICENSE = "CC BY 4.0"
_COLUMNS = {
    "object": ("object", "category", "class"),
    "split": ("split",),
    "label": ("label",),
    "image": ("image", "image_path"),
    "mask": ("mask", "mask_path"),
}
_LABELS = {"normal": GOOD, "good": GOOD, "anomaly": ANOMALOUS, "anomalous": ANOMALOUS, "bad": ANOMALOUS}
_SPLITS = {"train": "train", "test": "test", "val": "validation", "valid": "validation", "validation": "validation"}


def looks_like_visa(root: Path) -> bool:
    return (root / "split_csv").is_dir() and any((root / "split_csv").glob("*.csv"))


def _csv_path(root: Path, split_file: str) -> Path:
    name = split_file if split_file.endswith(".csv") else f"{split_file}.csv"
    path = root / "split_csv" / name
    if not path.is_file():
        found = sorted(p.name for p in (root / "split_csv").glob("*.csv")) if (root / "split_csv").is_dir() else []
        raise DatasetLayoutError(
            f"{path}: split file not found (VisA layout expects <root>/split_csv/1cls.csv). "
            f"Found: {', '.join(found) or 'none'}."
        )
    return path


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        mapping: dict[str, str] = {}
        for key, aliases in _COLUMNS.items():
            hit = next((h for h in header if h.lower() in aliases), None)
            if hit is None:
                raise DatasetLayoutError(
                    f"{path}: column {key!r} missing; the VisA split file needs the columns "
                    f"object, split, label, image, mask (found: {', '.join(header) or 'no header'})."
                )
            mapping[key] = hit
        rows = []
        for raw in reader:
            row = {k.strip() if k else k: (v or "").strip() for k, v in raw.items()}
            rows.append({key: row.get(col, "") for key, col in mapping.items()})
    return rows


def list_visa_categories(root: Path, split_file: str = "1cls.csv") -> list[str]:
    rows = _read_rows(_csv_path(Path(root), split_file))
    return sorted({r["object"] for r in rows if r["object"]})


def load_visa(
    root: Path | str,
    category: str | None = None,
    *,
    split_file: str = "1cls.csv",
    allow_missing_masks: bool = False,
) -> DatasetSplit:
    """Read one VisA object with the given split file (default: the 1-class split)."""
    root = Path(root)
    path = _csv_path(root, split_file)
    rows = _read_rows(path)
    name = pick_category(sorted({r["object"] for r in rows if r["object"]}), category, root, "visa")

    parts: dict[str, list[Sample]] = {"train": [], "test": [], "validation": [], "train_anomalous": []}
    missing_images: list[str] = []
    missing_masks: list[str] = []
    for line, row in enumerate(rows, start=2):
        if row["object"] != name:
            continue
        label = _LABELS.get(row["label"].lower())
        split = _SPLITS.get(row["split"].lower())
        if label is None or split is None:
            raise DatasetLayoutError(
                f"{path}, line {line}: label {row['label']!r} / split {row['split']!r} not understood; "
                "expected label normal|anomaly and split train|test."
            )
        image = root / row["image"]
        if not image.is_file():
            missing_images.append(str(image))
            continue
        if label == GOOD:
            parts[split].append(Sample(path=str(image), label=GOOD, category=name, defect_type="good"))
            continue
        mask = root / row["mask"] if row["mask"] else None
        if mask is None or not mask.is_file():
            missing_masks.append(str(image))
            mask = None
        sample = Sample(
            path=str(image),
            label=ANOMALOUS,
            category=name,
            defect_type="anomaly",
            mask_path=str(mask) if mask is not None else None,
            mask_values="nonzero",
        )
        parts["train_anomalous" if split == "train" else split].append(sample)

    if missing_images:
        shown = "\n  ".join(missing_images[:5])
        raise DatasetLayoutError(
            f"{path}: {len(missing_images)} image(s) listed for {name!r} do not exist, e.g.\n  {shown}\n"
            "Paths in the split file are relative to the dataset root; check that the root is the folder "
            "holding split_csv/ and the object folders."
        )
    if not parts["train"]:
        raise DatasetLayoutError(f"{path}: no normal training images for {name!r}.")
    if not parts["test"]:
        raise DatasetLayoutError(f"{path}: no test images for {name!r}.")
    handle_missing_masks(missing_masks, allow_missing_masks, f"{root} (visa layout, {name})")
    return DatasetSplit(
        name=root.name,
        category=name,
        train=parts["train"],
        test=parts["test"],
        train_anomalous=parts["train_anomalous"],
        validation=parts["validation"],
        layout="visa",
        root=str(root),
        license=VISA_LICENSE,
    )
