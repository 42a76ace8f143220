"""sPRO / AUC-sPRO: the saturated per-region overlap of MVTec LOCO AD, computed exactly.

Why this metric exists: a logical anomaly (a missing part, a wrong count) often has a ground
truth that is much larger than what a detector needs to mark to be right - e.g. the whole
area where a missing connector should be. PRO would ask for all of it; sPRO counts a defect
as fully found once a given number of its pixels is marked.

Definition (Bergmann et al., IJCV 2022; official evaluation ``mvtec_loco_ad_evaluation``,
``src/image.py`` and ``src/metrics.py``, also shipped in IM-IAD as
``metric/mvtec_loco/``):

- A ground-truth *region* is one defect: in MVTec LOCO one PNG file
  ``ground_truth/<kind>/<stem>/NNN.png``, whose single nonzero pixel value is the defect's
  id in ``defects_config.json``. Regions are **not** connected components: a region may
  consist of several blobs (e.g. both places of two swapped parts), and two regions of one
  image may overlap. This is the difference from AUPRO (``aupro.py``), whose regions are the
  8-connected components of the merged mask.
- Each region k saturates at s_k pixels (its *saturation area*): with
  ``relative_saturation`` true, s_k = floor(saturation_threshold * |G_k|); otherwise
  s_k = min(saturation_threshold, |G_k|) (``GroundTruthChannel.get_saturation_area``).
- sPRO(t) = mean over all regions k of min(|{p in G_k : s(p) > t}| / s_k, 1) (strict ">",
  ``AnomalyMap.get_binary_images``).
- FPR(t) = fraction of the pixels that lie in no region of their image (good images' pixels
  included) scoring above t (``get_fp_areas_for_thresholds``: the OR over all channels).
- AUC-sPRO(limit) = integral of sPRO d(FPR) from 0 to `limit` (trapezoid rule, the curve
  linearly interpolated at `limit`), divided by `limit`. LOCO's headline limit is 0.05;
  its evaluation reports 0.01, 0.05, 0.1, 0.3 and 1.0.

What is exact here, and how
---------------------------
The official code samples thresholds and refines them until neighbouring curve points are
closer than ``curve_max_distance`` (0.01 by default); we use every distinct score, which is
the limit of that refinement. The curve between the points just above and just below one
score value is the straight segment, as the official trapezoid over the refined points
draws it.

The trick that makes it exact and fast: for an integer s_k, min(TP_k / s_k, 1) =
min(TP_k, s_k) / s_k. The pixels of region k scoring above any t are always a prefix of
the region's pixels sorted by decreasing score (ties broken anyhow), so giving weight
1 / (K s_k) to the s_k highest-scoring pixels of region k and 0 to the others makes sPRO(t)
the plain sum of the weights of the region pixels above t. That is AUPRO's structure with
other weights, so the exact integration of ``aupro.py`` is reused unchanged.

Deviations (stated, both about degenerate inputs): a saturation area computed as 0 (a
relative threshold times a tiny region) would divide by zero in the official code; we use
1 pixel (any detected pixel saturates the region). An empty region is an error, as there.

Resolution: the official protocol resizes anomaly maps to each image's native resolution,
where the absolute saturation thresholds (in pixels) are defined; maps and region masks
must have the same shape here, so upsample the maps to the mask size first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from iadkit.errors import MetricUndefinedError
from iadkit.metrics._inputs import ArrayLike, _as_image_list, check_no_nan_sorted, score_dtype
from iadkit.metrics.aupro import exact_area_from
from iadkit.metrics.pixel import PixelScores

DEFAULT_SPRO_FPR_LIMIT = 0.05
"""The integration limit of MVTec LOCO's headline AUC-sPRO."""

LOCO_FPR_LIMITS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.3, 1.0)
"""The limits the official LOCO evaluation (and IM-IAD) reports."""


