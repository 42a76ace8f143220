"""SPADE: image kNN score and pixel kNN over the retrieved images' pyramids against brute force,
detects synthetic defects, exact model-file round trip."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from _helpers import assert_round_trip_identical, predict_and_auroc
from iadkit.data.transforms import ImageSet
from iadkit.errors import IadkitError
from iadkit.methods import NotFittedError
from iadkit.methods.spade import SPADE, pyramid_features
from iadkit.model import Model

SIZE = 64


@pytest.fixture(scope="module")
def fabric(synthetic):
    return synthetic("fabric", image_size=SIZE)


@pytest.fixture(scope="module")
def fitted(fabric):
    return Model.create("spade", image_size=SIZE).fit(fabric.train, calibration_fraction=0, progress=False)


def test_pyramid_concatenates_layers_at_the_finest_resolution():
    feats = {"a": torch.randn(2, 3, 8, 8), "b": torch.randn(2, 5, 4, 4)}
    pyr = pyramid_features(feats, ["a", "b"])
    assert pyr.shape == (2, 8, 8, 8)
    torch.testing.assert_close(pyr[:, :3], feats["a"])
    torch.testing.assert_close(pyr[:, 3:], F.interpolate(feats["b"], size=(8, 8), mode="bilinear"))


def test_scores_match_brute_force_knn(fabric):
    model = Model.create("spade", image_size=SIZE, k_images=3, k_pixels=2, sigma=0.0)
    model.fit(fabric.train, calibration_fraction=0, progress=False)
    det = model.detector
    train = ImageSet(fabric.train, model.preprocess)
    test = ImageSet(fabric.test[:4], model.preprocess)
    x_train = torch.stack([train.image(i) for i in range(len(train))])
    x_test = torch.stack([test.image(i) for i in range(len(test))])
    with torch.no_grad():
        ftr, fte = det.backbone_(x_train), det.backbone_(x_test)
        g_tr, g_te = ftr["head"].mean((2, 3)), fte["head"].mean((2, 3))
        p_tr, p_te = pyramid_features(ftr, det.tapped_layers()), pyramid_features(fte, det.tapped_layers())
        pred = model.predict_tensor(x_test)
    d2 = ((g_te[:, None] - g_tr[None]) ** 2).sum(-1)  # squared distances, test x train
    nearest = d2.argsort(1)[:, :3]
    expected_scores = torch.gather(d2, 1, nearest).mean(1)  # d(y) = 1/K Σ ||f - f_y||^2
    torch.testing.assert_close(pred.scores, expected_scores, rtol=1e-4, atol=1e-4)
    for b in range(len(test)):
        gallery = p_tr[nearest[b]].permute(0, 2, 3, 1).reshape(-1, p_tr.shape[1])  # only the K retrieved images
        q = p_te[b].permute(1, 2, 0).reshape(-1, p_te.shape[1])
        dd = ((q[:, None] - gallery[None]) ** 2).sum(-1).sort(1).values[:, :2].mean(1)
        expected_map = F.interpolate(dd.view(1, 1, *p_te.shape[-2:]), size=(SIZE, SIZE), mode="bilinear")[0, 0]
        torch.testing.assert_close(pred.maps[b], expected_map, rtol=1e-3, atol=1e-3)


def test_predict_before_fit_and_at_another_size_raise(fabric, fitted):
    with pytest.raises(NotFittedError):
        SPADE().predict(torch.zeros(1, 3, SIZE, SIZE))
    with pytest.raises(IadkitError, match="training image size"):
        fitted.detector.predict(torch.zeros(1, 3, 2 * SIZE, 2 * SIZE))


def test_detects_synthetic_defects(fabric, fitted):
    result, auroc = predict_and_auroc(fitted, fabric.test)
    assert auroc >= 0.75, auroc  # measured 0.83 (no training, deterministic); chance is 0.5
    assert result.maps.shape == (len(fabric.test), SIZE, SIZE)
    # K = 50 is capped by the 16 training images
    assert fitted.detector.train_global_.shape[0] == len(fabric.train) < fitted.detector.k_images


def test_model_file_round_trip(fabric, fitted, tmp_path):
    params = fitted.detector.get_params()
    json.dumps(params)
    loaded = assert_round_trip_identical(fitted, fabric.test, tmp_path / "spade.iad")
    assert loaded.detector.get_params() == params
    assert torch.equal(loaded.detector.train_pixels_, fitted.detector.train_pixels_)
