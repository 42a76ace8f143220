"""PaDiM and its Gaussian components: numpy references, the thread guard, synthetic defects, model files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iadkit.components.gaussian import (
    GaussianAccumulator,
    GaussianFitError,
    mahalanobis,
    precision_matrices,
    regularized_cholesky,
    torch_threads,
    whitening_matrices,
)
from iadkit.errors import InvalidParameterError


# -- Gaussian components against numpy --------------------------------------------------------------
def test_accumulator_matches_numpy_cov():
    rng = np.random.default_rng(0)
    # 3 positions, 4 dims, 50 samples with a large common offset (cancellation-prone)
    x = rng.normal(size=(50, 3, 4)) * [1.0, 2.0, 0.5, 3.0] + 1e4
    acc = GaussianAccumulator()
    for s in range(0, 50, 7):  # uneven batches
        acc.add(torch.from_numpy(x[s : s + 7]))
    mean, cov = acc.finalize()
    for p in range(3):
        np.testing.assert_allclose(mean[p].numpy(), x[:, p].mean(0), rtol=1e-12)
        np.testing.assert_allclose(cov[p].numpy(), np.cov(x[:, p], rowvar=False), rtol=1e-8, atol=1e-10)


def test_accumulator_errors():
    acc = GaussianAccumulator()
    acc.add(torch.zeros(1, 2, 3))
    with pytest.raises(GaussianFitError, match="at least 2"):
        acc.finalize()
    with pytest.raises(GaussianFitError, match="changed"):
        acc.add(torch.zeros(1, 5, 3))


def test_mahalanobis_matches_numpy_inverse():
    rng = np.random.default_rng(1)
    p, d, eps = 5, 6, 0.01
    a = rng.normal(size=(p, d, 3))
    cov = a @ a.transpose(0, 2, 1)  # rank 3 < d: only eps makes it invertible
    mean = rng.normal(size=(p, d))
    x = rng.normal(size=(4, p, d))
    W = whitening_matrices(torch.from_numpy(cov), eps)
    got = mahalanobis(torch.from_numpy(x), torch.from_numpy(mean), W).numpy()
    inv = np.linalg.inv(cov + eps * np.eye(d))
    diff = x - mean
    ref = np.sqrt(np.einsum("bpi,pij,bpj->bp", diff, inv, diff))
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    np.testing.assert_allclose(precision_matrices(torch.from_numpy(cov), eps).numpy(), inv, rtol=1e-8, atol=1e-8)
    # W^T W is the precision matrix and W is lower-triangular
    np.testing.assert_allclose((W.transpose(1, 2) @ W).numpy(), inv, rtol=1e-8, atol=1e-8)
    assert torch.equal(W, torch.tril(W))


def test_mahalanobis_hand_computed():
    # Sigma = diag(4, 1) - eps, eps = 0 -> distance of (2, 1) from 0 is sqrt(4/4 + 1/1) = sqrt(2)
    cov = torch.tensor([[[4.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    W = whitening_matrices(cov, 0.0)
    d = mahalanobis(torch.tensor([[[2.0, 1.0]]], dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64), W)
    assert float(d) == pytest.approx(np.sqrt(2.0))


def test_cholesky_rejects_bad_covariance():
    with pytest.raises(GaussianFitError, match="not positive definite"):
        regularized_cholesky(torch.full((1, 2, 2), float("nan"), dtype=torch.float64), 0.01)
    with pytest.raises(GaussianFitError, match="square"):
        regularized_cholesky(torch.zeros(1, 2, 3), 0.01)


def test_thread_guard_restores_and_runs_batched_factorisation():
    """The guard drops to one thread around batched LAPACK (the oneMKL stall) and restores after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            with torch_threads(1):  # re-entrant
                assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), torch_threads(1):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
        # The case that stalls unguarded: many batched factorisations with 2 threads requested.
        g = torch.Generator().manual_seed(0)
        a = torch.randn(784, 48, 20, generator=g, dtype=torch.float64)
        cov = a @ a.transpose(1, 2) / 20
        W = whitening_matrices(cov, 0.01)
        assert torch.get_num_threads() == 2
        eye = torch.eye(48, dtype=torch.float64)
        prec = W.transpose(1, 2) @ W
        assert torch.allclose(prec @ (cov + 0.01 * eye), eye.expand(784, 48, 48), atol=1e-6)
    finally:
        torch.set_num_threads(before)


# -- the method ---------------------------------------------------------------------------------------
SIZE = 96


@pytest.fixture(scope="module")
def metal(synthetic):
    return synthetic("metal", image_size=SIZE)


@pytest.fixture(scope="module")
def fitted(metal):
    from iadkit.model import Model

    return Model.create("padim", image_size=SIZE).fit(metal.train, calibration_fraction=0, progress=False)


def test_padim_detects_synthetic_defects(metal, fitted):
    from _helpers import predict_and_auroc

    result, auroc = predict_and_auroc(fitted, metal.test)
    assert auroc >= 0.95, auroc  # measured 1.0
    assert result.maps.shape == (len(metal.test), SIZE, SIZE)
    det = fitted.detector
    grid = (SIZE // 4) ** 2  # stride-4 grid of blocks.1
    assert det.mean_.shape == (grid, 100) and det.whitening_.shape == (grid, 100, 100)
    # the image score is the maximum of the smoothed map
    np.testing.assert_allclose(result.scores, result.maps.reshape(len(metal.test), -1).max(1), rtol=1e-6)


def test_padim_matches_numpy_reference_on_its_own_features(metal, fitted):
    """Fit statistics and distances equal a direct numpy computation on the same embeddings."""
    from iadkit.data.transforms import ImageSet

    det = fitted.detector
    train = torch.cat([b.images for b in ImageSet(metal.train, fitted.preprocess).batches(16)])
    with torch.inference_mode():
        emb = det.embed(train).flatten(2).transpose(1, 2).double().numpy()  # [N, P, d]
    pos = 37
    x = emb[:, pos]
    np.testing.assert_allclose(det.mean_[pos].numpy(), x.mean(0), rtol=1e-5, atol=1e-5)
    inv = np.linalg.inv(np.cov(x, rowvar=False) + 0.01 * np.eye(x.shape[1]))
    test_vec = emb[0, pos] + 0.5
    ref = np.sqrt((test_vec - x.mean(0)) @ inv @ (test_vec - x.mean(0)))
    got = mahalanobis(
        torch.from_numpy(test_vec)[None, None].float(), det.mean_[pos : pos + 1], det.whitening_[pos : pos + 1]
    )
    assert float(got) == pytest.approx(ref, rel=1e-3)
    # the channel subset is PaDiM's seeded random choice of 100 of the 176 channels
    idx = det.channel_index_
    assert idx.shape == (100,) and torch.equal(idx, torch.sort(idx).values) and int(idx.max()) < 176


def test_padim_model_file_round_trip(metal, fitted, tmp_path):
    from _helpers import assert_round_trip_identical

    loaded = assert_round_trip_identical(fitted, metal.test, tmp_path / "padim.iad")
    assert loaded.detector.get_params() == fitted.detector.get_params()
    assert torch.equal(loaded.detector.channel_index_, fitted.detector.channel_index_)


def test_padim_rejects_bad_settings():
    from iadkit.methods.padim import PaDiM

    with pytest.raises(InvalidParameterError, match="n_features"):
        PaDiM(n_features=500).validate()
    with pytest.raises(InvalidParameterError, match="eps"):
        PaDiM(eps=-1.0).validate()