def saturation_area(defect_area: int, saturation_threshold: float, relative: bool) -> int:
    """Pixels that saturate a region of `defect_area` pixels (MVTec LOCO's rule).

    Parameters
    ----------
    defect_area
        Number of pixels of the region (>= 1).
    saturation_threshold
        A fraction in (0, 1] of the region when `relative`, else a pixel count (>= 1).
    relative
        ``relative_saturation`` of the defect's ``defects_config.json`` entry.

    Returns
    -------
    int
        floor(threshold * area) when relative, min(threshold, area) otherwise; at least 1
        (see the module docstring).
    """
    if defect_area < 1:
        raise ValueError(f"a region must have at least one pixel, got an area of {defect_area}")
    if relative:
        if not 0.0 < saturation_threshold <= 1.0:
            raise ValueError(f"a relative saturation threshold must be in (0, 1], got {saturation_threshold}")
        # int() truncation as in the official GroundTruthChannel.get_saturation_area
        s = int(saturation_threshold * defect_area)
    else:
        if saturation_threshold < 1 or saturation_threshold != math.floor(saturation_threshold):
            raise ValueError(
                f"an absolute saturation threshold must be a whole number of pixels >= 1, got {saturation_threshold}"
            )
        s = min(int(saturation_threshold), int(defect_area))
    return max(s, 1)


@dataclass(frozen=True)
class SaturatedRegion:
    """One ground-truth defect for sPRO.

    Parameters
    ----------
    mask
        HxW bool array, True on the defect's pixels (one LOCO mask file).
    saturation_area
        Number of detected pixels at which the defect counts as fully found
        (see :func:`saturation_area`); clipped to the region's size.
    name
        Optional defect name (``defect_name`` in ``defects_config.json``), for filtering.
    """

    mask: np.ndarray
    saturation_area: int
    name: str = ""

    @classmethod
    def with_rule(
        cls, mask: np.ndarray, saturation_threshold: float, relative: bool, name: str = ""
    ) -> SaturatedRegion:
        """A region whose saturation area follows LOCO's rule (:func:`saturation_area`)."""
        mask = np.asarray(mask, dtype=bool)
        return cls(mask, saturation_area(int(np.count_nonzero(mask)), saturation_threshold, relative), name)

    @classmethod
    def unsaturated(cls, mask: np.ndarray, name: str = "") -> SaturatedRegion:
        """A region that saturates only when all its pixels are found: plain PRO overlap."""
        mask = np.asarray(mask, dtype=bool)
        return cls(mask, int(np.count_nonzero(mask)), name)


Regions = Sequence[Sequence[SaturatedRegion]]
"""One sequence of regions per image; an empty sequence for a good image."""


def _validated(maps: ArrayLike, regions: Regions) -> tuple[list[np.ndarray], list[list[SaturatedRegion]], np.dtype]:
    map_list = _as_image_list(maps, "anomaly maps")
    region_lists = [list(r) for r in regions]
    if len(map_list) != len(region_lists):
        raise ValueError(
            f"got {len(map_list)} anomaly maps but region lists for {len(region_lists)} images; "
            "pass one (possibly empty) list of regions per map"
        )
    if not map_list:
        raise MetricUndefinedError("no anomaly maps given: sPRO needs at least one test image")
    for i, (m, regs) in enumerate(zip(map_list, region_lists)):
        for k, r in enumerate(regs):
            if not isinstance(r, SaturatedRegion):
                raise TypeError(f"regions[{i}][{k}] must be a SaturatedRegion, got {type(r).__name__}")
            g = np.asarray(r.mask)
            if g.dtype != np.bool_:
                raise TypeError(f"regions[{i}][{k}].mask must be a bool array, got dtype {g.dtype}")
            if g.shape != m.shape:
                raise ValueError(
                    f"region {k} of image {i} has shape {g.shape} but its anomaly map has shape {m.shape}; "
                    "resize the maps to the mask resolution (LOCO's protocol) first"
                )
            if not g.any():
                raise ValueError(f"region {k} of image {i} is empty; every ground-truth region needs a defect pixel")
            if int(r.saturation_area) < 1:
                raise ValueError(f"region {k} of image {i} has saturation_area {r.saturation_area}; it must be >= 1")
    return map_list, region_lists, score_dtype(*map_list)


