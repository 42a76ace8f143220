"""Metrics against hand-derived values, sklearn, and independent reference implementations."""

from __future__ import annotations

import importlib
import time

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

import iadkit.metrics._curves as curves_mod
from iadkit.errors import MetricUndefinedError
from iadkit.metrics import (
    IMAGE_KEYS,
    PIXEL_KEYS,
    PeakMemory,
    PixelScores,
    Timer,
    aupro,
    aupro_exact,
    aupro_thresholds,
    compute_all,
    current_rss_mb,
    final_average,
    forgetting_measure,
    forgetting_per_task,
    image_ap,
    image_auroc,
    image_f1_max,
    measure_time_per_image,
    peak_rss_mb,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
    pixel_metrics,
    pro_curve_thresholds,
    time_per_image,
    trapezoid_to,
)

# The package re-exports the function `aupro`, which shadows the submodule as an attribute.
aupro_mod = importlib.import_module("iadkit.metrics.aupro")

# ----------------------------------------------------------------------------------------------
# Independent references (straightforward, slow) used to check the fast exact implementations.


def sklearn_f1_max(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """The usual idiom: F1 over sklearn's PR curve, argmax over increasing thresholds."""
    p, r, t = precision_recall_curve(y, s)
    with np.errstate(all="ignore"):
        f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    i = int(np.argmax(f[:-1]))
    return float(f[i]), float(t[i])


def ref_aupro_all_pixels(maps, masks, limit=0.3) -> float:
    """MVTec-style exact PRO curve: sort ALL pixels, cumulative FP / per-region weights, keep
    the last point of each tie group, trapezoid with interpolation at `limit`."""
    fp_parts, w_parts, n_regions, n_ok = [], [], 0, 0
    for g in masks:
        lab, k = ndimage.label(g, structure=np.ones((3, 3), int))
        n_regions += k
        fp_parts.append((lab == 0).ravel().astype(float))
        n_ok += int((lab == 0).sum())
        w = np.zeros(g.shape)
        for c in range(1, k + 1):
            w[lab == c] = 1.0 / np.sum(lab == c)
        w_parts.append(w.ravel())
    s = np.concatenate([np.asarray(m, np.float64).ravel() for m in maps])
    order = np.argsort(-s, kind="stable")
    s = s[order]
    fpr = np.cumsum(np.concatenate(fp_parts)[order]) / n_ok
    pro = np.cumsum(np.concatenate(w_parts)[order]) / n_regions
    keep = np.append(np.diff(s) != 0, True)
    x = np.concatenate([[0.0], fpr[keep]])
    y = np.concatenate([[0.0], pro[keep]])
    ins = int(np.searchsorted(x, limit, side="right"))
    xs, ys = list(x[:ins]), list(y[:ins])
    if xs[-1] < limit:  # cut the segment crossing the limit at its linear interpolation
        xs.append(limit)
        ys.append(y[ins - 1] + (y[ins] - y[ins - 1]) * (limit - x[ins - 1]) / (x[ins] - x[ins - 1]))
    return float(np.trapezoid(ys, xs) / limit)


def ref_aupro_im_iad(maps, masks, limit=0.3, num_thresholds=100) -> float:
    """IM-IAD's procedure written out as a plain loop over thresholds and components."""
    comps, ok = [], []
    for m, g in zip(maps, masks):
        lab, k = ndimage.label(g, structure=np.ones((3, 3), int))
        ok.append(np.asarray(m)[lab == 0])
        comps += [np.asarray(m)[lab == c] for c in range(1, k + 1)]
    ok = np.sort(np.concatenate(ok))
    n = len(ok)
    fprs, pros = [1.0], [1.0]
    for pos in np.linspace(0, n - 1, num=num_thresholds, dtype=int):
        t = ok[pos]
        fprs.append(1.0 - (pos + 1) / n)
        pros.append(float(np.mean([np.mean(c > t) for c in comps])))
    return trapezoid_to(np.array(fprs[::-1]), np.array(pros[::-1]), limit) / limit


def random_pixel_case(rng: np.random.Generator, ties: bool):
    n, h, w = int(rng.integers(1, 4)), int(rng.integers(3, 12)), int(rng.integers(3, 12))
    masks = rng.random((n, h, w)) < rng.uniform(0.05, 0.5)
    masks[0, 0, 0], masks[-1, -1, -1] = True, False  # both classes present
    if ties:
        maps = rng.integers(0, 4, (n, h, w)).astype(np.float32)
    else:
        maps = (rng.random((n, h, w)) + masks * rng.uniform(0, 1)).astype(np.float32)
    return maps, masks


# ----------------------------------------------------------------------------------------------
# Image level: hand-computed


def test_image_metrics_hand_computed_with_a_tie():
    # good scores 0.1, 0.4, 0.5; anomalous 0.5, 0.7, 0.9 (one tie at 0.5 across classes).
    labels = [0, 0, 0, 1, 1, 1]
    scores = np.array([0.1, 0.4, 0.5, 0.5, 0.7, 0.9])
    # AUROC: pairs (anomalous > good): 0.5 beats 0.1, 0.4 and ties 0.5 -> 2.5; 0.7 -> 3; 0.9 -> 3.
    # (2.5 + 3 + 3) / 9 = 8.5 / 9.
    assert image_auroc(labels, scores) == pytest.approx(8.5 / 9, abs=1e-15)
    # AP = sum (R_n - R_{n-1}) P_n over thresholds 0.9, 0.7, 0.5 (downwards):
    # t=0.9: TP1 FP0 -> P=1, R=1/3; t=0.7: TP2 FP0 -> P=1, R=2/3; t=0.5: TP3 FP1 -> P=3/4, R=1.
    # AP = 1/3 * 1 + 1/3 * 1 + 1/3 * 3/4 = 11/12.
    assert image_ap(labels, scores) == pytest.approx(11 / 12, abs=1e-15)
    # F1 = 2TP / (TP + FP + P): t=0.9 -> 2/4; 0.7 -> 4/5; 0.5 -> 6/7; 0.4 -> 6/8; 0.1 -> 6/9.
    f1, thr = image_f1_max(labels, scores)
    assert f1 == pytest.approx(6 / 7, abs=1e-15) and thr == 0.5


def test_image_ap_formula_differs_from_interpolated_ap():
    # Ranking (high to low): A, G, A, G, A  (A = anomalous, G = good), scores 5..1.
    # t=5: P=1, R=1/3; t=4: R unchanged; t=3: P=2/3, R=2/3; t=1: P=3/5, R=1.
    # AP = 1/3 (1 + 2/3 + 3/5) = 34/45 (no interpolation of precision).
    labels = np.array([1, 0, 1, 0, 1])
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    assert image_ap(labels, scores) == pytest.approx(34 / 45, abs=1e-15)
    # AUROC: A5 beats both G; A3 beats G2; A1 beats none -> 3/6.
    assert image_auroc(labels, scores) == pytest.approx(0.5, abs=1e-15)


def test_image_all_equal_scores():
    labels = [0, 1, 1, 0, 1]
    scores = [2.0] * 5
    assert image_auroc(labels, scores) == 0.5  # every pair tied
    assert image_ap(labels, scores) == pytest.approx(3 / 5)  # one threshold: P = 3/5, R = 1
    assert image_f1_max(labels, scores) == (pytest.approx(6 / 8), 2.0)  # 2*3 / (3 + 2 + 3)


@pytest.mark.parametrize("chunk", [1, 1 << 18])
def test_f1_max_tie_between_thresholds_returns_the_lowest(monkeypatch, chunk):
    monkeypatch.setattr(curves_mod, "CHUNK", chunk)  # chunk=1: the tie spans two chunks
    # anomalous 5, 1; good 3, 2. F1 = 2TP / (TP + FP + 2): t=5 -> 2/3; t=3 -> 2/4; t=2 -> 2/5;
    # t=1 -> 4/6 = 2/3. Two thresholds reach 2/3; like argmax over sklearn's increasing
    # thresholds, the lowest (1) is returned.
    labels, scores = [1, 0, 0, 1], [5.0, 3.0, 2.0, 1.0]
    assert image_f1_max(labels, scores) == (pytest.approx(2 / 3), 1.0)
    assert sklearn_f1_max(np.array(labels), np.array(scores))[1] == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_image_metrics_equal_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    for trial in range(25):
        n = int(rng.integers(2, 80))
        y = rng.integers(0, 2, n)
        y[0], y[1] = 0, 1
        s = rng.integers(0, 6, n).astype(np.float32) if trial % 2 else rng.random(n)
        assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert image_ap(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        f1, thr = image_f1_max(y, s)
        ref_f1, ref_thr = sklearn_f1_max(y, s)
        assert f1 == pytest.approx(ref_f1, abs=1e-12) and thr == ref_thr


def test_image_inputs_torch_and_bool():
    y = torch.tensor([False, True, False, True])
    s = torch.tensor([0.1, 0.9, 0.3, 0.2], requires_grad=True)
    assert image_auroc(y, s) == pytest.approx(0.75)  # 0.9 beats both, 0.2 beats 0.1 only
    assert image_auroc(y.int(), s.to(torch.bfloat16)) == pytest.approx(0.75)


def test_image_errors():
    with pytest.raises(MetricUndefinedError, match="no anomalous images"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])  # all-good test set
    with pytest.raises(MetricUndefinedError, match="no anomalous images"):
        image_ap([0, 0], [0.1, 0.2])
    with pytest.raises(MetricUndefinedError, match="needs good images"):
        image_auroc([1, 1], [0.1, 0.2])
    # With anomalous images only, AP and F1 are still defined (precision is always 1).
    assert image_ap([1, 1], [0.1, 0.2]) == 1.0
    assert image_f1_max([1, 1], [0.1, 0.2]) == (1.0, 0.1)
    with pytest.raises(MetricUndefinedError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="differ in length"):
        image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="unlabelled"):
        image_auroc([0, 1, -1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="1-D"):
        image_auroc([[0, 1]], [[0.1, 0.2]])


# ----------------------------------------------------------------------------------------------
# Pixel level


@pytest.mark.parametrize("seed", range(4))
def test_pixel_metrics_equal_sklearn_on_pooled_pixels(seed):
    rng = np.random.default_rng(100 + seed)
    for trial in range(10):
        maps, masks = random_pixel_case(rng, ties=trial % 2 == 0)
        masks[-1] = False  # a good image: its pixels count as normal pixels
        masks[0, 0, 0] = True
        y, s = masks.ravel(), maps.ravel()
        assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert pixel_ap(maps, masks) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        f1, thr = pixel_f1_max(maps, masks)
        ref_f1, ref_thr = sklearn_f1_max(y, s)
        assert f1 == pytest.approx(ref_f1, abs=1e-12) and thr == ref_thr


def test_pixel_metrics_exact_across_chunk_boundaries(monkeypatch):
    # Tiny chunks force tie groups to straddle chunk boundaries in every sweep.
    monkeypatch.setattr(curves_mod, "CHUNK", 3)
    monkeypatch.setattr(aupro_mod, "_CHUNK", 4)
    rng = np.random.default_rng(7)
    for _ in range(8):
        maps, masks = random_pixel_case(rng, ties=True)
        y, s = masks.ravel(), maps.ravel()
        out = pixel_metrics(maps, masks, aupro_variant="both")
        assert out["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert out["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert (out["pixel_f1_max"], out["pixel_f1_threshold"]) == pytest.approx(sklearn_f1_max(y, s))
        assert out["aupro"] == pytest.approx(ref_aupro_all_pixels(maps, masks), abs=1e-9)
        assert out["aupro_100"] == pytest.approx(ref_aupro_im_iad(maps, masks), abs=1e-9)


def test_pixel_inputs_lists_of_shapes_torch_and_uint8():
    rng = np.random.default_rng(3)
    maps = [rng.random((5, 7)).astype(np.float32), rng.random((4, 9)).astype(np.float32)]
    masks = [rng.random((5, 7)) < 0.3, rng.random((4, 9)) < 0.3]
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([m.ravel() for m in maps])
    ref = roc_auc_score(y, s)
    assert pixel_auroc(maps, masks) == pytest.approx(ref, abs=1e-12)
    assert pixel_auroc([torch.from_numpy(m) for m in maps], [m.astype(np.uint8) for m in masks]) == pytest.approx(ref)
    stacked = rng.random((3, 1, 6, 6))
    stacked_masks = torch.from_numpy(rng.random((3, 1, 6, 6)) < 0.3)
    assert pixel_auroc(torch.from_numpy(stacked), stacked_masks) == pytest.approx(
        roc_auc_score(stacked_masks.numpy().ravel(), stacked.ravel()), abs=1e-12
    )


def test_pixel_errors():
    maps = np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)
    good = np.zeros((2, 4, 4), bool)
    with pytest.raises(MetricUndefinedError, match="no anomalous pixels"):
        pixel_auroc(maps, good)
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc(maps, np.zeros((2, 4, 5), bool))
    with pytest.raises(ValueError, match="2 anomaly maps but 3 masks"):
        pixel_auroc(maps, np.zeros((3, 4, 4), bool))
    bad = maps.copy()
    bad[1, 2, 3] = np.nan
    masks = good.copy()
    masks[0, 0, 0] = True
    with pytest.raises(MetricUndefinedError, match=r"NaN \(images \[1\]\)"):
        pixel_auroc(bad, masks)
    with pytest.raises(ValueError, match="nearest-neighbour"):
        pixel_auroc(maps, masks * 0.5)  # an interpolated mask
    with pytest.raises(ValueError, match="mask > 0"):
        pixel_auroc(maps, masks.astype(np.uint8) * 255)


# ----------------------------------------------------------------------------------------------
# AUPRO


def two_region_image():
    """A 10x11 image: region B = 3x3 block (rows 0-2, cols 0-2) scored 1.0, region A = one
    pixel at (6, 8) scored 0.0905, and 100 normal pixels scored 0.001, 0.002, ..., 0.100."""
    mask = np.zeros((10, 11), bool)
    mask[0:3, 0:3] = True
    mask[6, 8] = True
    amap = np.zeros((10, 11))
    amap[~mask] = np.arange(1, 101) / 1000
    amap[0:3, 0:3] = 1.0
    amap[6, 8] = 0.0905
    return amap, mask


def test_aupro_hand_computed_small_region_weighs_as_much_as_large():
    amap, mask = two_region_image()
    # Exact PRO curve: B is detected first (PRO 0.5 at FPR 0); A (0.0905) needs the threshold
    # to pass the 10 normal pixels 0.091..0.100 -> FPR 10/100 = 0.1, where PRO jumps to 1.
    # Area to 0.3 = 0.5 * 0.1 + 1.0 * 0.2 = 0.25 -> AUPRO = 0.25 / 0.3 = 5/6.
    assert aupro_exact(amap[None], mask[None]) == pytest.approx(5 / 6, abs=1e-12)
    # Were regions weighted by size (9 + 1 pixels), PRO would be 0.9 before FPR 0.1:
    # (0.9 * 0.1 + 0.2) / 0.3 = 0.9667 - so the region weighting is what this checks.
    # IM-IAD variant: N = 100 normal pixels -> positions 0..99, threshold t = (pos+1)/1000,
    # FPR = (99 - pos)/100, PRO(> t) = 1 if t < 0.0905 (pos <= 89, FPR >= 0.10) else 0.5.
    # Its points (0.09, 0.5) and (0.10, 1.0) are joined by a straight segment:
    # area = 0.5 * 0.09 + 0.01 * 0.75 + 1.0 * 0.2 = 0.2525 -> 0.2525 / 0.3 = 0.841666...
    assert aupro_thresholds(amap[None], mask[None]) == pytest.approx(0.2525 / 0.3, abs=1e-12)
    assert aupro(amap[None], mask[None], variant="100") == pytest.approx(0.2525 / 0.3, abs=1e-12)
    fprs, pros = pro_curve_thresholds(amap[None], mask[None])
    assert fprs[0] == 0.0 and (fprs[-1], pros[-1]) == (1.0, 1.0) and len(fprs) == 101
    assert np.all(np.diff(fprs) >= 0)


def test_aupro_hand_computed_across_images_with_good_image():
    # Image 1 (1x40): region A = 1 pixel scored 0.505, region B = 2 pixels scored 2.0, and 37
    # normal pixels 0.01..0.37. Image 2 (1x18): good, normal pixels 0.38..0.55. FPR pools the
    # normals of both images (N = 55); the normals above 0.505 are 0.51..0.55 (5 pixels, all in
    # the good image), so A is detected at FPR 5/55 = 1/11.
    strip = np.zeros((1, 40))
    strip_mask = np.zeros((1, 40), bool)
    strip_mask[0, 0] = True  # region A: 1 pixel, score 0.505
    strip_mask[0, 38:40] = True  # region B: 2 pixels, score 2.0
    strip[0, 0] = 0.505
    strip[0, 38:40] = 2.0
    strip[0, 1:38] = np.arange(1, 38) / 100  # 37 normals 0.01..0.37
    good = (np.arange(38, 56) / 100).reshape(1, 18)  # 18 normals 0.38..0.55
    # N = 55 normals. PRO = 0.5 until FPR 5/55 = 1/11, then 1.
    # AUPRO = (0.5/11 + (0.3 - 1/11)) / 0.3 = (0.3 - 0.5/11) / 0.3
    expected = (0.3 - 0.5 / 11) / 0.3
    got = aupro_exact([strip, good], [strip_mask, np.zeros_like(good, bool)])
    assert got == pytest.approx(expected, abs=1e-12)


def test_aupro_eight_connectivity_diagonal_pixels_are_one_region():
    mask = np.zeros((8, 8), bool)
    mask[0, 0] = mask[1, 1] = True  # touching at a corner: one region with 8-connectivity
    mask[5, 5] = True  # a separate one-pixel region
    amap = np.zeros((8, 8))
    amap[~mask] = np.arange(61) / 100  # normals in [0, 0.6]
    amap[0, 0] = amap[5, 5] = 1.0  # above all normals
    amap[1, 1] = -1.0  # below all normals: never detected before FPR 1
    px = PixelScores.from_maps(amap[None], mask[None])
    assert px.n_regions == 2
    # PRO = mean(1/2 for the diagonal pair, 1 for the single pixel) = 0.75 on all of [0, 0.3]
    # (with 4-connectivity it would be mean(1, 0, 1) = 2/3).
    assert aupro_exact(amap[None], mask[None]) == pytest.approx(0.75, abs=1e-12)


def test_aupro_single_region_and_all_equal_scores():
    mask = np.zeros((6, 6), bool)
    mask[2:4, 2:4] = True
    amap = np.full((6, 6), 0.5)
    # All scores equal: the exact curve is the single diagonal (0,0)-(1,1) (random
    # tie-breaking): area to 0.3 = 0.045 -> 0.15. IM-IAD's variant counts only scores > t, so
    # PRO = 0 at every sampled threshold with nominal FPR <= 1 - 1/N: its AUPRO is 0.
    assert aupro_exact(amap[None], mask[None]) == pytest.approx(0.15, abs=1e-12)
    assert aupro_thresholds(amap[None], mask[None]) == 0.0
    # A perfect map for a single region: 1 from FPR 0 on.
    amap2 = np.where(mask, 1.0, 0.0) + np.linspace(0, 0.1, 36).reshape(6, 6) * ~mask
    assert aupro_exact(amap2[None], mask[None]) == pytest.approx(1.0, abs=1e-12)
    assert aupro_thresholds(amap2[None], mask[None]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_aupro_equals_references_on_random_data(seed):
    rng = np.random.default_rng(200 + seed)
    for trial in range(12):
        maps, masks = random_pixel_case(rng, ties=trial % 3 == 0)
        limit = [0.3, 0.05, 1.0, 0.5][trial % 4]
        assert aupro_exact(maps, masks, fpr_limit=limit) == pytest.approx(
            ref_aupro_all_pixels(maps, masks, limit), abs=1e-9
        )
        assert aupro_thresholds(maps, masks, fpr_limit=limit) == pytest.approx(
            ref_aupro_im_iad(maps, masks, limit), abs=1e-9
        )


def test_aupro_exact_and_100_thresholds_agree_on_smooth_maps():
    rng = np.random.default_rng(5)
    n, h, w = 6, 48, 48
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((n, h, w), bool)
    for i in range(4):
        for _ in range(2):
            cy, cx, r = [*rng.integers(8, 40, 2).tolist(), int(rng.integers(2, 7))]
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    maps = ndimage.gaussian_filter(rng.random((n, h, w)), (0, 2, 2)) + 0.15 * ndimage.gaussian_filter(
        masks.astype(float), (0, 1, 1)
    )
    maps = maps.astype(np.float32)
    exact, sampled = aupro_exact(maps, masks), aupro_thresholds(maps, masks)
    assert 0.2 < exact < 1.0
    assert exact == pytest.approx(sampled, abs=0.01)
    assert exact != sampled  # they are different procedures


def test_aupro_errors():
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.raises(MetricUndefinedError, match="no defect pixel"):
        aupro_exact(maps, np.zeros((2, 4, 4), bool))
    with pytest.raises(MetricUndefinedError, match="no false-positive rate"):
        aupro_exact(maps, np.ones((2, 4, 4), bool))
    with pytest.raises(MetricUndefinedError, match="no defect pixel"):
        aupro_thresholds(maps, np.zeros((2, 4, 4), bool))
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 1, 1] = True
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro_exact(maps, masks, fpr_limit=0.0)
    with pytest.raises(ValueError, match="variant"):
        aupro(maps, masks, variant="200")


def test_trapezoid_to_interpolates_at_the_limit():
    x = np.array([0.0, 0.2, 0.4, 1.0])
    y = np.array([0.0, 0.2, 0.6, 1.0])
    # 0..0.2: 0.02; 0.2..0.3: y(0.3) = 0.4, area 0.1 * (0.2 + 0.4)/2 = 0.03 -> 0.05.
    assert trapezoid_to(x, y, 0.3) == pytest.approx(0.05, abs=1e-15)
    assert trapezoid_to(x, y, 0.4) == pytest.approx(0.02 + 0.08, abs=1e-15)  # limit on a sample


# ----------------------------------------------------------------------------------------------
# compute_all


def test_compute_all_keys_and_consistency():
    rng = np.random.default_rng(11)
    maps, masks = random_pixel_case(rng, ties=False)
    maps = np.concatenate([maps, rng.random((2, *maps.shape[1:])).astype(np.float32)])
    masks = np.concatenate([masks, np.zeros((2, *masks.shape[1:]), bool)])
    labels = masks.reshape(len(masks), -1).any(1).astype(int)
    scores = maps.reshape(len(maps), -1).max(1)

    image_only = compute_all(labels, scores)
    assert tuple(image_only) == IMAGE_KEYS
    assert image_only["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))

    full = compute_all(labels, scores, masks=masks, maps=maps)
    assert tuple(full) == IMAGE_KEYS + PIXEL_KEYS + ("aupro",)
    assert all(type(v) is float for v in full.values())
    assert full["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert full["aupro"] == pytest.approx(ref_aupro_all_pixels(maps, masks), abs=1e-9)

    both = compute_all(
        torch.from_numpy(labels),
        torch.from_numpy(scores),
        torch.from_numpy(masks),
        torch.from_numpy(maps),
        aupro_variant="both",
    )
    assert both["aupro_100"] == pytest.approx(ref_aupro_im_iad(maps, masks), abs=1e-9)
    assert {k: both[k] for k in full} == pytest.approx(full)
    assert "aupro" not in compute_all(labels, scores, masks, maps, aupro_variant="100")
    assert tuple(compute_all(labels, scores, masks, maps, aupro_variant="none")) == IMAGE_KEYS + PIXEL_KEYS


def test_compute_all_errors():
    with pytest.raises(MetricUndefinedError):
        compute_all([0, 0, 0], [0.1, 0.2, 0.3])  # all-good test set
    with pytest.raises(ValueError, match="without anomaly maps"):
        compute_all([0, 1], [0.1, 0.2], masks=np.zeros((2, 3, 3), bool))
    with pytest.raises(ValueError, match="aupro_variant"):
        compute_all([0, 1], [0.1, 0.2], aupro_variant="fast")


# ----------------------------------------------------------------------------------------------
# Continual


def test_forgetting_measure_hand_computed():
    nan = float("nan")
    # Rows: after training task l; columns: evaluated on task j (upper triangle undefined).
    a = [
        [0.9, nan, nan],
        [0.8, 0.95, nan],
        [0.7, 0.85, 0.9],
    ]
    # task 0: max(0.9, 0.8) - 0.7 = 0.2; task 1: 0.95 - 0.85 = 0.1 -> FM = 0.15
    assert forgetting_per_task(a) == pytest.approx([0.2, 0.1])
    assert forgetting_measure(a) == pytest.approx(0.15)
    assert final_average(a) == pytest.approx((0.7 + 0.85 + 0.9) / 3)
    b = np.array(
        [
            [0.6, 0.0, 0.0, 0.0],  # upper-triangle values are ignored, whatever they are
            [0.9, 0.5, 0.0, 0.0],
            [0.8, 0.6, 0.8, 0.0],
            [0.7, 0.7, 0.8, 0.9],
        ]
    )
    # task 0: best before the end is 0.9 (after task 1, not task 0): 0.9 - 0.7 = 0.2
    # task 1: max(0.5, 0.6) - 0.7 = -0.1 (improved: backward transfer); task 2: 0.8 - 0.8 = 0
    assert forgetting_per_task(b) == pytest.approx([0.2, -0.1, 0.0])
    assert forgetting_measure(b) == pytest.approx(0.1 / 3)


def test_forgetting_errors():
    with pytest.raises(ValueError, match="square"):
        forgetting_measure(np.zeros((2, 3)))
    with pytest.raises(MetricUndefinedError, match="two tasks"):
        forgetting_measure([[0.9]])
    with pytest.raises(MetricUndefinedError, match=r"\(1, 0\)"):
        forgetting_measure([[0.9, float("nan")], [float("nan"), 0.8]])


# ----------------------------------------------------------------------------------------------
# Efficiency


def test_timer_and_time_per_image():
    with Timer() as t:
        time.sleep(0.02)
    assert 0.015 < t.elapsed < 1.0
    r = time_per_image(2.0, 8)
    assert (r.seconds_per_image, r.fps) == (0.25, 4.0)
    with pytest.raises(ValueError):
        time_per_image(1.0, 0)


def test_measure_time_per_image_counts_images_and_includes_loading():
    def loader():
        for _ in range(3):
            time.sleep(0.01)  # "data loading" inside the timed loop
            yield (torch.zeros(4, 3, 2, 2), torch.zeros(4))

    seen = []
    r = measure_time_per_image(lambda batch: seen.append(batch[0].shape[0]), loader())
    assert r.n_images == 12 and seen == [4, 4, 4]
    assert r.total_s >= 0.025 and r.seconds_per_image == pytest.approx(r.total_s / 12)
    assert measure_time_per_image(lambda b: None, [{"image": np.zeros((5, 1))}]).n_images == 5


def test_peak_memory_sees_a_block_allocation():
    assert peak_rss_mb() > 0
    now = current_rss_mb()
    assert now is None or now > 0
    for reset in (True, False):  # "vmhwm" where permitted, else and also "sampling"
        with PeakMemory(reset_hwm=reset) as pm:
            block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
            time.sleep(0.05)
            del block
        assert pm.method in ("vmhwm", "sampling", "ru_maxrss")
        if pm.method != "ru_maxrss":
            assert 55 < pm.extra_mb < 1000, (pm.method, pm.extra_mb)
            assert pm.peak_mb == pm.peak_rss_mb >= pm.start_rss_mb + 55
        assert pm.cuda_peak_mb is None or pm.cuda_peak_mb >= 0
