"""SoftPatch: LOF against scikit-learn, the Gaussian / nearest variants by hand, the weighted
coreset and soft re-weighting, PatchCore as its special case, robustness to defects hidden in
the training set (against PatchCore), the per-image noise report, exact model-file round trip."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from _helpers import assert_round_trip_identical
from iadkit.components.outliers import (
    gaussian_outlier_scores,
    local_outlier_factor,
    nearest_neighbor_outlier_scores,
    outlier_scores,
)
from iadkit.errors import InvalidParameterError
from iadkit.metrics.image import image_auroc
from iadkit.model import Model
from iadkit.types import ANOMALOUS, GOOD, Sample

SIZE = 64
N_TRAIN = 20
N_NOISE = 4  # 20 % of the training set replaced by defective images


# -- the outlier scores ---------------------------------------------------------------------------
def test_lof_equals_scikit_learn():
    from sklearn.neighbors import LocalOutlierFactor

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 25, 7))
    x[:, 4] += 5.0  # one clear outlier per group
    for k in (1, 5, 24, 40):  # k > N - 1 is capped as scikit-learn does
        ours = local_outlier_factor(torch.from_numpy(x), k, max_bytes=25 * 25 * 8 * 3 * 2).numpy()
        for g in range(x.shape[0]):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scikit-learn warns that it caps k at N - 1
                ref = -LocalOutlierFactor(n_neighbors=k).fit(x[g]).negative_outlier_factor_
            np.testing.assert_allclose(ours[g], ref, rtol=1e-5)
    assert (local_outlier_factor(torch.from_numpy(x), 5)[:, 4] > 2).all()


def test_gaussian_and_nearest_variants_by_hand():
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]], dtype=torch.float64)
    # nearest: 1 + distance to the closest other sample
    expected = [1 + 1.0, 1 + 1.0, 1 + 2.0, 1 + 10**0.5]  # (3,3)'s nearest is (0,2)
    np.testing.assert_allclose(nearest_neighbor_outlier_scores(x)[0].numpy(), expected, rtol=1e-6)
    # gaussian: 1 + sqrt((x - mu)^T (S + 0.01 I)^-1 (x - mu)) with the unbiased covariance S
    pts = x[0].numpy()
    mu = pts.mean(0)
    cov = np.cov(pts.T) + 0.01 * np.eye(2)
    inv = np.linalg.inv(cov)
    ref = [1 + float(np.sqrt((p - mu) @ inv @ (p - mu))) for p in pts]
    np.testing.assert_allclose(gaussian_outlier_scores(x)[0].numpy(), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown outlier method"):
        outlier_scores(x, "iforest")
    with pytest.raises(ValueError, match="at least 2"):
        local_outlier_factor(x[:, :1])


# -- the detector ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def canvases(synthetic):
    """Good images of two synthetic textures: 20 to train on, 12 + 12 to test."""
    out = {}
    for cat in ("metal", "fabric"):
        ds = synthetic(cat, image_size=SIZE, n_train=N_TRAIN + 24, n_test_good=2, n_test_per_defect=1)
        out[cat] = [s.load_image() for s in ds.train]
    return out


def _scratch(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A thin dark scratch that recurs at about the same place (a station that marks every part
    it damages): the kind of defect that, once in the memory bank, hides its test twins."""
    out = img.astype(np.float32).copy()
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = SIZE * 0.4 + rng.integers(-2, 3), SIZE * 0.55 + rng.integers(-2, 3)
    along = (xx - cx) * 0.8 + (yy - cy) * 0.6
    across = -(xx - cx) * 0.6 + (yy - cy) * 0.8
    m = (np.abs(across) <= 1.2) & (np.abs(along) <= SIZE * 0.18)
    out[m] *= 0.5
    return out.clip(0, 255).astype(np.uint8)