def spro_scores(maps: ArrayLike, regions: Regions) -> PixelScores:
    """The sorted pixel scores and saturated weights behind every sPRO number.

    Parameters
    ----------
    maps
        Anomaly maps: [N,H,W], [N,1,H,W] or a list of [H,W] (numpy or torch).
    regions
        For each image the list of its :class:`SaturatedRegion` (empty for a good image),
        masks of the map's shape.

    Returns
    -------
    PixelScores
        ``neg``: ascending scores of the pixels in no region; ``pos``: ascending scores of
        region pixels, a pixel listed once per region containing it; ``pos_weight``:
        1 / s_k for the s_k highest-scoring pixels of region k, else 0; ``n_regions`` = K.
    """
    map_list, region_lists, dtype = _validated(maps, regions)
    negs, poss, weights = [], [], []
    n_regions = 0
    for m, regs in zip(map_list, region_lists):
        outside = np.ones(m.shape, dtype=bool)
        for r in regs:
            g = np.asarray(r.mask)
            outside &= ~g
            scores = np.asarray(m[g], dtype=dtype)
            s_k = min(int(r.saturation_area), scores.size)
            # Weight the s_k highest scores (any order among ties, see the module docstring).
            top = np.argsort(scores, kind="stable")[scores.size - s_k :]
            w = np.zeros(scores.size, dtype=np.float64)
            w[top] = 1.0 / s_k
            poss.append(scores)
            weights.append(w)
            n_regions += 1
        negs.append(np.asarray(m[outside], dtype=dtype))
    neg = np.concatenate(negs) if negs else np.zeros(0, dtype)
    neg.sort()
    pos = np.concatenate(poss) if poss else np.zeros(0, dtype)
    weight = np.concatenate(weights) if weights else np.zeros(0)
    order = np.argsort(pos, kind="stable")
    pos, weight = pos[order], weight[order]
    check_no_nan_sorted([neg, pos], map_list)
    return PixelScores(neg=neg, pos=pos, pos_weight=weight, n_regions=n_regions)


def _check_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def auc_spro(maps: ArrayLike, regions: Regions, *, fpr_limit: float = DEFAULT_SPRO_FPR_LIMIT) -> float:
    """Exact AUC-sPRO up to `fpr_limit` (0.05 by default), normalised to [0, 1].

    Parameters
    ----------
    maps
        Anomaly maps ([N,H,W] or a list of [H,W]); higher = more anomalous.
    regions
        One list of :class:`SaturatedRegion` per map (empty for good images).
    fpr_limit
        Upper integration limit in (0, 1].

    Raises
    ------
    MetricUndefinedError
        No region at all, or no pixel outside the regions (no FPR).
    """
    _check_limit(fpr_limit)
    return exact_area_from(spro_scores(maps, regions), fpr_limit, "AUC-sPRO")


def auc_spro_limits(
    maps: ArrayLike, regions: Regions, fpr_limits: Sequence[float] = LOCO_FPR_LIMITS
) -> dict[float, float]:
    """Exact AUC-sPRO at several limits from one preparation of the pixels: {limit: value}.

    Parameters
    ----------
    maps, regions
        As for :func:`auc_spro`.
    fpr_limits
        Integration limits in (0, 1] (LOCO's five by default).
    """
    for limit in fpr_limits:
        _check_limit(limit)
    px = spro_scores(maps, regions)
    return {float(limit): exact_area_from(px, float(limit), "AUC-sPRO") for limit in fpr_limits}


