"""Datasets on disk -> lists of `Sample`: one entry point for every layout.

``load_dataset(source, category)`` returns a :class:`DatasetSplit` (train / test lists of
samples, plus labelled training defects and validation images where a dataset has them).
``source`` is a folder, or the name of a built-in set (``"elpv"``). The layout is detected
from the folder's structure unless given:

===========  ===========================================================================
layout       structure (``<cat>`` = one category folder)
===========  ===========================================================================
mvtec        ``<cat>/train/good``, ``<cat>/test/<defect>|good``,
             ``<cat>/ground_truth/<defect>/<stem>_mask.png``. Also MPDD, the iadkit
             synthetic generator, and VisA after the common reorganisation.
btad         as mvtec with ``ok`` for good and ``ko`` for defects;
             masks ``ground_truth/ko/<stem>.png|.bmp``.
loco         MVTec LOCO AD: as mvtec plus ``validation/good``; defect types
             ``logical_anomalies`` / ``structural_anomalies``; one mask folder per image,
             ``ground_truth/<defect>/<stem>/000.png, 001.png, ...`` (merged).
mvtec3d      MVTec 3D-AD: ``<cat>/train/good/rgb``, ``<cat>/test/<defect>/rgb``,
             masks ``<cat>/test/<defect>/gt/<stem>.png``, ``validation/good/rgb``; point
             maps ``xyz/<stem>.tiff`` beside ``rgb/`` (``PointMapSample.load_xyz``).
visa         VisA as published: ``split_csv/1cls.csv`` (columns object, split, label,
             image, mask; paths relative to the root). Masks hold instance labels.
kolektor2    KolektorSDD2: ``train/<id>.png`` + ``train/<id>_GT.png``, same for ``test``.
folder       plain folders: ``good/``, optional ``defect/`` (flat or one sub-folder per
             defect type), optional ``mask/`` matched by stem; good images are split into
             train/test with a seeded fraction unless a ``test_good/`` folder exists.
elpv         the built-in ELPV solar-cell set (see :mod:`iadkit.data.elpv`).
===========  ===========================================================================

A root may hold several category folders or be a single category folder itself.

Every anomalous test image must have its ground-truth mask: a missing mask is an error by
default, because pixel metrics computed without it would silently be wrong. Pass
``allow_missing_masks=True`` to keep such images without a mask (a warning says how many).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iadkit.data.io import IMAGE_EXTENSIONS, is_image_file
from iadkit.errors import DatasetLayoutError
from iadkit.types import ANOMALOUS, GOOD, Sample

LAYOUTS: dict[str, str] = {
    "mvtec": "MVTec AD / MPDD / iadkit synthetic: <cat>/train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png",
    "btad": "BTAD: <cat>/train/ok, test/ok|ko, ground_truth/ko/<stem>.png|bmp",
    "loco": "MVTec LOCO AD: mvtec + validation/good, ground_truth/<defect>/<stem>/000.png... (merged)",
    "mvtec3d": "MVTec 3D-AD: <cat>/train/good/rgb (+ xyz point maps), test/<defect>/rgb, test/<defect>/gt",
    "visa": "VisA: split_csv/1cls.csv (object, split, label, image, mask)",
    "kolektor2": "KolektorSDD2: train|test/<id>.png + <id>_GT.png (label from the mask)",
    "folder": "plain folders: good/, optional defect/ (or defect/<type>/), optional mask/ matched by stem",
    "elpv": "built-in ELPV solar cells (source 'elpv'), image-level labels only",
}
"""Layout names accepted by ``load_dataset(layout=...)`` with a one-line description."""

MASK_SUFFIXES: tuple[str, ...] = ("_mask", "_GT", "_gt", "_label", "_Mask")
"""Stem suffixes that mark a mask file (``003_mask.png`` belongs to ``003.png``)."""


# --------------------------------------------------------------------------------------
# result type
# --------------------------------------------------------------------------------------
@dataclass
class DatasetSplit:
    """One category of a dataset, split for anomaly detection.

    ``train`` holds good images only (the unsupervised setting). ``test`` holds good and
    anomalous images. ``train_anomalous`` holds labelled defect images from the training
    part where a dataset provides them (KolektorSDD2, VisA's 2-class splits), for
    semi-/supervised settings; unsupervised methods ignore it. ``validation`` holds the
    good validation images of MVTec LOCO and MVTec 3D-AD.
    """

    name: str
    category: str
    train: list[Sample]
    test: list[Sample]
    train_anomalous: list[Sample] = field(default_factory=list)
    validation: list[Sample] = field(default_factory=list)
    layout: str = ""
    root: str = ""
    license: str | None = None
    notes: str = ""

    @property
    def test_good(self) -> list[Sample]:
        return [s for s in self.test if s.label == GOOD]

    @property
    def test_anomalous(self) -> list[Sample]:
        return [s for s in self.test if s.label == ANOMALOUS]

    @property
    def has_masks(self) -> bool:
        """True when every anomalous test image has a ground-truth mask (pixel metrics possible)."""
        anomalous = self.test_anomalous
        return bool(anomalous) and all(s.has_mask for s in anomalous)

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect_type for s in self.test_anomalous})

    def splits(self) -> dict[str, list[Sample]]:
        """The non-empty parts by name: train, validation, test, train_anomalous."""
        parts = {
            "train": self.train,
            "validation": self.validation,
            "test": self.test,
            "train_anomalous": self.train_anomalous,
        }
        return {k: v for k, v in parts.items() if v}

    def counts(self) -> dict[str, dict[str, int]]:
        """``{part: {defect_type: n}}``, e.g. ``{"test": {"good": 20, "crack": 7}}``."""
        out: dict[str, dict[str, int]] = {}
        for part, samples in self.splits().items():
            per: dict[str, int] = {}
            for s in samples:
                key = s.defect_type or ("good" if s.label == GOOD else "anomalous")
                per[key] = per.get(key, 0) + 1
            out[part] = dict(sorted(per.items(), key=lambda kv: (kv[0] != "good", kv[0])))
        return out

    def __iter__(self) -> Iterator[list[Sample]]:
        """Unpack as ``train, test = load_dataset(...)`` (the unsupervised view)."""
        return iter((self.train, self.test))

    def __repr__(self) -> str:
        return (
            f"DatasetSplit(name={self.name!r}, category={self.category!r}, layout={self.layout!r}, "
            f"train={len(self.train)}, test={len(self.test)} ({len(self.test_anomalous)} anomalous), "
            f"train_anomalous={len(self.train_anomalous)}, validation={len(self.validation)}, "
            f"has_masks={self.has_masks})"
        )


# --------------------------------------------------------------------------------------
# helpers shared by the readers
# --------------------------------------------------------------------------------------
def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (not recursive), sorted by name; hidden files skipped."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


class MaskIndex:
    """Mask files of one folder, looked up by the stem of the image they belong to.

    ``003.png`` finds ``003_mask.*``, ``003_GT.*``, ``003_gt.*``, ``003_label.*`` or
    ``003.*`` (any image suffix), in that order of preference.
    """

    def __init__(self, folders: Iterable[Path]):
        self._by_stem: dict[str, Path] = {}
        for folder in folders:
            for p in list_images(folder):
                self._by_stem.setdefault(p.stem, p)

    def find(self, image_stem: str) -> Path | None:
        for suffix in MASK_SUFFIXES:
            hit = self._by_stem.get(image_stem + suffix)
            if hit is not None:
                return hit
        return self._by_stem.get(image_stem)

    def __len__(self) -> int:
        return len(self._by_stem)


def handle_missing_masks(missing: Sequence[str], allow_missing_masks: bool, where: str) -> None:
    """Missing masks of anomalous images: error by default, a warning when allowed."""
    if not missing:
        return
    shown = "\n  ".join(missing[:5]) + ("\n  ..." if len(missing) > 5 else "")
    if not allow_missing_masks:
        raise DatasetLayoutError(
            f"{where}: {len(missing)} anomalous image(s) have no ground-truth mask, e.g.\n  {shown}\n"
            "Pixel metrics would be wrong without them. Add the masks (same stem, e.g. 003.png -> 003_mask.png), "
            "or keep these images without masks (image-level metrics only): allow_missing_masks=True in Python, "
            "--allow-missing-masks for `iadkit evaluate`, options: {allow_missing_masks: true} under the dataset "
            "of a benchmark grid."
        )
    warnings.warn(
        f"{where}: {len(missing)} anomalous image(s) kept without a ground-truth mask "
        f"(allow_missing_masks=True); pixel metrics are unavailable for them. First: {missing[0]}",
        UserWarning,
        stacklevel=3,
    )


def pick_category(categories: Sequence[str], category: str | None, root: Path | str, layout: str) -> str:
    """The requested category, checked; or the only one when none was requested."""
    if not categories:
        raise DatasetLayoutError(
            f"{root}: no category found for layout {layout!r}. Expected: {LAYOUTS.get(layout, '')}"
        )
    if category is None:
        if len(categories) == 1:
            return categories[0]
        raise DatasetLayoutError(
            f"{root} holds {len(categories)} categories ({', '.join(categories)}); choose one with category=... "
            "(CLI: --category)."
        )
    if category not in categories:
        raise DatasetLayoutError(
            f"{root}: category {category!r} not found ({layout} layout). Available: {', '.join(categories)}."
        )
    return category


def seeded_split(items: Sequence[Any], train_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Split ``items`` into (train, rest) reproducibly.

    ``floor(n * train_fraction)`` items go to train, chosen by
    ``numpy.random.default_rng(seed).permutation(n)``; both parts keep the input order.
    """
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    n = len(items)
    n_train = int(np.floor(n * train_fraction + 1e-9))
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(n)[:n_train]] = True
    return [x for x, c in zip(items, chosen) if c], [x for x, c in zip(items, chosen) if not c]


