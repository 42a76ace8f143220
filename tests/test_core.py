"""The pipeline around every method: preprocessing, thresholds, post-processing, model files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

import _dummy  # noqa: F401  (registers test_pixel_zscore)
from iadkit.components.postprocess import gaussian_blur, upsample
from iadkit.data.transforms import ImageSet, Preprocess
from iadkit.errors import MetricUndefinedError, ModelFileError
from iadkit.methods.base import NotFittedError
from iadkit.model import Model
from iadkit.store import read_manifest
from iadkit.thresholds import f1_optimal_threshold, false_alarm_threshold
from iadkit.types import ANOMALOUS, GOOD, Prediction, Sample


def flat_images(n: int, size: int = 16, seed: int = 0, spot: bool = False) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = (100 + rng.normal(0, 2, (size, size, 1))).clip(0, 255).astype(np.uint8)
        mask = np.zeros((size, size), bool)
        if spot:
            img[5:8, 5:8] = 220
            mask[5:8, 5:8] = True
        out.append(
            Sample(path=f"mem://{seed}/{i}", label=ANOMALOUS if spot else GOOD, image=img, mask=mask if spot else None)
        )
    return out


# -- preprocessing -------------------------------------------------------------------------
def test_preprocess_grayscale_and_16bit_give_same_tensor():
    p = Preprocess(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    g8 = np.full((8, 8, 1), 255, np.uint8)
    g16 = np.full((8, 8), 65535, np.uint16)
    rgb = np.full((8, 8, 3), 255, np.uint8)
    for arr in (g8, g16, rgb):
        t = p(arr)
        assert t.shape == (3, 8, 8)
        assert torch.allclose(t, torch.ones(3, 8, 8))  # (1 - 0.5) / 0.5


def test_preprocess_keeps_16bit_precision():
    p = Preprocess(image_size=4, mean=(0, 0, 0), std=(1, 1, 1))
    a = np.full((4, 4), 1000, np.uint16)
    b = np.full((4, 4), 1001, np.uint16)  # identical after a naive 8-bit conversion
    assert (p(b) - p(a)).abs().min() > 0


def test_preprocess_crop_and_mask_geometry_agree():
    p = Preprocess(image_size=(8, 8), crop_size=(4, 4))
    mask = np.zeros((16, 16), bool)
    mask[6:10, 6:10] = True  # the centre quarter in the resized 8x8 grid is rows 2..6
    m = p.mask(mask)
    assert m.shape == (4, 4)
    assert m[1:3, 1:3].all() and m.sum() == 4
    assert p.to_dict() == Preprocess.from_dict(json.loads(json.dumps(p.to_dict()))).to_dict()


def test_preprocess_rejects_bad_crop():
    with pytest.raises(ValueError, match="crop_size"):
        Preprocess(image_size=8, crop_size=16)


def test_imageset_masks_for_good_and_missing_masks():
    good = flat_images(2)
    bad = [Sample(path="mem://x", label=ANOMALOUS, image=good[0].image)]
    ds = ImageSet(good + bad, Preprocess(image_size=16))
    assert not ds.mask(0).any()
    assert not ds.has_all_masks()
    with pytest.raises(ValueError, match="no ground-truth mask"):
        ds.mask(2)


# -- post-processing -----------------------------------------------------------------------
def test_gaussian_blur_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.random((2, 40, 40)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(x), sigma=4.0).numpy()
    ref = np.stack([ndi.gaussian_filter(m, sigma=4.0, mode="mirror", truncate=4.0) for m in x])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_upsample_shape_and_constant():
    x = torch.full((3, 4, 4), 2.0)
    y = upsample(x, (16, 16))
    assert y.shape == (3, 16, 16) and torch.allclose(y, torch.full_like(y, 2.0))


def test_prediction_validates_shapes():
    with pytest.raises(ValueError):
        Prediction(scores=torch.zeros(2, 1))
    with pytest.raises(ValueError):
        Prediction(scores=torch.zeros(2), maps=torch.zeros(3, 4, 4))


# -- thresholds ------------------------------------------------------------------------------
def test_false_alarm_threshold_hand_computed():
    scores = np.arange(1, 101, dtype=float)  # 1..100
    t = false_alarm_threshold(scores, target_fpr=0.05)
    # 5 of 100 may lie above t: t is the 95th smallest = 95; scores 96..100 are flagged.
    assert t.value == 95.0
    assert t.details["calibration_fpr"] == pytest.approx(0.05)
    t0 = false_alarm_threshold(scores, target_fpr=0.001)  # fewer than one image allowed
    assert t0.value == 100.0 and t0.details["calibration_fpr"] == 0.0
    with pytest.raises(MetricUndefinedError):
        false_alarm_threshold(np.array([]))


def test_f1_optimal_threshold_hand_computed():
    labels = np.array([0, 0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9])
    # Cut at >= 0.4 flags {0.4, 0.5, 0.6, 0.9}: TP 3, FP 1 -> P .75, R 1, F1 6/7 (the best).
    t = f1_optimal_threshold(labels, scores)
    assert t.details["f1"] == pytest.approx(6 / 7)
    assert 0.3 < t.value < 0.4  # midpoint 0.35, so `score > t` reproduces the cut
    assert ((scores > t.value) == np.array([0, 0, 0, 1, 1, 1, 1], bool)).all()
    with pytest.raises(MetricUndefinedError):
        f1_optimal_threshold(np.zeros(3), np.arange(3))


# -- model and files -------------------------------------------------------------------------
def test_model_fit_predict_and_verdicts():
    model = Model.create("test_pixel_zscore", image_size=16)
    with pytest.raises(NotFittedError):
        model.predict(flat_images(1))
    model.fit(flat_images(12), calibration=flat_images(8, seed=1), target_fpr=0.0)
    result = model.predict(flat_images(4, seed=2) + flat_images(4, seed=3, spot=True))
    assert result.maps.shape == (8, 16, 16)
    assert (result.scores[4:] > result.scores[:4].max()).all()
    assert result.verdicts.tolist() == [False] * 4 + [True] * 4
    assert model.map_range is not None and model.map_range[0] < model.map_range[1]
    assert result.maps[4:, 5:8, 5:8].mean() > result.maps[4:].mean()  # the spot is where the map is high


def test_model_calibration_fraction_holds_out_images(caplog):
    model = Model.create("test_pixel_zscore", image_size=16)
    model.fit(flat_images(12), calibration_fraction=0.2)
    assert model.info["n_train"] == 10 and model.info["n_calibration"] == 2
    assert model.threshold is not None and model.threshold.rule == "false_alarm_rate"
    assert model.threshold.details["n_good"] == 2
    # the default (10 %) holds out nothing when fewer than 10 images would remain: no threshold, said so
    small = Model.create("test_pixel_zscore", image_size=16).fit(flat_images(8))
    assert small.info["n_train"] == 8 and small.threshold is None
    assert "no threshold" in caplog.text


def test_save_load_round_trip_identical(tmp_path):
    model = Model.create("test_pixel_zscore", image_size=16, eps=0.01)
    model.fit(flat_images(6), calibration=flat_images(4, seed=1))
    path = model.save(tmp_path / "m.iad")
    loaded = Model.load(path)
    test = flat_images(3, seed=5) + flat_images(2, seed=6, spot=True)
    a, b = model.predict(test), loaded.predict(test)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.maps, b.maps)
    assert loaded.threshold == model.threshold and loaded.map_range == model.map_range
    assert loaded.detector.eps == 0.01
    manifest = read_manifest(path)
    assert manifest["method"] == "test_pixel_zscore" and manifest["preprocess"]["image_size"] == [16, 16]
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


def test_model_file_errors(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        Model.load(tmp_path / "absent.iad")
    junk = tmp_path / "junk.iad"
    junk.write_bytes(b"\x00" * 3)
    with pytest.raises(ModelFileError, match="not an iadkit model"):
        Model.load(junk)
    model = Model.create("test_pixel_zscore", image_size=16).fit(flat_images(4))
    good = model.save(tmp_path / "good.iad")
    data = good.read_bytes()
    (tmp_path / "cut.iad").write_bytes(data[: len(data) - 10])
    with pytest.raises(ModelFileError, match="corrupt"):
        Model.load(tmp_path / "cut.iad")
    with pytest.raises(NotFittedError):
        Model.create("test_pixel_zscore", image_size=16).save(tmp_path / "unfitted.iad")


def test_evaluate_reports_pixel_metrics_only_when_maps_exist():
    from iadkit.evaluation import evaluate

    test = flat_images(4, seed=2) + flat_images(4, seed=3, spot=True)
    for method, has_pixels in (("test_pixel_zscore", True), ("test_score_only", False)):
        model = Model.create(method, image_size=16).fit(flat_images(8))
        result = evaluate(model, test)
        assert result.metrics["image_auroc"] == 1.0
        assert ("pixel_auroc" in result.metrics) == has_pixels
        assert result.timings["seconds_per_image"] > 0 and result.timings["peak_rss_mb"] > 0