def spro_curve_at(maps: ArrayLike, regions: Regions, thresholds: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, mean sPRO) at the given thresholds, a pixel counting as positive when score > t.

    Parameters
    ----------
    maps, regions
        As for :func:`auc_spro`.
    thresholds
        Score thresholds (any order).

    The official evaluation's per-threshold numbers (``fp_rates``, ``mean_spros``), e.g. for
    plotting or for comparing with its ``metrics.json``.
    """
    px = spro_scores(maps, regions)
    if px.n_regions == 0:
        raise MetricUndefinedError("sPRO is undefined: there is no ground-truth region")
    if px.neg.size == 0:
        raise MetricUndefinedError("the FPR is undefined: every pixel lies in a ground-truth region")
    t = np.asarray(thresholds, dtype=np.float64).ravel()
    fpr = (px.neg.size - np.searchsorted(px.neg, t, side="right")) / px.neg.size
    assert px.pos_weight is not None  # spro_scores always weighs its pixels
    suffix = np.concatenate([np.cumsum(px.pos_weight[::-1])[::-1], [0.0]]) / px.n_regions
    spro = suffix[np.searchsorted(px.pos, t, side="right")]
    return fpr, spro


def auc_spro_by_type(
    maps: ArrayLike,
    regions: Regions,
    defect_types: Sequence[str],
    *,
    fpr_limits: Sequence[float] = LOCO_FPR_LIMITS,
    good_type: str = "good",
) -> dict[str, dict[float, float]]:
    """AUC-sPRO per anomaly type, as LOCO reports it for structural and logical anomalies.

    For each type T other than `good_type`: the images of type T plus all good images (the
    official ``get_auc_spros_per_subdir`` with ``add_good_images=True``); FPR over their
    defect-free pixels, sPRO over their regions. Key ``"mean"``: the mean over the types
    (LOCO's 0.5 * (structural + logical) for its two types).

    Parameters
    ----------
    maps, regions
        As for :func:`auc_spro`, for the whole test set.
    defect_types
        The type of each image, e.g. ``Sample.defect_type`` ("good",
        "logical_anomalies", "structural_anomalies").
    fpr_limits
        Integration limits.
    good_type
        The type name of good images.
    """
    map_list = _as_image_list(maps, "anomaly maps")
    region_lists = list(regions)
    types = list(defect_types)
    if not len(map_list) == len(region_lists) == len(types):
        raise ValueError(
            f"maps ({len(map_list)}), regions ({len(region_lists)}) and defect_types ({len(types)}) "
            "must have one entry per image"
        )
    good = [i for i, t in enumerate(types) if t == good_type]
    if not good:
        raise MetricUndefinedError(
            f"no image of type {good_type!r}: per-type AUC-sPRO adds the good images to each type"
        )
    out: dict[str, dict[float, float]] = {}
    for kind in sorted(set(types) - {good_type}):
        idx = [i for i, t in enumerate(types) if t == kind] + good
        out[kind] = auc_spro_limits([map_list[i] for i in idx], [region_lists[i] for i in idx], fpr_limits)
    if out:
        out["mean"] = {float(lim): float(np.mean([v[float(lim)] for v in out.values()])) for lim in fpr_limits}
    return out


def spro_metrics(maps: ArrayLike, regions: Regions, fpr_limits: Sequence[float] = LOCO_FPR_LIMITS) -> dict[str, float]:
    """``{"auc_spro_0.05": ..., ...}``: AUC-sPRO at each limit under stable keys.

    Parameters
    ----------
    maps, regions
        As for :func:`auc_spro`.
    fpr_limits
        Integration limits.
    """
    return {f"auc_spro_{limit:g}": value for limit, value in auc_spro_limits(maps, regions, fpr_limits).items()}


__all__ = [
    "DEFAULT_SPRO_FPR_LIMIT",
    "LOCO_FPR_LIMITS",
    "SaturatedRegion",
    "auc_spro",
    "auc_spro_by_type",
    "auc_spro_limits",
    "saturation_area",
    "spro_curve_at",
    "spro_metrics",
    "spro_scores",
]