def _splits(goods: list[np.ndarray]) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(clean training set, the same with its last 20 % replaced by defective images that are
    labelled good — the noisy setting, constructed directly — and the test set)."""
    rng = np.random.default_rng(0)
    clean = [Sample(path=f"mem://train/{i}", label=GOOD, image=goods[i]) for i in range(N_TRAIN)]
    noise = [
        Sample(path=f"mem://noise/{i}", label=GOOD, image=_scratch(goods[N_TRAIN - N_NOISE + i], rng))
        for i in range(N_NOISE)
    ]
    test = [Sample(path=f"mem://test/good/{i}", label=GOOD, image=goods[N_TRAIN + i]) for i in range(12)]
    test += [
        Sample(path=f"mem://test/scratch/{i}", label=ANOMALOUS, image=_scratch(goods[N_TRAIN + 12 + i], rng))
        for i in range(12)
    ]
    return clean, clean[: N_TRAIN - N_NOISE] + noise, test


def _auroc(model: Model, test: list[Sample]) -> float:
    r = model.predict(test)
    return image_auroc(r.labels, r.scores)


def test_degrades_less_than_patchcore_with_defects_hidden_in_training(canvases):
    """20 % of the training images carry a defect and are labelled good. PatchCore stores the
    defect's patches in its bank and their test twins find them; SoftPatch discards them.
    Measured (AUROC clean -> noisy): metal PatchCore 1.000 -> 0.757, SoftPatch 1.000 -> 1.000;
    fabric PatchCore 1.000 -> 0.938, SoftPatch 1.000 -> 1.000."""
    for cat, goods in canvases.items():
        clean, noisy, test = _splits(goods)
        result = {}
        for method in ("patchcore", "softpatch"):
            result[method] = [
                _auroc(Model.create(method, image_size=SIZE).fit(train, calibration_fraction=0, progress=False), test)
                for train in (clean, noisy)
            ]
        drop_pc = result["patchcore"][0] - result["patchcore"][1]
        drop_sp = result["softpatch"][0] - result["softpatch"][1]
        assert result["softpatch"][1] >= 0.95, (cat, result)
        assert drop_pc >= 0.05 and drop_sp <= drop_pc - 0.05, (cat, result)


@pytest.fixture(scope="module")
def noisy_model(canvases):
    _, noisy, _ = _splits(canvases["metal"])
    return Model.create("softpatch", image_size=SIZE).fit(noisy, calibration_fraction=0, progress=False), noisy


def test_reports_which_training_images_were_down_weighted(noisy_model):
    """The defective training images lose far more of their patches than the good ones
    (measured: 52-86 % of each noise image's patches discarded, at most 12 % of a good one's)."""
    model, noisy = noisy_model
    info = model.detector.fit_info_
    shares = np.array(info["discarded_share"])
    assert [im["path"] for im in info["images"]] == [s.path for s in noisy]
    is_noise = np.array([s.path.startswith("mem://noise/") for s in noisy])
    assert image_auroc(is_noise.astype(int), shares) == 1.0  # every noise image above every good one
    assert shares[is_noise].min() >= 0.3 and shares[~is_noise].mean() <= 0.1
    # threshold 0.15: 15 % of all patches discarded (the quantile), the bank 10 % of all patches
    n_patches = info["n_patches"]
    assert n_patches == N_TRAIN * (SIZE // 8) ** 2
    assert info["n_discarded"] == pytest.approx(0.15 * n_patches, abs=2)
    assert info["n_kept"] == n_patches - info["n_discarded"] and info["bank_size"] == int(0.1 * n_patches)


def test_weighted_coreset_and_soft_scores(noisy_model, canvases):
    model, noisy = noisy_model
    det = model.detector
    # no discarded patch is in the bank, and each bank patch carries its own outlier score
    from iadkit.data.transforms import ImageSet

    train = ImageSet(noisy, model.preprocess)
    feats = torch.cat([det.embed(b.images) for b in train.batches(32)])
    patches = feats.permute(0, 2, 3, 1).reshape(len(noisy), -1, feats.shape[1])
    scores = det.patch_outlier_scores(patches)
    cut = det.fit_info_["score_threshold"]
    flat, flat_scores = patches.reshape(-1, patches.shape[-1]), scores.reshape(-1)
    d, i = torch.cdist(det.memory_bank_, flat, compute_mode="donot_use_mm_for_euclid_dist").min(1)
    assert float(d.max()) < 1e-3  # bank rows are training patches
    assert (flat_scores[i] <= cut).all()
    torch.testing.assert_close(det.bank_weights_, flat_scores[i])
    # test score = nearest distance x that neighbour's weight; image score = the map's maximum
    images = torch.stack([ImageSet(_splits(canvases["metal"])[2][-2:], model.preprocess).image(j) for j in range(2)])
    pred = det.predict(images)
    dist, idx, _ = det.nearest_patches(images)
    torch.testing.assert_close(pred.maps, dist * det.bank_weights_[idx])
    torch.testing.assert_close(pred.scores, pred.maps.flatten(1).max(1).values)


def test_patchcore_is_the_special_case_without_noise_handling(canvases):
    """threshold 0 (discard nothing) and no soft weights: exactly PatchCore scored by the plain maximum."""
    clean, _, test = _splits(canvases["fabric"])
    sp = Model.create("softpatch", image_size=SIZE, threshold=0.0, soft_weight=False).fit(
        clean, calibration_fraction=0, progress=False
    )
    pc = Model.create("patchcore", image_size=SIZE, num_neighbors=1).fit(clean, calibration_fraction=0, progress=False)
    assert torch.equal(sp.detector.memory_bank_, pc.detector.memory_bank_)
    a, b = sp.predict(test[:6]), pc.predict(test[:6])
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.maps, b.maps)


def test_model_file_round_trip_and_params(noisy_model, canvases, tmp_path):
    model, _ = noisy_model
    test = _splits(canvases["metal"])[2]
    loaded = assert_round_trip_identical(model, test[:8], tmp_path / "sp.iad")
    assert torch.equal(loaded.detector.bank_weights_, model.detector.bank_weights_)
    for bad in ({"threshold": 1.0}, {"lof_k": 0}, {"weight_method": "iforest"}, {"num_neighbors": 9}):
        with pytest.raises(InvalidParameterError, match=next(iter(bad))):
            Model.create("softpatch", image_size=SIZE, **bad).fit(test[:2], progress=False)


def test_single_training_image_keeps_every_patch(canvases):
    one = [Sample(path="mem://one", label=GOOD, image=canvases["metal"][0])]
    model = Model.create("softpatch", image_size=SIZE).fit(one, calibration_fraction=0, progress=False)
    info = model.detector.fit_info_
    assert info["n_discarded"] == 0 and info["weight_method"].startswith("none")
    assert torch.all(model.detector.bank_weights_ == 1)
