"""Pixel-level metrics: AUROC, AP and F1-max over all test pixels pooled.

Definition (FIELD.md section 3, IM-IAD): the anomaly maps and ground-truth masks of all test
images - good images included, whose masks are all zero - are flattened together into one
set of labelled scores, and sklearn's ROC-AUC / average precision are computed on it. We
compute the same numbers exactly (ties included), but without sklearn, because sklearn on
tens of millions of pixels takes over a gigabyte and tens of seconds. How: the normal pixels'
scores are copied into one buffer and sorted in place, the defect pixels' scores (usually a
few percent) likewise, and the metrics follow from binary searches between the two sorted
arrays (see `_curves.py`). Extra memory is about one score per pixel (4 bytes in float32)
plus small per-image temporaries; the maps are never concatenated or converted to float64.

The same sorted arrays, plus each defect pixel's connected-component size, give AUPRO
(`aupro.py`), so `pixel_metrics` prepares them once for all pixel metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from iadkit.metrics._curves import BinarySummary, summarize_sorted
from iadkit.metrics._inputs import ArrayLike, check_no_nan_sorted, pixel_inputs
from iadkit.metrics.image import F1Max, require_defined

# 8-connectivity, as in IM-IAD's au_pro.py: two defect pixels touching at a corner are one defect.
EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=int)


@dataclass(frozen=True)
class PixelScores:
    """Sorted pixel scores of a test set, the input of every pixel-level metric.

    neg: ascending scores of all normal pixels (mask 0) of all images.
    pos: ascending scores of all defect pixels (mask 1).
    pos_weight: for each entry of `pos`, 1 / size of the ground-truth connected component
        (8-connectivity, per image) it belongs to; None when regions were not computed.
    n_regions: number of connected components over all images.
    """

    neg: np.ndarray
    pos: np.ndarray
    pos_weight: np.ndarray | None
    n_regions: int

    @classmethod
    def from_maps(cls, maps: ArrayLike, masks: ArrayLike, *, regions: bool = True) -> PixelScores:
        """Collect and sort the scores of `maps` ([N,H,W], [N,1,H,W], [H,W] or a list of [H,W],
        numpy or torch) split by `masks` (same shapes; bool or 0/1).

        With `regions=True` the masks' connected components are labelled too (needed by
        AUPRO only). float32 maps stay float32; other dtypes are compared in float64.
        """
        map_list, mask_list, dtype = pixel_inputs(maps, masks)
        n_pos = sum(int(np.count_nonzero(g)) for g in mask_list)
        n_all = sum(int(m.size) for m in map_list)
        neg = np.empty(n_all - n_pos, dtype=dtype)
        pos = np.empty(n_pos, dtype=dtype)
        weight = np.empty(n_pos, dtype=np.float64) if regions else None
        n_regions = 0
        i_neg = i_pos = 0
        for m, g in zip(map_list, mask_list):
            k = int(np.count_nonzero(g))
            neg[i_neg : i_neg + m.size - k] = m[~g]
            i_neg += m.size - k
            if k:
                pos[i_pos : i_pos + k] = m[g]
                if weight is not None:
                    labelled, n_comp = ndimage.label(g, structure=EIGHT_CONNECTIVITY)
                    ids = labelled[g]  # same (row-major) order as m[g]
                    sizes = np.bincount(ids)
                    weight[i_pos : i_pos + k] = 1.0 / sizes[ids]
                    n_regions += int(n_comp)
                i_pos += k
        neg.sort()
        if weight is not None:
            order = np.argsort(pos, kind="stable")
            pos, weight = pos[order], weight[order]
        else:
            pos.sort()
        check_no_nan_sorted([neg, pos], map_list)
        return cls(neg=neg, pos=pos, pos_weight=weight, n_regions=n_regions)

    def summary(self) -> BinarySummary:
        """Exact pixel AUROC / AP / F1-max (NaN where undefined)."""
        return summarize_sorted(self.neg, self.pos)


def _summary(maps: ArrayLike, masks: ArrayLike) -> BinarySummary:
    return PixelScores.from_maps(maps, masks, regions=False).summary()


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    """ROC-AUC over all pixels of all maps pooled (good images included)."""
    summary = _summary(maps, masks)
    require_defined(summary, "AUROC", "pixel")
    return summary.auroc


def pixel_ap(maps: ArrayLike, masks: ArrayLike) -> float:
    """Average precision (sklearn's definition) over all pixels pooled."""
    summary = _summary(maps, masks)
    require_defined(summary, "AP", "pixel")
    return summary.ap


def pixel_f1_max(maps: ArrayLike, masks: ArrayLike) -> F1Max:
    """Best pixel F1 over thresholds and the lowest threshold attaining it (score >= threshold)."""
    summary = _summary(maps, masks)
    require_defined(summary, "F1-max", "pixel")
    return F1Max(summary.f1_max, summary.f1_threshold)


def pixel_metrics(
    maps: ArrayLike, masks: ArrayLike, *, aupro_variant: str = "exact", fpr_limit: float = 0.3
) -> dict[str, float]:
    """pixel_auroc, pixel_ap, pixel_f1_max, pixel_f1_threshold and the AUPRO key(s), from
    one preparation of the pixels.

    aupro_variant: "exact" -> key "aupro" (every distinct threshold); "100" -> key
    "aupro_100" (IM-IAD's 100 thresholds); "both" -> both keys; "none" -> neither (skips
    the connected-component labelling). See `aupro.py` for what each variant computes.
    """
    from iadkit.metrics.aupro import AUPRO_VARIANTS, aupro_exact_from, aupro_thresholds_from

    if aupro_variant not in AUPRO_VARIANTS:
        raise ValueError(f"aupro_variant must be one of {AUPRO_VARIANTS}, got {aupro_variant!r}")
    px = PixelScores.from_maps(maps, masks, regions=aupro_variant != "none")
    summary = px.summary()
    require_defined(summary, "AUROC", "pixel")
    out = {
        "pixel_auroc": summary.auroc,
        "pixel_ap": summary.ap,
        "pixel_f1_max": summary.f1_max,
        "pixel_f1_threshold": summary.f1_threshold,
    }
    if aupro_variant in ("exact", "both"):
        out["aupro"] = aupro_exact_from(px, fpr_limit=fpr_limit)
    if aupro_variant in ("100", "both"):
        out["aupro_100"] = aupro_thresholds_from(px, fpr_limit=fpr_limit)
    return out
