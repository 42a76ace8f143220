"""CutPaste: the augmentations (paper's parameters), the Gaussian density estimator, the
patch-level localisation variant learning on the synthetic set, and exact save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.covariance import ledoit_wolf

from _helpers import assert_round_trip_identical, built, predict_and_auroc
from iadkit.components import synthesis as S
from iadkit.components.synthesis import color_jitter, cutpaste, cutpaste_scar
from iadkit.data.transforms import ImageSet, Preprocess
from iadkit.errors import InvalidParameterError
from iadkit.methods.base import NotFittedError
from iadkit.methods.cutpaste import CutPaste, receptive_field_upsample
from iadkit.model import Model

SIZE = 64


# -- augmentations -----------------------------------------------------------------------------
def _box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def test_cutpaste_patch_area_aspect_and_content() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 100, 120)
    areas, aspects = [], []
    for _ in range(200):
        out, mask = cutpaste(image, jitter=0.0, generator=g)
        top, bottom, left, right = _box(mask)
        assert int(mask.sum()) == (bottom - top) * (right - left)  # a rectangle
        areas.append(mask.float().mean().item())
        aspects.append((right - left) / (bottom - top))
        assert torch.equal(out[:, ~mask], image[:, ~mask])  # nothing else changed
    # paper: area 2%-15% of the image, aspect ratio in (0.3, 3.3) (up to pixel rounding)
    assert min(areas) >= 0.018 and max(areas) <= 0.16
    assert min(aspects) < 0.6 and max(aspects) > 1.8  # both orientations occur
    assert min(aspects) >= 0.25 and max(aspects) <= 3.7


def test_cutpaste_without_jitter_pastes_a_copy_of_the_image() -> None:
    g = torch.Generator().manual_seed(3)
    image = torch.rand(3, 40, 40)
    out, mask = cutpaste(image, jitter=0.0, generator=g)
    top, bottom, left, right = _box(mask)
    patch = out[:, top:bottom, left:right]
    h, w = bottom - top, right - left
    found = any(
        torch.equal(image[:, y : y + h, x : x + w], patch) for y in range(40 - h + 1) for x in range(40 - w + 1)
    )
    assert found


def test_scar_is_a_thin_rotated_strip_of_the_paper_size() -> None:
    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, 256, 256)
    for _ in range(100):
        out, mask = cutpaste_scar(image, generator=g)
        n = int(mask.sum())
        assert 2 * 10 * 0.7 <= n <= 16 * 25 * 1.15  # width 2-16 x length 10-25 px at 256 px
        assert torch.equal(out[:, ~mask], image[:, ~mask])
    # axis-aligned, no jitter: an exact width x length rectangle copied from the image
    out, mask = cutpaste_scar(image, angle=(0.0, 0.0), width=(4.0, 4.0), length=(20.0, 20.0), jitter=0.0, generator=g)
    top, bottom, left, right = _box(mask)
    assert (bottom - top, right - left) == (20, 4) and int(mask.sum()) == 80
    # scar sizes scale with the image: at 64 px the same strip is 1 x 5 px
    _, small = cutpaste_scar(
        torch.rand(3, 64, 64), angle=(0.0, 0.0), width=(4.0, 4.0), length=(20.0, 20.0), generator=g
    )
    top, bottom, left, right = _box(small)
    assert (bottom - top, right - left) == (5, 1)


def test_color_jitter_definitions() -> None:
    x = torch.rand(3, 9, 9)
    # HSV round trip and hue shift agree with torchvision's definitions
    import torchvision.transforms.v2.functional as TF

    assert torch.allclose(S._hsv_to_rgb(S._rgb_to_hsv(x)), x, atol=1e-5)
    hsv = S._rgb_to_hsv(x)
    shifted = S._hsv_to_rgb(torch.stack([(hsv[0] + 0.1) % 1.0, hsv[1], hsv[2]]))
    assert torch.allclose(shifted, TF.adjust_hue(x, 0.1), atol=1e-5)
    # brightness only: a single factor within [0.9, 1.1]
    g = torch.Generator().manual_seed(0)
    y = color_jitter(x * 0.5, brightness=0.1, contrast=0, saturation=0, hue=0, generator=g)
    factor = (y / (x * 0.5)).flatten()
    assert torch.allclose(factor, factor[0].expand_as(factor), atol=1e-5) and 0.9 <= float(factor[0]) <= 1.1
    z = color_jitter(x, generator=g)
    assert z.min() >= 0 and z.max() <= 1 and not torch.equal(z, x)


def test_receptive_field_upsampling_averages_covering_patches() -> None:
    scores = torch.tensor([[[1.0, 3.0]]])  # one row of two 4x4 patches at stride 2 -> 4x6 covered
    out = receptive_field_upsample(scores, (5, 6), patch=4, stride=2)
    assert out.shape == (1, 5, 6)
    assert torch.allclose(out[0, 0], torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0]))
    assert torch.allclose(out[0, 4], out[0, 3])  # uncovered last row replicates


def _fold_reference(scores, size, patch, stride):
    """The mean of covering patches with F.fold (what receptive_field_upsample computed before
    it became two coverage products, which ONNX can export)."""
    b, nh, nw = scores.shape
    cols = scores.reshape(b, 1, nh * nw).expand(-1, patch * patch, -1)
    covered = ((nh - 1) * stride + patch, (nw - 1) * stride + patch)
    out = F.fold(cols, covered, kernel_size=patch, stride=stride) / F.fold(
        torch.ones_like(cols), covered, kernel_size=patch, stride=stride
    )
    if covered != tuple(size):
        out = F.pad(out, (0, size[1] - covered[1], 0, size[0] - covered[0]), mode="replicate")
    return out[:, 0]


@pytest.mark.parametrize(
    "size, patch, stride", [((64, 64), 32, 16), ((64, 64), 32, 4), ((70, 53), 16, 5), ((224, 224), 32, 4)]
)
def test_receptive_field_upsampling_equals_fold(size, patch, stride) -> None:
    nh, nw = (size[0] - patch) // stride + 1, (size[1] - patch) // stride + 1
    scores = torch.rand(3, nh, nw, generator=torch.Generator().manual_seed(0)) * 50
    torch.testing.assert_close(
        receptive_field_upsample(scores, size, patch, stride),
        _fold_reference(scores, size, patch, stride),
        rtol=1e-6,
        atol=1e-6,
    )


# -- the method ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wood(synthetic):
    return synthetic("wood", n_test_good=10, n_test_per_defect=5)


@pytest.fixture(scope="module")
def fitted(wood):
    torch.set_num_threads(1)
    model = Model.create("cutpaste", image_size=SIZE, patch_size=32, patch_stride=8, epochs=15, seed=0)
    return model.fit(wood.train, calibration_fraction=0, progress=False)


def test_patch_variant_learns_to_detect_and_localise(fitted, wood) -> None:
    result, auroc = predict_and_auroc(fitted, wood.test)
    # Measured 0.89 (seed 1: 0.81) after 15 epochs; the same network untrained gives 0.66,
    # a constant detector 0.5.
    assert auroc >= 0.75, auroc
    assert result.maps.shape == (len(wood.test), SIZE, SIZE)
    assert np.allclose(result.scores, result.maps.reshape(len(wood.test), -1).max(axis=1))


def test_save_load_gives_identical_predictions(fitted, wood, tmp_path) -> None:
    assert_round_trip_identical(fitted, wood.test[:3], tmp_path / "cutpaste.safetensors")


def test_gde_score_is_mahalanobis_to_ledoit_wolf_gaussian(fitted, wood) -> None:
    det = fitted.detector
    train = ImageSet(wood.train, fitted.preprocess)
    x = torch.stack([train.image(i) for i in range(len(train))])
    with torch.no_grad():
        emb = det._embed_all(x).double().numpy()
        probe = torch.stack([ImageSet(wood.test[:1], fitted.preprocess).image(0)])
        patches, _, _ = det._patches(probe)
        e = det._embed(patches[:1]).double().numpy()[0]
    cov, _ = ledoit_wolf(emb)
    diff = e - emb.mean(0)
    expected = math.sqrt(diff @ np.linalg.solve(cov, diff))
    from iadkit.components.gaussian import mahalanobis

    got = mahalanobis(torch.from_numpy(e).float()[None, None], det.gde_mean_, det.gde_whitening_)[0, 0]
    assert float(got) == pytest.approx(expected, rel=1e-3)


def test_image_level_variant_scores_without_maps(wood) -> None:
    det = CutPaste(epochs=1, batch_size=4, finetune_from="head", variant="binary")
    mean, std = det.input_normalization()
    train = ImageSet(wood.train[:6], Preprocess(image_size=SIZE, mean=mean, std=std))
    det.fit(train, progress=False)
    assert det.net_.classifier.out_features == 2  # normal vs CutPaste
    pred = det.predict(torch.stack([train.image(i) for i in range(3)]))
    assert pred.maps is None and pred.scores.shape == (3,) and torch.all(pred.scores >= 0)


def test_trunk_is_a_trainable_copy_and_backbone_stays_frozen() -> None:
    det = built(CutPaste(finetune_from="blocks.6"))
    assert det.backbone_layers() == ["blocks.5"]
    assert all(p.requires_grad for p in det.net_.parameters())
    assert not any(p.requires_grad for p in det.backbone_.parameters())
    tensors, _ = det.state()
    assert any(k.startswith("net_.trunk.") for k in tensors) and not any(k.startswith("backbone_.") for k in tensors)
    det.net_.train()
    assert all(not m.training for m in det.net_.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert built(CutPaste(variant="3way")).net_.classifier.out_features == 3
    with pytest.raises(InvalidParameterError, match="variant"):
        CutPaste(variant="4way").validate()
    with pytest.raises(InvalidParameterError, match="finetune_from"):
        CutPaste(finetune_from="conv_stem").validate()
    with pytest.raises(NotFittedError):
        det.predict(torch.zeros(1, 3, SIZE, SIZE))
