"""AUPRO: the area under the per-region-overlap curve up to a false-positive rate of 0.3.

Why this metric exists: pixel AUROC is dominated by large defects, because every pixel
counts once. PRO instead averages, over the ground-truth defects, the fraction of each defect
that is detected, so a 10-pixel scratch weighs as much as a 10,000-pixel stain.

Common to both variants (FIELD.md section 3, IM-IAD's `metric/mvtec3d/au_pro.py`, itself
MVTec's evaluation code):
- ground-truth regions are the connected components of each mask with 8-connectivity
  (`scipy.ndimage.label` with a 3x3 all-ones structure); regions never span two images;
- FPR(t) = fraction of all normal pixels of all test images (good images included)
  scoring above t;
- PRO(t) = mean over ALL regions C_k of |{p in C_k : s(p) > t}| / |C_k|, each region
  weighted equally whatever its size;
- AUPRO = (integral of PRO d(FPR) from FPR 0 to `fpr_limit`, trapezoid rule, the curve
  linearly interpolated at `fpr_limit`) / `fpr_limit`, in [0, 1].

The two variants differ only in which thresholds t make the curve:

`aupro_exact` ("exact", key ``aupro``) uses every distinct score value, so the result does
not depend on a sampling choice. The curve is piecewise: lowering t past a score value v
moves the point from (FPR(> v), PRO(> v)) to (FPR(>= v), PRO(>= v)). If v is held by normal
pixels only, the step is horizontal; by defect pixels only, vertical (no area); by both, it
is a straight diagonal, the expected curve under random tie-breaking - exactly how MVTec's
own exact evaluation (`pro_curve_util.compute_pro`, cumulative sums over all sorted pixels
keeping the last pixel of each tie group) draws it. The curve starts at (0, 0) and ends at
(1, 1). Computation: the normal pixels' scores are sorted once; for each normal pixel within
the top `fpr_limit` fraction, binary searches give its tie group's FPR step and the PRO
before/after the group (from suffix sums of the defect pixels' weights 1/(K |C_k|) sorted by
score); its share of that segment, clipped at `fpr_limit`, is added up. Cost: one sort of
the normal pixels (shared with the other pixel metrics) plus O(fpr_limit N log N).

`aupro_thresholds` ("100", key ``aupro_100``) reproduces IM-IAD's published procedure for
comparability with its tables: sort the normal pixels' scores (N of them); take
`num_thresholds` (100) positions pos = `np.linspace(0, N-1, 100, dtype=int)`; at each,
t = sorted[pos], FPR = 1 - (pos+1)/N (the nominal fraction above position pos, which
ignores ties) and PRO(t) with strict "> t"; prepend the point (1, 1); order the points by
increasing FPR; integrate with the trapezoid rule up to `fpr_limit`, adding a trapezoid to
the curve's linear interpolation at `fpr_limit` when no point lies exactly there; divide by
`fpr_limit`. With 100 thresholds only about 30 points lie below FPR 0.3, so this variant
differs from the exact one by up to a few thousandths on smooth maps, and much more when
many normal pixels share one score (e.g. maps clipped at 0), where its nominal FPR is not the
real one.
"""

from __future__ import annotations

import math

import numpy as np

from iadkit.errors import MetricUndefinedError
from iadkit.metrics._inputs import ArrayLike, iter_chunks
from iadkit.metrics.pixel import PixelScores

AUPRO_VARIANTS = ("exact", "100", "both", "none")
IM_IAD_NUM_THRESHOLDS = 100
DEFAULT_FPR_LIMIT = 0.3
_CHUNK = 1 << 18