def require_dir(path: Path, what: str, expected: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"{path}: missing folder ({what}). Expected layout: {expected}")
    return path


def require_images(folder: Path, what: str) -> list[Path]:
    images = list_images(folder)
    if not images:
        raise DatasetLayoutError(
            f"{folder}: no images found ({what}); expected files ending in {', '.join(IMAGE_EXTENSIONS)}."
        )
    return images


# --------------------------------------------------------------------------------------
# detection and the single entry point
# --------------------------------------------------------------------------------------
def _resolve(source: str | Path) -> Path:
    root = Path(source).expanduser()
    if not root.exists():
        raise DatasetLayoutError(
            f"{source}: no such folder. Give a dataset folder, or a built-in source: 'elpv' "
            "(or create a synthetic set with `iadkit data synth --out DIR`)."
        )
    if not root.is_dir():
        raise DatasetLayoutError(f"{source}: is a file; give the dataset's folder.")
    return root.absolute()


SOURCE_SCHEMES: dict[str, str] = {**{k: k for k in LAYOUTS}, "synthetic": "mvtec", "mpdd": "mvtec"}
"""Prefixes accepted in a source string (``"mvtec:/data/mvtec_ad"``, ``"synthetic:./synth"``) -> layout."""


@dataclass(frozen=True)
class CustomSource:
    """A dataset source registered by code (private data, in-memory test sets)."""

    load: Callable[[str, str], DatasetSplit | tuple[list[Sample], list[Sample]]]  # (location, category)
    categories: Callable[[str], list[str]]  # location -> category names


