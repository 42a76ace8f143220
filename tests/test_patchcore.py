"""PatchCore: Eq. 7 by hand, synthetic defects, model-file round trip, ONNX Runtime parity, coreset on real features."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from _helpers import assert_round_trip_identical, predict_and_auroc
from iadkit.components.memory_bank import StreamingCoreset, coverage_radius
from iadkit.data.transforms import ImageSet
from iadkit.errors import InvalidParameterError, NotFittedError
from iadkit.methods.patchcore import PatchCore, reweighted_image_scores
from iadkit.model import Model

SIZE = 96


@pytest.fixture(scope="module")
def synth(synthetic):
    return {c: synthetic(c, image_size=SIZE) for c in ("metal", "wood")}


@pytest.fixture(scope="module")
def fitted(synth):
    model = Model.create("patchcore", image_size=SIZE, coreset_ratio=0.1)
    model.fit(synth["metal"].train, calibration_fraction=0, progress=False)
    return model


def auroc(model, test):
    result, score = predict_and_auroc(model, test)
    return score, result


def test_eq7_reweighting_hand_computed():
    # bank: m* = (0,0) with neighbours at distance 1 and 2 from it; test patch at (0, 3)
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, -2.0], [50.0, 50.0]])
    emb = torch.tensor([[[0.0, 3.0], [0.0, 0.5]]])  # patch 0 is the most anomalous (s* = 3)
    patch = torch.tensor([[3.0, 0.5]])
    nn_idx = torch.tensor([[0, 0]])
    s = reweighted_image_scores(patch, nn_idx, emb, bank, num_neighbors=3)
    d = [3.0, math.sqrt(1 + 9), 5.0]  # ||m_test - m|| for N_3(m*) = {m*, (1,0), (0,-2)}
    expected = (1 - math.exp(d[0]) / sum(math.exp(v) for v in d)) * 3.0
    assert float(s) == pytest.approx(expected, rel=1e-6)
    # b <= 1 would zero every score; the raw maximum is returned instead
    assert float(reweighted_image_scores(patch, nn_idx, emb, bank, num_neighbors=1)) == 3.0
    # huge distances must not overflow
    s_big = reweighted_image_scores(patch * 1e4, nn_idx, emb * 1e4, bank * 1e4, num_neighbors=3)
    assert torch.isfinite(s_big).all()


def test_detects_synthetic_defects(synth, fitted):
    score, result = auroc(fitted, synth["metal"].test)
    assert score >= 0.95, score  # measured 1.0
    assert result.maps.shape == (len(synth["metal"].test), SIZE, SIZE)
    info = fitted.detector.fit_info_
    assert info["bank_size"] == int(info["n_patches"] * 0.1) and info["grid"] == (SIZE // 8, SIZE // 8)
    wood = Model.create("patchcore", image_size=SIZE).fit(synth["wood"].train, calibration_fraction=0, progress=False)
    assert auroc(wood, synth["wood"].test)[0] >= 0.85  # measured 0.94


def test_model_file_round_trip(synth, fitted, tmp_path):
    path = tmp_path / "pc.iad"
    manifest_params = fitted.detector.get_params()
    json.dumps(manifest_params)  # hyper-parameters are JSON-able as stored
    loaded = assert_round_trip_identical(fitted, synth["metal"].test, path)
    assert loaded.detector.get_params() == manifest_params
    assert torch.equal(loaded.detector.memory_bank_, fitted.detector.memory_bank_)
    # the frozen backbone is not in the file: only the bank
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == {"memory_bank_"}


def test_predict_before_fit_and_bad_params():
    det = PatchCore()
    with pytest.raises(NotFittedError):
        det.predict(torch.zeros(1, 3, 64, 64))
    with pytest.raises(InvalidParameterError, match="coreset_method"):
        PatchCore(coreset_method="kmeans").validate()
    with pytest.raises(InvalidParameterError, match="search"):
        PatchCore(search="annoy").validate()


def test_approximate_search_close_to_exact(synth, fitted):
    exact = fitted.predict(synth["metal"].test)
    det = fitted.detector
    try:
        det.set_params(search="hnsw")
        approx = fitted.predict(synth["metal"].test)
    finally:
        det.set_params(search="exact")
    assert (approx.scores >= exact.scores - 1e-4).all() or np.corrcoef(approx.scores, exact.scores)[0, 1] > 0.99
    assert np.corrcoef(approx.maps.ravel(), exact.maps.ravel())[0, 1] > 0.99


def test_onnxruntime_features_match_torch(synth, fitted, tmp_path, monkeypatch):
    """The optional ONNX Runtime path computes the same patch features (1e-4) and scores."""
    monkeypatch.setenv("IADKIT_CACHE_DIR", str(tmp_path / "cache"))
    det = fitted.detector
    assert det.feature_runtime == "auto" and det._path.active_runtime == "onnxruntime"  # the CPU default
    images = ImageSet(synth["metal"].test[:6], fitted.preprocess).batches(6).__next__().images
    with torch.inference_mode():
        ref = det.embed(images)
        try:
            det.set_params(feature_runtime="onnxruntime")
            got = det.embed(images)
            pred_ort = fitted.predict_tensor(images)
        finally:
            det.set_params(feature_runtime="torch")
        pred_torch = fitted.predict_tensor(images)
    assert det.is_fitted  # an inference knob keeps the fit
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) < 1e-4
    assert torch.allclose(pred_ort.scores, pred_torch.scores, atol=1e-4, rtol=1e-5)
    assert torch.allclose(pred_ort.maps, pred_torch.maps, atol=1e-4, rtol=1e-5)
    cached = list((tmp_path / "cache").glob("features-*.onnx"))
    assert len(cached) == 1  # exported once, keyed by weights sha256, layers, embedding and size


def test_composable_coreset_on_real_patch_features(synth, fitted):
    """On real patch features (where plain greedy is affordable) the composable coreset's
    coverage radius stays within 2x of plain greedy's (measured ~1.1) and within its certificate."""
    det = fitted.detector
    # wood is colour, the fitted model grayscale: the feature pass itself does not mind
    pre = dataclasses.replace(fitted.preprocess, channels=None)
    images = torch.cat([b.images for b in ImageSet(synth["wood"].train, pre).batches(16)])
    with torch.inference_mode():
        feats = det.embed(images)
    x = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])  # 16 x 144 patches
    results = {}
    for method in ("composable", "greedy"):
        b = StreamingCoreset(0.1, method=method, chunk_size=500, seed=0)
        for s in range(0, x.shape[0], 144):
            b.add(x[s : s + 144])
        results[method] = (b, b.result())
    builder, comp = results["composable"]
    _, plain = results["greedy"]
    assert comp.n_chunks >= 4
    xp = builder.project(x)
    r_comp = coverage_radius(xp, builder.project(comp.bank))
    r_plain = coverage_radius(xp, builder.project(plain.bank))
    assert r_comp <= comp.radius_bound * (1 + 1e-5)
    assert r_comp <= 2.0 * r_plain, (r_comp, r_plain)
