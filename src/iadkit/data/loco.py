"""MVTec LOCO AD specifics: ``defects_config.json``, per-defect ground-truth regions, samples.

MVTec LOCO AD stores, per anomalous test image, a folder of masks
``ground_truth/<kind>/<stem>/000.png, 001.png, ...``: one file per defect, whose only
nonzero pixel value identifies the defect type in the category's ``defects_config.json``::

    [{"defect_name": "missing_connector", "pixel_value": 255,
      "saturation_threshold": 1.0, "relative_saturation": true}, ...]

(the format read by the official evaluation, ``DefectsConfig.create_from_list``). The
saturation thresholds make sPRO (:mod:`iadkit.metrics.spro`): a relative threshold is a
fraction in (0, 1] of the defect's area, an absolute one a whole number of pixels.

Test images keep their folder name as ``defect_type`` ("good", "logical_anomalies",
"structural_anomalies"), which is what per-type image AUROC and AUC-sPRO group by
(:func:`iadkit.metrics.image_auroc_by_type`, :func:`iadkit.metrics.auc_spro_by_type`).
The loader (:func:`iadkit.data.mvtec.load_mvtec`, layout ``loco``) returns test samples as
:class:`LocoSample`, which reads its regions with their saturation areas::

    split = load_dataset("mvtec_loco", "juice_bottle")
    regions = [s.load_regions() for s in split.test]       # [] for good images
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iadkit.data.io import read_image
from iadkit.errors import DatasetLayoutError, ImageReadError
from iadkit.metrics.spro import SaturatedRegion, saturation_area
from iadkit.types import GOOD, Sample

DEFECTS_CONFIG = "defects_config.json"
LOCO_KINDS = ("logical_anomalies", "structural_anomalies")


@dataclass(frozen=True)
class DefectConfig:
    """One entry of ``defects_config.json``.

    Parameters
    ----------
    defect_name
        E.g. ``"missing_connector"``.
    pixel_value
        The value (1-255) of this defect's pixels in its mask file.
    saturation_threshold
        Fraction of the defect's area (relative) or number of pixels (absolute) at which the
        defect counts as fully detected.
    relative_saturation
        Whether `saturation_threshold` is relative.
    """

    defect_name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool

    def saturation_area(self, defect_area: int) -> int:
        """Saturation area of one defect of `defect_area` pixels (LOCO's rule)."""
        return saturation_area(defect_area, self.saturation_threshold, self.relative_saturation)

    def region(self, mask: np.ndarray) -> SaturatedRegion:
        """The sPRO region of one defect mask (HxW bool)."""
        return SaturatedRegion(mask, self.saturation_area(int(np.count_nonzero(mask))), self.defect_name)


@dataclass(frozen=True)
class DefectsConfig:
    """A category's ``defects_config.json``: its defect types by pixel value.

    Parameters
    ----------
    entries
        The defect types, in file order.
    path
        Where it was read from ("" when built in memory), for error messages.
    """

    entries: tuple[DefectConfig, ...]
    path: str = ""

    def __post_init__(self) -> None:
        values = [e.pixel_value for e in self.entries]
        dup = sorted({v for v in values if values.count(v) > 1})
        if dup:
            raise DatasetLayoutError(f"{self.path or 'defects config'}: pixel values {dup} are listed more than once")

    def __getitem__(self, pixel_value: int) -> DefectConfig:
        for e in self.entries:
            if e.pixel_value == pixel_value:
                return e
        raise KeyError(pixel_value)

    def __contains__(self, pixel_value: object) -> bool:
        return any(e.pixel_value == pixel_value for e in self.entries)

    def __iter__(self) -> Iterator[DefectConfig]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        return [e.defect_name for e in self.entries]

    def to_list(self) -> list[dict[str, Any]]:
        """The JSON form (what ``defects_config.json`` holds)."""
        return [
            {
                "defect_name": e.defect_name,
                "pixel_value": e.pixel_value,
                "saturation_threshold": e.saturation_threshold,
                "relative_saturation": e.relative_saturation,
            }
            for e in self.entries
        ]

    @classmethod
    def from_list(cls, items: Any, path: str = "") -> DefectsConfig:
        """Validate the parsed JSON (a list of objects); errors name `path` and the entry."""
        where = path or "defects config"
        if not isinstance(items, list) or not items:
            raise DatasetLayoutError(
                f"{where}: expected a non-empty JSON list of defect entries "
                '({"defect_name", "pixel_value", "saturation_threshold", "relative_saturation"}), '
                f"got {type(items).__name__}"
            )
        entries = []
        for i, item in enumerate(items):
            entries.append(_entry(item, f"{where}: entry {i}"))
        return cls(tuple(entries), path)


def _entry(item: Any, where: str) -> DefectConfig:
    keys = ("defect_name", "pixel_value", "saturation_threshold", "relative_saturation")
    if not isinstance(item, dict):
        raise DatasetLayoutError(f"{where} must be a JSON object with keys {', '.join(keys)}, got {item!r}")
    missing = [k for k in keys if k not in item]
    if missing:
        raise DatasetLayoutError(f"{where} ({item.get('defect_name', '?')}) lacks {', '.join(missing)}")
    name, value, threshold, relative = (item[k] for k in keys)
    if not isinstance(name, str) or not name:
        raise DatasetLayoutError(f"{where}: defect_name must be a non-empty string, got {name!r}")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
        raise DatasetLayoutError(f"{where} ({name}): pixel_value must be an integer from 1 to 255, got {value!r}")
    if not isinstance(relative, bool):
        raise DatasetLayoutError(f"{where} ({name}): relative_saturation must be true or false, got {relative!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise DatasetLayoutError(f"{where} ({name}): saturation_threshold must be a number, got {threshold!r}")
    if relative and not 0.0 < threshold <= 1.0:
        raise DatasetLayoutError(
            f"{where} ({name}): a relative saturation_threshold is a fraction of the defect's area in (0, 1], got {threshold}"
        )
    if not relative and (threshold < 1 or threshold != int(threshold)):
        raise DatasetLayoutError(
            f"{where} ({name}): an absolute saturation_threshold is a whole number of pixels >= 1, got {threshold}"
        )
    return DefectConfig(name, int(value), float(threshold) if relative else int(threshold), relative)


def read_defects_config(path: str | Path) -> DefectsConfig:
    """Read and validate a ``defects_config.json``.

    Parameters
    ----------
    path
        The file (``<category>/defects_config.json`` in MVTec LOCO AD).

    A missing, unreadable or malformed file raises DatasetLayoutError naming the file, the
    entry and what is wrong.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetLayoutError(f"{p}: no such file (MVTec LOCO ships one defects_config.json per category)") from None
    except OSError as exc:
        raise DatasetLayoutError(f"{p}: cannot read ({exc})") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetLayoutError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    return DefectsConfig.from_list(items, str(p))


def read_defect_mask(path: str | Path, expected_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
    """One LOCO mask file: (HxW bool mask, its pixel value).

    Parameters
    ----------
    path
        ``ground_truth/<kind>/<stem>/NNN.png``.
    expected_shape
        (H, W) of the image; a different size is an error.

    The file must hold zero plus exactly one other value (the official
    ``GroundTruthChannel.create_from_integer_array`` rule); JPEG is refused.
    """
    p = Path(path)
    if p.suffix.lower() in (".jpg", ".jpeg"):
        raise ImageReadError(f"{p}: masks must be lossless (PNG); a JPEG blurs the defect's pixel value")
    arr = read_image(p)
    if arr.shape[2] != 1 and not (
        np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    ):
        raise ImageReadError(f"{p}: colour mask with differing channels; a LOCO mask is a grayscale PNG")
    values = arr[..., 0]
    found = np.unique(values)
    positive = found[found != 0]
    if positive.size != 1:
        what = (
            "no defect pixel (all zero)"
            if positive.size == 0
            else f"{positive.size} defect values {positive[:6].tolist()}"
        )
        raise ImageReadError(
            f"{p}: a LOCO mask holds exactly one defect, i.e. zero plus one pixel value; this one has {what}"
        )
    mask = values != 0
    if expected_shape is not None and tuple(mask.shape) != tuple(expected_shape):
        raise ImageReadError(
            f"{p}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is {expected_shape[1]}x{expected_shape[0]}"
        )
    return mask, int(positive[0])


def load_regions(
    mask_paths: Sequence[str], config: DefectsConfig | None, shape: tuple[int, int] | None = None, *, where: str = ""
) -> list[SaturatedRegion]:
    """The sPRO regions of one image from its mask files and the category's config.

    Parameters
    ----------
    mask_paths
        The image's mask files, one per defect.
    config
        The category's defects config; None raises a DatasetLayoutError when there are masks.
    shape
        (H, W) every mask must have.
    where
        What to name in error messages (e.g. the image path).
    """
    if not mask_paths:
        return []
    if config is None:
        raise DatasetLayoutError(
            f"{where or mask_paths[0]}: no {DEFECTS_CONFIG} was found for this category, so the defects' saturation "
            f"thresholds are unknown; put the dataset's {DEFECTS_CONFIG} in the category folder"
        )
    regions = []
    for p in mask_paths:
        mask, value = read_defect_mask(p, shape)
        if value not in config:
            raise DatasetLayoutError(
                f"{p}: pixel value {value} is not listed in {config.path or DEFECTS_CONFIG} "
                f"(it lists {sorted(e.pixel_value for e in config)}); the mask and the config do not belong together"
            )
        regions.append(config[value].region(mask))
    return regions


@dataclass(frozen=True)
class LocoSample(Sample):
    """A test image of MVTec LOCO AD: a `Sample` that also reads its per-defect regions.

    ``mask_paths`` (one file per defect) are merged by ``load_mask`` for the usual pixel
    metrics; :meth:`load_regions` keeps them apart, each with its saturation area, for sPRO.
    `defects` is the category's ``defects_config.json`` (None when the folder has none).
    """

    defects: DefectsConfig | None = field(default=None, repr=False, compare=False)

    def load_regions(self, shape: tuple[int, int] | None = None) -> list[SaturatedRegion]:
        """One :class:`SaturatedRegion` per defect (an empty list for a good image).

        `shape` (H, W) is checked against every mask, as in ``load_mask``.
        """
        if self.label == GOOD:
            return []
        return load_regions(self.mask_paths, self.defects, shape, where=self.path)


__all__ = [
    "DEFECTS_CONFIG",
    "LOCO_KINDS",
    "DefectConfig",
    "DefectsConfig",
    "LocoSample",
    "load_regions",
    "read_defect_mask",
    "read_defects_config",
]