_CUSTOM_SOURCES: dict[str, CustomSource] = {}


def register_source(
    scheme: str,
    load: Callable[[str, str], DatasetSplit | tuple[list[Sample], list[Sample]]],
    categories: Callable[[str], list[str]],
) -> None:
    """Serve sources ``"<scheme>"`` and ``"<scheme>:<location>"`` with these functions.

    `load(location, category)` returns a `DatasetSplit` or ``(train, test)`` sample lists;
    `categories(location)` the category names. Everything that names a dataset by a source
    string (`load_dataset`, `list_categories`, the benchmark grid, the CLI) then accepts it.
    A module listed in a benchmark's ``imports`` can register private data this way.
    """
    if scheme.lower() in SOURCE_SCHEMES:
        raise ValueError(f"source scheme {scheme!r} is built in; choose another name")
    _CUSTOM_SOURCES[scheme.lower()] = CustomSource(load=load, categories=categories)


def _custom(source: str | Path) -> tuple[CustomSource, str] | None:
    if not isinstance(source, str):
        return None
    scheme, _, location = source.partition(":")
    found = _CUSTOM_SOURCES.get(scheme.lower())
    return (found, location) if found is not None else None


def parse_source(source: str | Path, layout: str = "auto") -> tuple[str, str | Path]:
    """Split ``"<scheme>:<location>"`` into (layout, location); plain paths keep ``layout``.

    ``"elpv"`` is the built-in ELPV set; ``"synthetic:DIR"`` is a folder written by
    ``iadkit data synth`` (MVTec layout, or the LOCO / 3D-AD layout its ``synthetic.json``
    records). A one-letter prefix is a Windows drive, not a scheme.
    """
    if isinstance(source, str):
        text = source.strip()
        if text.lower() in ("elpv", "elpv:", "elpv://"):
            return _merge_layout("elpv", layout, source), "elpv"
        scheme, sep, location = text.partition(":")
        if sep and len(scheme) > 1 and scheme.lower() in SOURCE_SCHEMES:
            forced = SOURCE_SCHEMES[scheme.lower()]
            location = location[2:] if location.startswith("//") else location
            if not location:
                raise DatasetLayoutError(f"{source!r}: give a folder after '{scheme}:', e.g. '{scheme}:./data'.")
            if forced == "mvtec" and scheme.lower() == "synthetic" and not Path(location).expanduser().exists():
                raise DatasetLayoutError(
                    f"{location}: no synthetic dataset there yet. Create it with `iadkit data synth --out {location}` "
                    "(or iadkit.data.synthetic.generate)."
                )
            if scheme.lower() == "synthetic":
                forced = _synthetic_layout(Path(location).expanduser())
            return _merge_layout(forced, layout, source), location
    return layout, source


