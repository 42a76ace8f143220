"""RegAD: affine helpers and the spatial transformer, the 22-fold support augmentation, the
meta-training categories (the target's own excluded), the support Gaussian by hand, AUROC
rising with the number of shots on synthetic categories, exact model-file round trip."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from _helpers import assert_round_trip_identical, built
from iadkit.components.registration import (
    AUGMENTATIONS_PER_SHOT,
    SpatialTransformer,
    affine_from_params,
    invert_affine,
    negative_cosine,
    support_augmentations,
    warp,
)
from iadkit.data.transforms import ImageSet
from iadkit.errors import InvalidParameterError, TrainingDataError
from iadkit.methods.regad import meta_training_sets
from iadkit.metrics.image import image_auroc
from iadkit.model import Model

SIZE = 64
# CPU-sized meta-training for the tests: one epoch over 8 images of each of the 4 other
# synthetic categories, one support per query (the k of the support set does not change it).
FAST = dict(meta_epochs=1, meta_images_per_category=8, meta_shots=1)


def test_affine_helpers_and_identity_start():
    p = torch.tensor([[0.3, 1.2, 0.8]])
    theta = affine_from_params(p, "rotation_scale")
    c, s = math.cos(0.3), math.sin(0.3)
    torch.testing.assert_close(theta, torch.tensor([[[c * 1.2, -s, 0.0], [s, c * 0.8, 0.0]]]))
    full = torch.cat([theta, torch.tensor([[[0.0, 0.0, 1.0]]])], 1)
    inv = torch.cat([invert_affine(theta), torch.tensor([[[0.0, 0.0, 1.0]]])], 1)
    torch.testing.assert_close(full @ inv, torch.eye(3)[None])
    x = torch.rand(2, 5, 8, 8)
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(2, 2, 3)
    assert torch.equal(warp(x, identity), x)
    # a transformer starts as the identity (zero last layer, identity bias), in every mode
    for mode in ("rotation_scale", "affine", "translation", "rotation_translation_scale"):
        out, th = SpatialTransformer(5, mode, pool=2)(x)
        assert torch.equal(out, x) and torch.equal(th, identity), mode
    # the Siamese loss: -cos(p, z), gradients only through p
    p_, z = (
        torch.tensor([[[[1.0]], [[0.0]]]], requires_grad=True),
        torch.tensor([[[[1.0]], [[1.0]]]], requires_grad=True),
    )
    loss = negative_cosine(p_, z)
    assert float(loss.detach()) == pytest.approx(-1 / math.sqrt(2))
    loss.backward()
    assert z.grad is None and p_.grad is not None


def test_support_augmentation_is_the_codes_22_variants():
    x = torch.rand(2, 3, 8, 8)
    aug = support_augmentations(x)
    assert AUGMENTATIONS_PER_SHOT == 22 and aug.shape == (44, 3, 8, 8)
    assert torch.equal(aug[:2], x)  # the shots themselves
    assert torch.equal(aug[34:36], x.flip(-1))  # horizontal flip
    grey = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(aug[36:38], grey[:, None].expand(-1, 3, -1, -1))
    for q, start in ((1, 38), (2, 40), (3, 42)):  # right angles are exact on a square image
        torch.testing.assert_close(aug[start : start + 2], torch.rot90(x, q, (-2, -1)), rtol=0, atol=1e-6)
    # a small rotation keeps the centre pixel's neighbourhood, a translation moves the image
    assert not torch.allclose(aug[2:4], x) and not torch.allclose(aug[18:20], x)


def test_meta_training_categories_exclude_the_target(tmp_path):
    model = Model.create("regad", image_size=SIZE)
    sets = meta_training_sets("synthetic", "metal", model.preprocess, per_category=3, seed=0)
    assert sorted(sets) == ["fabric", "label", "washer", "wood"] and all(len(s) == 3 for s in sets.values())
    from iadkit.data.synthetic import synthesize

    np.testing.assert_array_equal(
        sets["wood"].samples[1].load_image(), synthesize("wood", seed=0, index=1, image_size=SIZE, split="train").image
    )
    # a folder in MVTec layout: every other category's train/good images
    for cat in ("bottle", "screw", "target"):
        good = tmp_path / cat / "train" / "good"
        good.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(good / f"{i:03d}.png")
    folder = meta_training_sets(tmp_path, "target", model.preprocess, per_category=3, seed=0)
    assert sorted(folder) == ["bottle", "screw"] and len(folder["screw"]) == 2
    with pytest.raises(InvalidParameterError, match="meta_source"):
        meta_training_sets(tmp_path / "missing", "target", model.preprocess, per_category=3, seed=0)


def test_untrained_registration_is_the_plain_backbone():
    det = built(Model.create("regad", image_size=SIZE).detector)
    x = torch.randn(2, 3, SIZE, SIZE)
    feats, h = [], x
    for segment in det.registration_.segments:
        h = segment(h)
        feats.append(h)
    emb = det.embed(x)
    assert emb.shape == (2, 24 + 40 + 112, SIZE // 4, SIZE // 4)
    # identity warps sample at the pixel centres up to affine_grid's rounding (~1e-7 relative)
    torch.testing.assert_close(emb, det.embedding_(feats), rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def categories(synthetic):
    return {
        c: synthetic(c, image_size=SIZE, n_train=16, n_test_good=12, n_test_per_defect=6) for c in ("fabric", "washer")
    }


@pytest.fixture(scope="module")
def fitted(categories):
    return {
        (c, k): Model.create("regad", image_size=SIZE, **FAST).fit(
            list(ds.train)[:k], calibration_fraction=0, progress=False
        )
        for c, ds in categories.items()
        for k in (1, 2, 4, 8)
    }


def test_auroc_rises_with_the_number_of_shots(categories, fitted):
    """Image AUROC at k = 1 / 2 / 4 / 8 shots, measured: fabric 0.921 / 0.917 / 0.931 / 0.944,
    washer 0.579 / 0.676 / 0.773 / 0.815, mean 0.750 / 0.797 / 0.852 / 0.880 (PatchCore on the
    same shots: fabric 0.653 / 0.880 / 0.787 / 0.917, washer 0.620 / 0.454 / 0.616 / 0.657)."""
    mean = []
    for k in (1, 2, 4, 8):
        scores = []
        for c, ds in categories.items():
            r = fitted[(c, k)].predict(ds.test)
            scores.append(image_auroc(r.labels, r.scores))
        mean.append(float(np.mean(scores)))
    assert all(b >= a - 0.01 for a, b in itertools.pairwise(mean)), mean
    assert mean[-1] >= mean[0] + 0.1 and mean[-1] >= 0.85, mean


def test_support_gaussian_by_hand(categories, fitted):
    model = fitted[("fabric", 2)]
    det = model.detector
    support = ImageSet(list(categories["fabric"].train)[:2], model.preprocess)
    x = torch.stack([support.image(i) for i in range(2)])
    m = torch.tensor(model.preprocess.mean).view(1, 3, 1, 1)
    s = torch.tensor(model.preprocess.std).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = det.embed((support_augmentations(x * s + m) - m) / s)  # [44, d, 16, 16]
        test_emb = det.embed(torch.stack([ImageSet(categories["fabric"].test, model.preprocess).image(0)]))
    flat = emb.flatten(2).double()  # [44, d, P]
    torch.testing.assert_close(det.mean_, flat.mean(0).T.float(), rtol=1e-4, atol=1e-4)
    pos = 37
    cov = torch.cov(flat[:, :, pos].T) + 0.01 * torch.eye(flat.shape[1], dtype=torch.float64)
    diff = test_emb.flatten(2)[0, :, pos].double() - flat[:, :, pos].mean(0)
    expected = torch.sqrt(diff @ torch.linalg.inv(cov) @ diff)
    got = (
        det.predict(torch.stack([ImageSet(categories["fabric"].test, model.preprocess).image(0)]))
        .maps[0]
        .flatten()[pos]
    )
    assert float(got) == pytest.approx(float(expected), rel=1e-3)
    assert len(det.meta_loss_history_) == 1


def test_model_file_round_trip_and_errors(categories, fitted, tmp_path):
    model = fitted[("washer", 4)]
    assert_round_trip_identical(model, list(categories["washer"].test)[:6], tmp_path / "regad.iad")
    tensors, _ = model.detector.state()
    assert any(k.startswith("registration_.stns.") for k in tensors) and "whitening_" in tensors
    with pytest.raises(InvalidParameterError, match="meta_source"):
        Model.create("regad", image_size=SIZE, meta_source=str(tmp_path / "nowhere")).detector.validate()
    with pytest.raises(TrainingDataError, match="meta_shots"):
        Model.create("regad", image_size=SIZE, meta_images_per_category=3, meta_shots=3).fit(
            list(categories["washer"].train)[:2], calibration_fraction=0, progress=False
        )
