"""sPRO / AUC-sPRO (MVTec LOCO) and per-type image AUROC: hand-computed cases and references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from iadkit.errors import MetricUndefinedError
from iadkit.metrics import (
    LOCO_FPR_LIMITS,
    SaturatedRegion,
    auc_spro,
    auc_spro_by_type,
    auc_spro_limits,
    aupro_exact,
    image_auroc_by_type,
    saturation_area,
    spro_curve_at,
    spro_metrics,
    trapezoid_to,
)


def ref_auc_spro(maps, regions, limit):
    """The official procedure (strict '>' binarisation, FPR over pixels in no region, mean of
    min(TP / s, 1), trapezoid with interpolation at the limit) with a threshold at every
    distinct score plus one above the maximum and one below the minimum, written as loops."""
    scores = np.unique(np.concatenate([np.ravel(m) for m in maps]).astype(np.float64))
    thresholds = np.concatenate([[scores[-1] + 1.0], scores[::-1], [scores[0] - 1.0]])
    fprs, spros = [], []
    for t in thresholds:
        fp = n_ok = 0
        per_region = []
        for m, regs in zip(maps, regions):
            m = np.asarray(m, np.float64)
            union = np.zeros(m.shape, bool)
            for r in regs:
                union |= r.mask
                tp = int(np.sum((m > t) & r.mask))
                per_region.append(min(tp / r.saturation_area, 1.0))
            fp += int(np.sum((m > t) & ~union))
            n_ok += int(np.sum(~union))
        fprs.append(fp / n_ok)
        spros.append(float(np.mean(per_region)))
    return trapezoid_to(np.array(fprs), np.array(spros), limit) / limit


def row(values) -> np.ndarray:
    return np.array([values], dtype=np.float64)


def region(mask_row, s, name="") -> SaturatedRegion:
    return SaturatedRegion(np.array([mask_row], dtype=bool), s, name)


# A 1x8 anomalous image with two regions and a 1x4 good image:
#   region A = pixels 0-3 (area 4) saturating at 2 pixels, region B = pixels 4-5 (area 2) unsaturated,
#   pixels 6-7 and the good image are normal (6 normal pixels).
A = [1, 1, 1, 1, 0, 0, 0, 0]
B = [0, 0, 0, 0, 1, 1, 0, 0]
GOOD = row([0.6, 0.4, 0.05, 0.05])


def two_region_case(p5: float):
    image = row([0.9, 0.8, 0.1, 0.1, 0.7, p5, 0.5, 0.3])
    return [image, GOOD], [[region(A, 2), region(B, 2)], []]


def test_saturated_and_unsaturated_regions_hand_computed():
    maps, regions = two_region_case(p5=0.2)
    # Thresholds from the top: 0.9 -> A 1/2 (sPRO 0.25); 0.8 -> A saturated (0.5); 0.7 -> B 1/2
    # (0.75), all at FPR 0; the normal pixels 0.6, 0.5, 0.4, 0.3 raise the FPR to 4/6 at sPRO
    # 0.75; 0.2 completes B (sPRO 1); A's last pixels (0.1) add nothing; the good 0.05s end at FPR 1.
    for limit in (0.01, 0.05, 0.3, 4 / 6):
        assert auc_spro(maps, regions, fpr_limit=limit) == pytest.approx(0.75, abs=1e-12)
    assert auc_spro(maps, regions, fpr_limit=1.0) == pytest.approx(0.75 * 4 / 6 + 1.0 * 2 / 6, abs=1e-12)
    fpr, spro = spro_curve_at(maps, regions, [0.95, 0.85, 0.75, 0.65, 0.45, 0.15, 0.07])
    np.testing.assert_allclose(fpr, [0, 0, 0, 0, 2 / 6, 4 / 6, 4 / 6])
    np.testing.assert_allclose(spro, [0, 0.25, 0.5, 0.75, 0.75, 1.0, 1.0])
    # Without saturation (s_A = 4) the same maps score lower: A counts 2/4 until its 0.1 pixels.
    plain = [[region(A, 4), region(B, 2)], []]
    assert auc_spro(maps, plain, fpr_limit=1.0) == pytest.approx(0.5 * 4 / 6 + 1.0 * 2 / 6, abs=1e-12)
    assert auc_spro(maps, plain, fpr_limit=1.0) == pytest.approx(ref_auc_spro(maps, plain, 1.0), abs=1e-12)


def test_tie_between_a_normal_and_a_region_pixel_is_a_straight_segment():
    maps, regions = two_region_case(p5=0.3)  # B's second pixel ties with the normal 0.3
    # FPR 3/6 -> 4/6 while sPRO rises 0.75 -> 1: a diagonal (the mean of both ends counts).
    expected = 0.75 * 3 / 6 + (0.75 + 1.0) / 2 * 1 / 6 + 1.0 * 2 / 6
    assert auc_spro(maps, regions, fpr_limit=1.0) == pytest.approx(expected, abs=1e-12)
    # Cut inside the diagonal at FPR 0.6: 0.75 * 0.5 + trapezoid from (0.5, 0.75) to (0.6, 0.9).
    assert auc_spro(maps, regions, fpr_limit=0.6) == pytest.approx((0.375 + 0.1 * 0.825) / 0.6, abs=1e-12)
    for limit in (0.05, 0.6, 1.0):
        assert auc_spro(maps, regions, fpr_limit=limit) == pytest.approx(ref_auc_spro(maps, regions, limit), abs=1e-12)


def test_tie_inside_a_region_at_its_saturation_count():
    # A saturates at 2 pixels; its 2nd and 3rd pixels tie at 0.5, above every normal pixel.
    image = row([0.9, 0.5, 0.5, 0.0, 0.2, 0.1])
    regions = [[region([1, 1, 1, 1, 0, 0], 2)]]
    # t in [0.5, 0.9): 1 of 2 -> 0.5; below 0.5: 3 pixels found, capped at 1 - all before any FP.
    fpr, spro = spro_curve_at([image], regions, [0.7, 0.4, 0.15])
    np.testing.assert_allclose(spro, [0.5, 1.0, 1.0])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5])
    assert auc_spro([image], regions, fpr_limit=0.05) == pytest.approx(1.0, abs=1e-12)


def test_relative_and_absolute_saturation_rules():
    assert saturation_area(4, 0.5, relative=True) == 2
    assert saturation_area(4, 0.3, relative=True) == 1  # int(1.2), truncated as in the official code
    assert saturation_area(4, 0.1, relative=True) == 1  # int(0.4) = 0 would divide by zero: 1 pixel
    assert saturation_area(10, 1.0, relative=True) == 10
    assert saturation_area(10, 3, relative=False) == 3
    assert saturation_area(2, 300, relative=False) == 2  # min(threshold, area)
    r = SaturatedRegion.with_rule(np.array([[True, True, True, False]]), 0.67, relative=True, name="x")
    assert r.saturation_area == 2 and r.name == "x"
    assert SaturatedRegion.unsaturated(np.ones((2, 3), bool)).saturation_area == 6
    for bad in [(4, 1.5, True), (4, 0.0, True), (4, 2.5, False), (4, 0, False), (0, 1, False)]:
        with pytest.raises(ValueError):
            saturation_area(*bad)


def test_regions_are_mask_files_not_connected_components():
    """One mask file with two blobs is ONE sPRO region; AUPRO splits it into two components."""
    mask = np.array([[1, 0, 0, 1, 1, 1, 0, 0]], dtype=bool)
    amap = row([0.9, 0.1, 0.2, 0.0, 0.0, 0.0, 0.3, 0.4])  # only the 1-pixel blob is found first
    # AUPRO: two components {0} and {3,4,5}; at FPR 0 the first is found: PRO 1/2.
    # sPRO with the file as one region of 4 pixels, unsaturated: 1/4.
    one = [[SaturatedRegion.unsaturated(mask[0][None])]]
    at_zero = spro_curve_at([amap], one, [0.5])[1][0]
    assert at_zero == pytest.approx(0.25)
    two = [
        [
            SaturatedRegion.unsaturated(mask[0][None] & (np.arange(8) < 2)[None]),
            SaturatedRegion.unsaturated(mask[0][None] & (np.arange(8) >= 2)[None]),
        ]
    ]
    assert spro_curve_at([amap], two, [0.5])[1][0] == pytest.approx(0.5)
    # With components as regions and no saturation, AUC-sPRO is AUPRO.
    assert auc_spro([amap], two, fpr_limit=0.3) == pytest.approx(aupro_exact(amap[None], mask[None]), abs=1e-12)
    assert auc_spro([amap], one, fpr_limit=0.3) != pytest.approx(aupro_exact(amap[None], mask[None]), abs=1e-3)


@pytest.mark.parametrize("seed", range(6))
def test_unsaturated_components_equal_aupro_and_reference(seed):
    rng = np.random.default_rng(seed)
    n, h, w = 3, 7, 9
    masks = rng.random((n, h, w)) < 0.25
    masks[0, 0, 0], masks[-1] = True, False  # at least one defect and one good image
    ties = seed % 2 == 0
    maps = (rng.integers(0, 5, (n, h, w)) if ties else rng.random((n, h, w)) + masks * 0.5).astype(np.float32)
    regions = []
    for g in masks:
        lab, k = ndimage.label(g, structure=np.ones((3, 3), int))
        regions.append([SaturatedRegion.unsaturated(lab == c) for c in range(1, k + 1)])
    for limit in (0.05, 0.3, 1.0):
        assert auc_spro(maps, regions, fpr_limit=limit) == pytest.approx(
            aupro_exact(maps, masks, fpr_limit=limit), abs=1e-9
        )
    # Saturated, overlapping regions (a second region covering part of the first): the reference.
    sat = []
    for regs in regions:
        more = [SaturatedRegion(r.mask, int(rng.integers(1, r.mask.sum() + 1))) for r in regs]
        if regs:
            overlap = regs[0].mask | np.roll(regs[0].mask, 1, axis=1)
            more.append(SaturatedRegion.with_rule(overlap, 0.5, relative=True))
        sat.append(more)
    for limit in LOCO_FPR_LIMITS:
        assert auc_spro(maps, sat, fpr_limit=limit) == pytest.approx(ref_auc_spro(maps, sat, limit), abs=1e-9)
    assert auc_spro_limits(maps, sat) == pytest.approx({lim: ref_auc_spro(maps, sat, lim) for lim in LOCO_FPR_LIMITS})


def test_overlapping_regions_hand_computed():
    # Two regions share pixel 1; the shared pixel is found first: it counts for both.
    amap = row([0.1, 0.9, 0.2, 0.0, 0.5])
    regs = [[region([1, 1, 0, 0, 0], 2), region([0, 1, 1, 0, 0], 2)]]
    fpr, spro = spro_curve_at([amap], regs, [0.6, 0.15])
    np.testing.assert_allclose(spro, [0.5, 0.75])  # (1/2 + 1/2) / 2; then (1/2 + 1) / 2
    np.testing.assert_allclose(fpr, [0.0, 0.5])  # normal pixels: 3 (0.0) and 4 (0.5)


def test_by_type_adds_the_good_images_to_each_type():
    maps, regions = two_region_case(p5=0.2)
    logical = row([0.0, 0.0, 0.8, 0.8])
    maps = [*maps, logical]
    regions = [*regions, [region([0, 0, 1, 1], 2)]]
    types = ["structural_anomalies", "good", "logical_anomalies"]
    out = auc_spro_by_type(maps, regions, types, fpr_limits=(0.05, 1.0))
    assert set(out) == {"structural_anomalies", "logical_anomalies", "mean"}
    assert out["structural_anomalies"] == pytest.approx(auc_spro_limits(maps[:2], regions[:2], (0.05, 1.0)))
    assert out["logical_anomalies"] == pytest.approx(auc_spro_limits(maps[1:], regions[1:], (0.05, 1.0)))
    # logical: its region is found at FPR 0 (0.8 above the good 0.6): 1.0 everywhere.
    assert out["logical_anomalies"][0.05] == pytest.approx(1.0)
    assert out["mean"][0.05] == pytest.approx((0.75 + 1.0) / 2)
    assert spro_metrics(maps, regions, (0.05,)) == {"auc_spro_0.05": pytest.approx(auc_spro(maps, regions))}
    with pytest.raises(MetricUndefinedError, match="no image of type 'good'"):
        auc_spro_by_type(maps, regions, ["a", "b", "c"])


def test_inputs_torch_and_errors():
    maps, regions = two_region_case(p5=0.2)
    torch_maps = [torch.from_numpy(m.astype(np.float32)) for m in maps]
    assert auc_spro(torch_maps, regions) == pytest.approx(auc_spro(maps, regions), abs=1e-7)
    with pytest.raises(MetricUndefinedError, match="no defect pixel"):
        auc_spro(maps, [[], []])
    with pytest.raises(MetricUndefinedError, match="no false-positive rate"):
        auc_spro([row([0.1, 0.2])], [[region([1, 1], 1)]])
    with pytest.raises(ValueError, match="shape"):
        auc_spro(maps, [[region([1, 0], 1)], []])
    with pytest.raises(ValueError, match="empty"):
        auc_spro(maps, [[region([0] * 8, 1)], []])
    with pytest.raises(ValueError, match="one \\(possibly empty\\) list of regions per map"):
        auc_spro(maps, [[]])
    with pytest.raises(ValueError, match="fpr_limit"):
        auc_spro(maps, regions, fpr_limit=0.0)
    with pytest.raises(TypeError, match="bool"):
        auc_spro(maps, [[SaturatedRegion(np.array([A]), 2)], []])
    with pytest.raises(MetricUndefinedError, match="NaN"):
        auc_spro([row([np.nan] + [0.0] * 7), GOOD], regions)


def test_image_auroc_by_type_matches_sklearn_per_subset():
    rng = np.random.default_rng(0)
    types = ["good"] * 8 + ["logical_anomalies"] * 5 + ["structural_anomalies"] * 6
    labels = np.array([t != "good" for t in types], int)
    scores = rng.random(len(types)) + 0.3 * labels
    scores[8] = scores[0]  # a tie between a good and a logical image
    out = image_auroc_by_type(labels, scores, types)
    good = np.array(types) == "good"
    for kind in ("logical_anomalies", "structural_anomalies"):
        keep = good | (np.array(types) == kind)
        assert out[kind] == pytest.approx(roc_auc_score(labels[keep], scores[keep]), abs=1e-12)
    assert out["mean"] == pytest.approx((out["logical_anomalies"] + out["structural_anomalies"]) / 2)
    with pytest.raises(ValueError, match="disagree"):
        image_auroc_by_type([0, 1], [0.1, 0.2], ["scratch", "good"])
    with pytest.raises(MetricUndefinedError, match="no good image"):
        image_auroc_by_type([1, 1], [0.1, 0.2], ["a", "b"])
    with pytest.raises(MetricUndefinedError, match="no anomalous image"):
        image_auroc_by_type([0, 0], [0.1, 0.2], ["good", "good"])
    with pytest.raises(ValueError, match="one per image"):
        image_auroc_by_type([0, 1], [0.1, 0.2], ["good"])