def _check(px: PixelScores, fpr_limit: float, metric: str = "AUPRO") -> np.ndarray:
    """Validate and return S: S[i] = PRO contributed by defect pixels pos[i:], S[P] = 0.

    `metric` names the metric in error messages (sPRO reuses this machinery with other
    weights, see `spro.py`).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if px.pos_weight is None:
        raise ValueError(f"these PixelScores were prepared with regions=False; {metric} needs regions=True")
    if px.n_regions == 0:
        raise MetricUndefinedError(
            f"{metric} is undefined: the masks contain no defect pixel, so there is no region to overlap; "
            "evaluate on a test set with annotated defects"
        )
    if px.neg.size == 0:
        raise MetricUndefinedError(
            f"{metric} is undefined: every pixel is a defect pixel, so there is no false-positive rate; "
            "include normal pixels (e.g. good test images)"
        )
    suffix = np.zeros(px.pos.size + 1, dtype=np.float64)
    # Summed from the highest score down so that S[0] (PRO at the lowest threshold) is ~1.
    suffix[:-1] = np.cumsum(px.pos_weight[::-1])[::-1] / px.n_regions
    return suffix


def aupro_exact_from(px: PixelScores, *, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """Exact AUPRO (every distinct threshold) from prepared pixel scores; see the module doc."""
    return exact_area_from(px, fpr_limit, "AUPRO")


def exact_area_from(px: PixelScores, fpr_limit: float, metric: str) -> float:
    """Normalised area under the exact overlap curve of `px` up to `fpr_limit`.

    The overlap at threshold t is sum(pos_weight[pos > t]) / n_regions: per-region overlap
    for AUPRO (weights 1/|C_k|), saturated overlap for sPRO (`spro.py`). Shared so that both
    metrics integrate their curves - ties included - in exactly the same way.
    """
    suffix = _check(px, fpr_limit, metric)
    neg, pos = px.neg, px.pos
    n = neg.size
    limit = fpr_limit * n  # the FPR limit counted in normal pixels
    # Normal pixel at ascending index i has rank r = n-1-i from the top; its slice of the curve
    # spans FPR [r/n, (r+1)/n], so only ranks r < limit contribute.
    i_min = max(0, n - math.ceil(limit))
    area = 0.0  # in units of (normal pixels) x PRO
    for sl in iter_chunks(n - i_min, _CHUNK):
        i = np.arange(i_min + sl.start, i_min + sl.stop)
        q = neg[i]
        first = np.searchsorted(neg, q, side="left")  # tie group of q: neg[first:last+1]
        last = np.searchsorted(neg, q, side="right") - 1
        above = n - 1 - last  # normal pixels strictly above q: the group's segment starts there
        group = (last - first + 1).astype(np.float64)
        pro_gt = suffix[np.searchsorted(pos, q, side="right")]  # PRO(> q)
        pro_ge = suffix[np.searchsorted(pos, q, side="left")]  # PRO(>= q)
        r = (n - 1 - i).astype(np.float64)
        r_end = np.minimum(r + 1.0, limit)
        # Along the group's straight segment, PRO goes from pro_gt to pro_ge linearly in rank.
        y0 = pro_gt + (pro_ge - pro_gt) * ((r - above) / group)
        y1 = pro_gt + (pro_ge - pro_gt) * ((r_end - above) / group)
        area += float(np.sum((r_end - r) * (y0 + y1))) * 0.5
    return area / n / fpr_limit


def trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) from x[0] to `x_max`, with x ascending (repeats allowed,
    their order kept); when `x_max` is not a sample, the segment that crosses it is cut at its
    linear interpolation, as in MVTec's and IM-IAD's evaluation code."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    correction = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max, side="right"))
        if not 0 < ins < x.size:
            raise ValueError(f"x_max={x_max} lies outside the curve's range [{x[0]}, {x[-1]}]")
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1]))) + correction


def pro_curve_thresholds_from(
    px: PixelScores, *, num_thresholds: int = IM_IAD_NUM_THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """IM-IAD's sampled PRO curve: (FPR ascending, PRO), (1, 1) included; see the module doc."""
    suffix = _check(px, DEFAULT_FPR_LIMIT)
    if num_thresholds < 1:
        raise ValueError(f"num_thresholds must be >= 1, got {num_thresholds}")
    n = px.neg.size
    positions = np.linspace(0, n - 1, num=num_thresholds, dtype=int)
    thresholds = px.neg[positions]
    fpr = 1.0 - (positions + 1) / n
    pro = suffix[np.searchsorted(px.pos, thresholds, side="right")]  # strictly above t
    fprs = np.concatenate([[1.0], fpr])[::-1]
    pros = np.concatenate([[1.0], pro])[::-1]
    return fprs, pros


def aupro_thresholds_from(
    px: PixelScores, *, fpr_limit: float = DEFAULT_FPR_LIMIT, num_thresholds: int = IM_IAD_NUM_THRESHOLDS
) -> float:
    """IM-IAD's 100-threshold AUPRO from prepared pixel scores; see the module doc."""
    _check(px, fpr_limit)
    fprs, pros = pro_curve_thresholds_from(px, num_thresholds=num_thresholds)
    return trapezoid_to(fprs, pros, fpr_limit) / fpr_limit


def aupro_exact(maps: ArrayLike, masks: ArrayLike, *, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """Exact AUPRO of anomaly maps against ground-truth masks ([N,H,W] or lists of [H,W])."""
    return aupro_exact_from(PixelScores.from_maps(maps, masks), fpr_limit=fpr_limit)


def aupro_thresholds(
    maps: ArrayLike,
    masks: ArrayLike,
    *,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    num_thresholds: int = IM_IAD_NUM_THRESHOLDS,
) -> float:
    """AUPRO as IM-IAD computes it, from `num_thresholds` thresholds (100 by default)."""
    px = PixelScores.from_maps(maps, masks)
    return aupro_thresholds_from(px, fpr_limit=fpr_limit, num_thresholds=num_thresholds)


def pro_curve_thresholds(
    maps: ArrayLike, masks: ArrayLike, *, num_thresholds: int = IM_IAD_NUM_THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """IM-IAD's sampled PRO curve (FPR ascending, PRO), e.g. for plotting."""
    return pro_curve_thresholds_from(PixelScores.from_maps(maps, masks), num_thresholds=num_thresholds)


def aupro(maps: ArrayLike, masks: ArrayLike, *, fpr_limit: float = DEFAULT_FPR_LIMIT, variant: str = "exact") -> float:
    """AUPRO up to `fpr_limit`; variant "exact" (default, every threshold) or "100" (IM-IAD)."""
    if variant == "exact":
        return aupro_exact(maps, masks, fpr_limit=fpr_limit)
    if variant == "100":
        return aupro_thresholds(maps, masks, fpr_limit=fpr_limit)
    raise ValueError(f"variant must be 'exact' or '100', got {variant!r}")
