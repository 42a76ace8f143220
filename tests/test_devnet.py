"""DevNet: the top-K MIL score by hand, balanced batches, the frozen-stage cache, more labelled
defects -> better detection on a synthetic category, refusal without labelled defects, shapes,
exact model-file round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _helpers import assert_round_trip_identical, built
from iadkit.components.deviation import PlainHead, balanced_batches, topk_mil_score
from iadkit.data.transforms import ImageSet
from iadkit.errors import InvalidParameterError, TrainingDataError
from iadkit.metrics.image import image_auroc
from iadkit.model import Model
from iadkit.types import ANOMALOUS

SIZE = 64
# CPU-sized training for the tests: only the last stage is trained and images are not rotated
# (so the frozen stages' output is computed once per image); 5 epochs x 20 batches of 16.
FAST = dict(epochs=5, steps_per_epoch=20, batch_size=16, lr=1e-3, rotation=0.0, finetune_from="blocks.6")


def test_topk_mil_score_by_hand():
    maps = torch.tensor(
        [[[1.0, -9.0, 3.0, 0.5, 2.0], [0.0, 4.0, -1.0, 7.0, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0], [0, 0, 0, 0, -8.0]]]
    )
    # 20 positions, ratio 0.1 -> K = 2: the two largest absolute values are 9 and 8
    assert float(topk_mil_score(maps, 0.1)) == pytest.approx((9 + 8) / 2)
    assert float(topk_mil_score(maps, 0.01)) == pytest.approx(9.0)  # K is at least 1
    assert float(topk_mil_score(maps, 0.25)) == pytest.approx((9 + 8 + 7 + 4 + 3) / 5)
    assert float(topk_mil_score(maps[:, None], 0.1)) == pytest.approx(8.5)  # [B, 1, h, w] too
    # the head: a 1x1 convolution, absolute value, then the MIL score
    head = PlainHead(2, topk=0.5)
    with torch.no_grad():
        head.scoring.weight.copy_(torch.tensor([1.0, -2.0]).view(1, 2, 1, 1))
        head.scoring.bias.fill_(0.5)
    x = torch.tensor([[[[1.0, 0.0]], [[3.0, 1.0]]]])  # [1, 2, 1, 2]: positions (1,3) and (0,1)
    score, m = head(x)
    np.testing.assert_allclose(m.detach().numpy(), [[[abs(1 - 6 + 0.5), abs(0 - 2 + 0.5)]]])
    assert float(score.detach()) == pytest.approx(4.5)  # K = max(1, int(2 * 0.5)) = 1


def test_balanced_batches_follow_the_reference_sampler():
    normal, anomalous = list(range(10)), [100, 101, 102]
    batches = list(balanced_batches(normal, anomalous, 8, 5, torch.Generator().manual_seed(0)))
    assert len(batches) == 5 and all(len(b) == 8 for b in batches)
    assert all(set(b[:4]) <= set(normal) and set(b[4:]) <= set(anomalous) for b in batches)
    # each side walks whole random permutations: the first 10 normal draws are all 10 images
    normal_draws = [i for b in batches for i in b[:4]]
    assert sorted(normal_draws[:10]) == normal
    anomaly_draws = [i for b in batches for i in b[4:]]
    assert all(sorted(anomaly_draws[j : j + 3]) == anomalous for j in range(0, 18, 3))
    again = list(balanced_batches(normal, anomalous, 8, 5, torch.Generator().manual_seed(0)))
    assert again == batches
    with pytest.raises(ValueError):
        next(balanced_batches(normal, [], 8, 1, torch.Generator()))


def test_frozen_cache_gives_the_same_inputs():
    det = built(Model.create("devnet", image_size=SIZE).detector)
    images = torch.randn(4, 3, SIZE, SIZE)
    images[3] = images[0]  # batch indices [7, 8, 9, 7]: the same training image twice
    cache: dict = {}
    expected = det.frozen_scales(images)
    assert [tuple(f.shape) for f in expected] == [(4, 112, 4, 4), (4, 112, 2, 2)]  # blocks.4 (frozen) at 64 and 32 px
    changed = torch.tensor([False, True, False, False])
    for _ in range(2):  # first call fills the cache, the second reads it
        got = det._frozen_cached(images, [7, 8, 9, 7], changed, cache)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)
    assert set(cache) == {7, 9}  # an augmented image is never cached


@pytest.fixture(scope="module")
def metal(synthetic):
    """Synthetic metal at 64 px; 8 of its defective test images (a seeded draw) are the pool
    of labelled defects, the rest of the test set is what the detectors are scored on."""
    ds = synthetic("metal", image_size=SIZE, n_train=30, n_test_good=12, n_test_per_defect=8)
    anomalous = [s for s in ds.test if s.label == ANOMALOUS]
    order = np.random.default_rng(0).permutation(len(anomalous))
    pool = [anomalous[i] for i in order[:8]]
    test = [s for s in ds.test if s not in pool]
    return list(ds.train), pool, test


@pytest.fixture(scope="module")
def fitted(metal):
    train, pool, _ = metal
    return {
        k: Model.create("devnet", image_size=SIZE, **FAST).fit(train + pool[:k], calibration_fraction=0, progress=False)
        for k in (1, 8)
    }


def test_more_labelled_defects_detect_better(metal, fitted):
    """k = 1 vs 8 labelled defects (30 good images): measured image AUROC 0.557 -> 0.901 (seed 0;
    seeds 1 and 2: 0.594 -> 0.844 and 0.714 -> 0.911)."""
    test = metal[2]
    auroc = {}
    for k, model in fitted.items():
        r = model.predict(test)
        auroc[k] = image_auroc(r.labels, r.scores)
    assert auroc[8] >= 0.8 and auroc[8] >= auroc[1] + 0.15, auroc


def test_shapes_scores_and_maps(metal, fitted):
    model = fitted[8]
    det = model.detector
    result = model.predict(metal[2][:5])
    assert result.scores.shape == (5,) and result.maps.shape == (5, SIZE, SIZE)
    images = ImageSet(metal[2][:2], model.preprocess)
    x = torch.stack([images.image(i) for i in range(2)])
    pred = det.predict(x)
    assert pred.maps.shape == (2, SIZE // 32, SIZE // 32)  # the MIL map at stride 32
    # the image score is the mean over the two scales of the top-K MIL scores
    per_scale = [det.scorer_(det.trunk_(f))[0] for f in det.frozen_scales(x)]
    torch.testing.assert_close(pred.scores, (per_scale[0] + per_scale[1]) / 2)
    assert len(det.loss_history_) == FAST["epochs"]


def test_needs_labelled_defects_and_good_images(metal):
    train, pool, _ = metal
    with pytest.raises(TrainingDataError, match="labelled defects"):
        Model.create("devnet", image_size=SIZE, **FAST).fit(train[:6], calibration_fraction=0, progress=False)
    with pytest.raises(TrainingDataError, match="good training images"):
        Model.create("devnet", image_size=SIZE, **FAST).fit(pool[:3], calibration_fraction=0, progress=False)
    with pytest.raises(InvalidParameterError, match="finetune_from"):
        Model.create("devnet", image_size=SIZE, finetune_from="blocks.6", layer="blocks.4").detector.validate()


def test_model_file_round_trip(metal, fitted, tmp_path):
    model = fitted[8]
    assert_round_trip_identical(model, metal[2][:6], tmp_path / "devnet.iad")
    tensors, _ = model.detector.state()
    assert any(k.startswith("trunk_.") for k in tensors) and not any(k.startswith("backbone_.") for k in tensors)
