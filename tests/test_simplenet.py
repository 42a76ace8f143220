"""SimpleNet: truncated L1 loss, adaptor/discriminator, learning on the synthetic set, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from _helpers import assert_round_trip_identical, built, predict_and_auroc
from iadkit.components.adaptor import Discriminator, FeatureAdaptor, gaussian_feature_noise, truncated_l1_loss
from iadkit.components.features import PatchEmbedding
from iadkit.components.postprocess import gaussian_blur, upsample
from iadkit.methods.base import NotFittedError
from iadkit.methods.simplenet import SimpleNet
from iadkit.model import Model

SIZE = 64


@pytest.fixture(scope="module")
def fabric(synthetic):
    return synthetic("fabric", n_test_good=10, n_test_per_defect=5)


@pytest.fixture(scope="module")
def fitted(fabric):
    torch.set_num_threads(1)
    model = Model.create("simplenet", image_size=SIZE, epochs=40, seed=0)
    return model.fit(fabric.train, calibration_fraction=0, progress=False)


def test_learns_to_detect_synthetic_defects(fitted, fabric) -> None:
    result, auroc = predict_and_auroc(fitted, fabric.test)
    # Measured 0.89 (seeds 0-2: 0.81-0.89) with 40 epochs at 64 px; chance is 0.5.
    assert auroc >= 0.75, auroc
    assert result.maps.shape == (len(fabric.test), SIZE, SIZE)


def test_save_load_gives_identical_predictions(fitted, fabric, tmp_path) -> None:
    assert_round_trip_identical(fitted, fabric.test[:4], tmp_path / "simplenet.safetensors")


def test_scores_are_minus_discriminator_and_map_is_smoothed(fitted, fabric) -> None:
    det = fitted.detector
    from iadkit.data.transforms import ImageSet

    x = torch.stack([ImageSet(fabric.test[:2], fitted.preprocess).image(i) for i in range(2)])
    with torch.no_grad():
        pred = fitted.predict_tensor(x)
        fmap = det._patch_features(x)
        b, d, h, w = fmap.shape
        q = det.adaptor_(fmap.permute(0, 2, 3, 1).reshape(-1, d))
        s = -det.discriminator_(q).reshape(b, h, w)
    assert (h, w) == (SIZE // 8, SIZE // 8)  # blocks.2 grid (stride 8)
    assert torch.allclose(pred.scores, s.flatten(1).max(dim=1).values, atol=1e-6)
    # the map: upsampled, then smoothed with sigma 4 at a 224-px input, scaled to this size
    smoothed = gaussian_blur(upsample(s, (SIZE, SIZE)), 4.0 * SIZE / 224)
    assert torch.allclose(pred.maps, smoothed, atol=1e-5)


def test_truncated_l1_loss_by_hand() -> None:
    normal = torch.tensor([1.0, 0.2, 0.5])  # margins 0, 0.3, 0
    fake = torch.tensor([-1.0, 0.0, 0.4])  # margins 0, 0.5, 0.9
    assert truncated_l1_loss(normal, fake) == pytest.approx(0.3 / 3 + 1.4 / 3)
    # zero once both sides clear the 0.5 margin: no more push
    assert truncated_l1_loss(torch.tensor([0.6, 3.0]), torch.tensor([-0.5, -7.0])) == 0


def test_components_follow_the_paper() -> None:
    det = built(SimpleNet())
    assert isinstance(det.embedding_, PatchEmbedding) and det.embedding_.patch_size == 3
    assert det.layers is None and det.tapped_layers() == ["blocks.2", "blocks.4"]
    assert (
        isinstance(det.adaptor_, FeatureAdaptor) and det.adaptor_.linear.in_features == det.adaptor_.linear.out_features
    )
    body = list(det.discriminator_.body)
    assert isinstance(body[0], nn.Linear) and isinstance(body[1], nn.BatchNorm1d)
    assert isinstance(body[2], nn.LeakyReLU) and body[2].negative_slope == 0.2
    assert det.discriminator_.tail.out_features == 1
    assert det.threshold == 0.5 and det.adaptor_lr == 1e-4 and det.discriminator_lr == 2e-4
    d = Discriminator(8).eval()
    assert d(torch.randn(5, 8)).shape == (5,)


def test_initialisation_and_optimisers_follow_the_authors_code() -> None:
    torch.manual_seed(0)
    a = FeatureAdaptor(300)
    std = math.sqrt(2.0 / (300 + 300))  # xavier normal
    assert float(a.linear.weight.std()) == pytest.approx(std, rel=0.05)
    det = SimpleNet()
    assert det.adaptor_lr == pytest.approx(0.1 * 1e-3) and det.adaptor_weight_decay == 0.01
    assert det.discriminator_lr == 2e-4 and det.weight_decay == 1e-5


def test_gaussian_feature_noise_has_the_requested_std() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(20000, 16)
    noisy = gaussian_feature_noise(x, 0.015, g)
    assert noisy.std().item() == pytest.approx(0.015, rel=0.02)
    assert noisy.mean().abs().item() < 1e-3


def test_predict_before_fit_raises() -> None:
    with pytest.raises(NotFittedError):
        SimpleNet().predict(torch.zeros(1, 3, SIZE, SIZE))