def _synthetic_layout(root: Path) -> str:
    """The layout a synthetic folder was written in (its synthetic.json), "mvtec" by default."""
    import json

    try:
        recorded = json.loads((root / "synthetic.json").read_text(encoding="utf-8")).get("layout")
    except (OSError, ValueError, AttributeError):
        return "mvtec"
    return {"mvtec_loco_ad": "loco", "mvtec_3d_ad": "mvtec3d"}.get(recorded, "mvtec")


def _merge_layout(from_source: str, given: str, source: str | Path) -> str:
    if given not in ("auto", from_source):
        raise DatasetLayoutError(f"source {source!r} names layout {from_source!r} but layout={given!r} was given.")
    return from_source


def detect_layout(source: str | Path) -> str:
    """The layout name of a dataset folder (a key of :data:`LAYOUTS`), from its structure."""
    layout, source = parse_source(source)
    if layout != "auto":
        return layout
    root = _resolve(source)
    from iadkit.data import folder, kolektor, mvtec, visa

    if visa.looks_like_visa(root):
        return "visa"
    if kolektor.looks_like_kolektor2(root):
        return "kolektor2"
    variant = mvtec.detect_variant(root)
    if variant is not None:
        return variant
    if folder.looks_like_folder(root):
        return "folder"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:12]
    raise DatasetLayoutError(
        f"{root}: layout not recognised (it holds: {', '.join(entries) or 'nothing'}). Expected one of:\n  "
        + "\n  ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
        + "\nOr name the layout: layout=... in Python, --layout in the CLI, or a source 'LAYOUT:FOLDER' "
        "(e.g. 'mvtec:./data', also in benchmark grids)."
    )


