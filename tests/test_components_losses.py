"""SSIM against scikit-image, DRAEM's focal loss and DevNet's deviation loss against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage import data as skdata
from skimage.metrics import structural_similarity

from iadkit.components.losses import (
    binary_focal_loss_with_logits,
    deviation_loss,
    focal_loss,
    gaussian_window,
    ssim,
    ssim_loss,
    ssim_map,
)


def _pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """(x, y) image pairs [C, H, W] in [0, 1]: random noise, and a structured photo with a
    blurred-and-noisy version of itself (bundled with scikit-image, read from disk)."""
    rng = np.random.default_rng(0)
    noise = (rng.random((3, 29, 35)), rng.random((3, 29, 35)))
    camera = skdata.camera()[100:164, 200:248].astype(np.float64) / 255.0  # bundled: no download
    degraded = np.clip(ndimage.gaussian_filter(camera, 1.2) + 0.05 * rng.standard_normal(camera.shape), 0, 1)
    related = rng.random((2, 40, 40))
    return [noise, (camera[None], degraded[None]), (related, 0.7 * related + 0.3 * rng.random((2, 40, 40)))]


def test_gaussian_window_is_the_11_tap_filter() -> None:
    w = gaussian_window()
    assert w.numel() == 11 and w.sum().item() == pytest.approx(1.0)
    assert w[5] / w[6] == pytest.approx(math.exp(1 / (2 * 1.5**2)))
    with pytest.raises(ValueError, match="odd"):
        gaussian_window(10)


def test_ssim_map_equals_scikit_image_everywhere() -> None:
    for x, y in _pairs():
        mssim, full = structural_similarity(
            x,
            y,
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            full=True,
        )
        tx, ty = torch.from_numpy(x)[None], torch.from_numpy(y)[None]
        ours = ssim_map(tx, ty)[0].numpy()  # float64, symmetric (scipy 'reflect') padding
        np.testing.assert_allclose(ours, full, atol=1e-10)
        assert ssim_map(tx, ty)[..., 5:-5, 5:-5].mean().item() == pytest.approx(mssim, abs=1e-12)
        # float32, as in training: within 1e-4
        ours32 = ssim_map(tx.float(), ty.float())
        assert np.abs(ours32[0].double().numpy() - full).max() < 1e-4
        assert ours32[..., 5:-5, 5:-5].mean().item() == pytest.approx(mssim, abs=1e-5)


def test_ssim_border_modes_agree_in_the_interior() -> None:
    x, y = (torch.from_numpy(a)[None] for a in _pairs()[0])
    sym = ssim_map(x, y)
    zeros = ssim_map(x, y, padding="zeros")
    valid = ssim_map(x, y, padding="valid")
    assert sym.shape == zeros.shape == x.shape and valid.shape == (1, 3, 29 - 10, 35 - 10)
    torch.testing.assert_close(valid, sym[..., 5:-5, 5:-5], atol=1e-12, rtol=0)
    torch.testing.assert_close(zeros[..., 5:-5, 5:-5], sym[..., 5:-5, 5:-5], atol=1e-12, rtol=0)
    assert (zeros[..., :5, :] - sym[..., :5, :]).abs().max() > 1e-3  # borders differ
    # zero padding is the 2-D zero-padded Gaussian convolution of DRAEM's reference
    w2 = torch.outer(gaussian_window(dtype=torch.float64), gaussian_window(dtype=torch.float64))
    k = w2.expand(3, 1, 11, 11)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, k, padding=5, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    torch.testing.assert_close(zeros, expected, atol=1e-12, rtol=0)


def test_ssim_identity_range_reduction_and_loss() -> None:
    x = torch.rand(2, 3, 16, 16)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    y = (x + 0.2 * torch.rand(2, 3, 16, 16)).clamp(0, 1)
    assert ssim(255 * x, 255 * y, data_range=255.0).item() == pytest.approx(ssim(x, y).item(), abs=1e-5)
    per_image = ssim(x, y, reduction="none")
    assert per_image.shape == (2,) and per_image.mean().item() == pytest.approx(ssim(x, y).item(), abs=1e-6)
    y.requires_grad_(True)
    loss = ssim_loss(x, y)
    assert loss.item() == pytest.approx(1 - ssim(x, y).item(), abs=1e-6) and loss.item() > 0
    loss.backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 17))


# -- focal loss ------------------------------------------------------------------------------
def test_focal_loss_matches_the_hand_computed_value() -> None:
    # two pixels, 2 classes: p(anomaly) = 0.8 with target 1, p(anomaly) = 0.3 with target 0
    p1 = torch.tensor([0.8, 0.3], dtype=torch.float64)
    probs = torch.stack([1 - p1, p1]).view(1, 2, 1, 2)  # [B, K, H, W]
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    s = 1e-5
    expected = []
    for p_true, p_other in ((0.8, 0.2), (0.7, 0.3)):
        pt = (1 - s) * p_true + s * p_other + s  # smoothed one-hot [s, 1-s] for K = 2, plus s
        expected.append(-((1 - pt) ** 2) * math.log(pt))
    assert focal_loss(probs, target).item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    per = focal_loss(probs, target, reduction="none")
    assert per.shape == (1, 1, 2) and per.flatten().tolist() == pytest.approx(expected, rel=1e-6)
    # alpha as a float weighs class 0 (balance_index) by alpha and class 1 by 1 - alpha
    weighted = focal_loss(probs, target, alpha=0.25, reduction="none").flatten()
    assert weighted.tolist() == pytest.approx([0.75 * expected[0], 0.25 * expected[1]], rel=1e-6)


def test_focal_loss_reduces_to_cross_entropy_without_focusing() -> None:
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    fl = focal_loss(torch.softmax(logits, 1), target, gamma=0.0, smooth=0.0)
    assert fl.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-5)
    with pytest.raises(ValueError, match="class indices"):
        focal_loss(torch.softmax(logits, 1), target.float() / 2)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        focal_loss(torch.softmax(logits, 1), target + 1)


def test_binary_focal_loss_with_logits_by_hand() -> None:
    logits = torch.tensor([2.0, -1.0])
    target = torch.tensor([1.0, 1.0])
    expected = []
    for z in (2.0, -1.0):
        p = 1 / (1 + math.exp(-z))
        bce = -math.log(p)
        expected.append((1 - p) ** 2 * bce)  # exp(-BCE) = p for a positive target
    assert binary_focal_loss_with_logits(logits, target).item() == pytest.approx(sum(expected) / 2, rel=1e-6)


# -- deviation loss --------------------------------------------------------------------------
def test_deviation_loss_by_hand() -> None:
    reference = torch.tensor([-1.0, 1.0])  # mean 0, sample std sqrt(2)
    scores = torch.tensor([0.5, 3.0, 9.0])
    labels = torch.tensor([0, 1, 1])
    dev = [0.5 / math.sqrt(2), 3 / math.sqrt(2), 9 / math.sqrt(2)]
    expected = (abs(dev[0]) + max(0.0, 5 - dev[1]) + max(0.0, 5 - dev[2])) / 3
    assert deviation_loss(scores, labels, reference=reference).item() == pytest.approx(expected, rel=1e-6)
    # the drawn reference set is N(0, 1), 5000 samples: dev is close to the raw score
    g = torch.Generator().manual_seed(0)
    drawn = deviation_loss(torch.tensor([0.3]), torch.tensor([0]), generator=g)
    assert drawn.item() == pytest.approx(0.3, abs=0.05)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert deviation_loss(scores, labels, generator=g1) == deviation_loss(scores, labels, generator=g2)
