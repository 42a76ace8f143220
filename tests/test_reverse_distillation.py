"""Reverse distillation (RD4AD): decoder mirrors the encoder, map = Σ upsampled (1 − cos), learns
on synthetic defects, exact model-file round trip."""

from __future__ import annotations

import json

import pytest
import torch

from _helpers import assert_round_trip_identical, built, predict_and_auroc
from iadkit.components.distillation import OneClassBottleneck, ReverseDecoder
from iadkit.components.losses import cosine_distance_map, flattened_cosine_loss, multilevel_cosine_loss
from iadkit.components.postprocess import upsample
from iadkit.methods import NotFittedError
from iadkit.methods.reverse_distillation import ReverseDistillation
from iadkit.model import Model

SIZE = 64
PARAMS = dict(epochs=20, batch_size=4)  # paper: 200 epochs, batch 16 (too slow for a unit test)


@pytest.fixture(scope="module")
def label(synthetic):
    return synthetic("label", image_size=SIZE)


@pytest.fixture(scope="module")
def fitted(label):
    return Model.create("reverse_distillation", image_size=SIZE, **PARAMS).fit(
        label.train, calibration_fraction=0, progress=False
    )


@pytest.mark.parametrize(
    "layers", [("blocks.1", "blocks.2", "blocks.4"), ("blocks.2", "blocks.3", "blocks.4"), ("blocks.2", "blocks.4")]
)
def test_decoder_restores_every_encoder_level(layers):
    det = built(ReverseDistillation(layers=layers, epochs=1))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        enc = det.features(x)
        z = det.bottleneck_(enc)
        dec = det.decoder_(z)
    deepest = det.layer_strides()[-1]
    assert z.shape == (2, 2 * det.layer_channels()[-1], 64 // (2 * deepest), 64 // (2 * deepest))
    assert [d.shape for d in dec] == [e.shape for e in enc]


def test_paper_shapes_for_a_wide_resnet_pyramid():
    # WideResNet-50 layer1..3: 256@1/4, 512@1/8, 1024@1/16 -> OCE 2048@1/32 -> back again
    # (the paper's 256 px input; 64 px here keeps the test fast, the strides are the same)
    ch, st = [256, 512, 1024], [4, 8, 16]
    ocbe = OneClassBottleneck(ch, st)
    dec = ReverseDecoder(ch, st, embed_channels=ocbe.embed_channels)
    feats = [torch.randn(2, c, 64 // s, 64 // s) for c, s in zip(ch, st)]
    with torch.no_grad():
        z = ocbe(feats)
        out = dec(z)
    assert z.shape == (2, 2048, 2, 2)
    assert [o.shape for o in out] == [f.shape for f in feats]
    # MFF as in the paper: 256 -> 512 -> 1024 by two strided convs, 512 -> 1024 by one
    convs = [[m for m in branch.modules() if isinstance(m, torch.nn.Conv2d)] for branch in ocbe.fuse]
    assert [[(c.in_channels, c.out_channels, c.stride) for c in b] for b in convs] == [
        [(256, 512, (2, 2)), (512, 1024, (2, 2))],
        [(512, 1024, (2, 2))],
    ]
    ups = [m for m in dec.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert ups and all(m.stride == (2, 2) for m in ups)  # upsampling by deconvolution


def test_the_two_loss_forms_by_hand():
    """Per position (the paper) weighs every position alike; the official code's cosine of the
    whole flattened map is dominated by high-norm positions."""
    t = torch.zeros(1, 2, 1, 2)
    s = torch.zeros(1, 2, 1, 2)
    t[0, :, 0, 0], s[0, :, 0, 0] = torch.tensor([10.0, 0.0]), torch.tensor([10.0, 0.0])  # strong, matched
    t[0, :, 0, 1], s[0, :, 0, 1] = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])  # weak, orthogonal
    assert float(multilevel_cosine_loss([(t, s)])) == pytest.approx((0.0 + 1.0) / 2)
    # flattened: t = (10, 0, 0, 1), s = (10, 1, 0, 0) -> cos = 100 / 101
    assert float(flattened_cosine_loss([(t, s)])) == pytest.approx(1 - 100 / 101)
    assert float(flattened_cosine_loss([(t, s), (t, t)])) == pytest.approx(1 - 100 / 101)


def test_predict_before_fit_raises():
    with pytest.raises(NotFittedError):
        ReverseDistillation(epochs=1).predict(torch.zeros(1, 3, SIZE, SIZE))


def test_learns_synthetic_defects(label, fitted):
    det = fitted.detector
    assert det.loss_history_[-1] < 0.3 * det.loss_history_[0]
    result, auroc = predict_and_auroc(fitted, label.test)
    assert auroc >= 0.7, auroc  # measured 0.81 (seeds 0/1/2: 0.81/0.74/0.78); chance is 0.5
    assert result.maps.shape == (len(label.test), SIZE, SIZE)


def test_map_is_the_sum_of_upsampled_cosine_distances(label, fitted):
    det = fitted.detector
    x = torch.stack([fitted.preprocess(s.load_image()) for s in label.test[:3]])
    with torch.no_grad():
        enc = det.features(x)
        dec = det.decoder_(det.bottleneck_(enc))
        hand = sum(upsample(cosine_distance_map(e, d), (SIZE, SIZE)) for e, d in zip(enc, dec))
        pred = det.predict(x)  # raw: before the model's smoothing
    torch.testing.assert_close(pred.maps, hand)
    assert pred.scores is None  # the model's Postprocess takes the maximum of the smoothed map


def test_model_file_round_trip(label, fitted, tmp_path):
    params = fitted.detector.get_params()
    json.dumps(params)
    tensors, _ = fitted.detector.state()
    assert any(k.startswith("decoder_.") for k in tensors) and any(k.startswith("bottleneck_.") for k in tensors)
    assert not any(k.startswith("backbone_.") for k in tensors)
    loaded = assert_round_trip_identical(fitted, label.test, tmp_path / "rd.iad")
    assert loaded.detector.get_params() == params