def _reader(layout: str) -> tuple[Callable[..., list[str]], Callable[..., DatasetSplit]]:
    if layout not in LAYOUTS:
        raise DatasetLayoutError(f"unknown layout {layout!r}; choose one of: auto, {', '.join(LAYOUTS)}")
    if layout in ("mvtec", "btad", "loco", "mvtec3d"):
        from iadkit.data import mvtec

        def load(root: Path, category: str | None, **opts: Any) -> DatasetSplit:
            return mvtec.load_mvtec(root, category, variant=layout, **opts)

        return (lambda root: mvtec.list_mvtec_categories(root, variant=layout)), load
    if layout == "visa":
        from iadkit.data import visa

        return visa.list_visa_categories, visa.load_visa
    if layout == "kolektor2":
        from iadkit.data import kolektor

        return kolektor.list_kolektor2_categories, kolektor.load_kolektor2
    if layout == "folder":
        from iadkit.data import folder

        return folder.list_folder_categories, folder.load_folder
    from iadkit.data import elpv

    return (lambda root: list(elpv.ELPV_CATEGORIES)), (
        lambda root, category, **o: elpv.load_elpv(category or "all", **o)
    )


def layout_options(layout: str) -> list[str]:
    from iadkit.data import elpv, folder, kolektor, mvtec, visa

    loaders: dict[str, Callable[..., Any]] = {
        "visa": visa.load_visa,
        "kolektor2": kolektor.load_kolektor2,
        "folder": folder.load_folder,
        "elpv": elpv.load_elpv,
    }
    fn = loaders.get(layout, mvtec.load_mvtec)
    skip = {"root", "category", "variant"}
    return [n for n, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY and n not in skip]


def list_categories(source: str | Path, layout: str = "auto") -> list[str]:
    """Category names found in ``source`` (sorted), e.g. ``['bottle', 'cable', ...]``."""
    custom = _custom(source)
    if custom is not None:
        return list(custom[0].categories(custom[1]))
    layout, source = parse_source(source, layout)
    if layout == "auto":
        layout = detect_layout(source)
    list_fn, _ = _reader(layout)
    root: Any = source if layout == "elpv" else _resolve(source)
    return list_fn(root)


def load_dataset(source: str | Path, category: str | None = None, layout: str = "auto", **options: Any) -> DatasetSplit:
    """Load one category of a dataset as a :class:`DatasetSplit`.

    ``source``: a dataset folder, ``"<layout>:<folder>"`` (e.g. ``"mvtec:/data/mvtec_ad"``,
    ``"synthetic:./synth"``), or ``"elpv"`` for the built-in ELPV set. ``category``
    may be omitted when the source holds one category (ELPV defaults to ``"all"``).
    ``layout``: ``"auto"`` (detected from the folder) or a key of :data:`LAYOUTS`.
    ``options`` go to the layout's reader, e.g. ``allow_missing_masks=True`` (mvtec family,
    visa, folder), ``train_fraction`` / ``seed`` (folder, elpv), ``anomalous_min_proba`` (elpv),
    ``split_file`` (visa).

    Example::

        split = load_dataset("data/mvtec_ad", category="bottle")
        split.train[0].load_image()       # HxWx3 uint8
        split.test_anomalous[0].load_mask()
        train, test = load_dataset("synthetic:./synth", category="fabric")   # unpacks too
    """
    custom = _custom(source)
    if custom is not None:
        src, location = custom
        loaded = src.load(location, category or "")
        if isinstance(loaded, DatasetSplit):
            return loaded
        train, test = loaded
        return DatasetSplit(
            name=str(source), category=category or "", train=list(train), test=list(test), layout="custom"
        )
    layout, source = parse_source(source, layout)
    if layout == "auto":
        layout = detect_layout(source)
    _, load_fn = _reader(layout)
    allowed = layout_options(layout)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"option(s) {', '.join(map(repr, unknown))} not understood by the {layout!r} reader; "
            f"it accepts: {', '.join(allowed) or 'no options'}"
        )
    root: Any = source if layout == "elpv" else _resolve(source)
    return load_fn(root, category, **options)
