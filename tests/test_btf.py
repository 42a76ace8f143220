"""BTF: its image score by hand, and the fused RGB + FPFH bank on a tiny 3D case where the
defect (a dent) is in the point map only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iadkit.data.point_maps import PointMapSample
from iadkit.methods.btf import BTF, btf_image_scores
from iadkit.metrics.image import image_auroc
from iadkit.model import Model
from iadkit.types import ANOMALOUS, GOOD

SIZE = 48


def test_image_score_is_the_reweighted_maximum_by_hand() -> None:
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    patches = torch.tensor([[[0.1, 0.0], [3.0, 0.0]]])  # the second is the worst patch
    d = torch.cdist(patches[0], bank)
    scores, idx = d.min(1)
    s = btf_image_scores(scores[None], idx[None], patches, bank, 3)
    # s* = 2 (to m* = (1, 0)); N_3(m*) = m*, (0, 0) at 1, (0, 2) at sqrt 5; D = sqrt 2
    s_star, dim = 2.0, math.sqrt(2)
    others = [3.0, math.hypot(3.0, 2.0)]  # |m_test - (0, 0)|, |m_test - (0, 2)|
    expected = (1 - math.exp(s_star / dim) / sum(math.exp(o / dim) for o in others)) * s_star
    assert s.item() == pytest.approx(expected, rel=1e-5)
    assert btf_image_scores(scores[None], idx[None], patches, bank, 1).item() == pytest.approx(2.0)


def _plane(rng: np.random.Generator, dent: bool) -> np.ndarray:
    """A tilted plate 0.3 m away (1 mm pixels, 0.02 mm noise); `dent`: a 2 mm deep dent."""
    v, u = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    z = 0.3 + 0.01 * (u - SIZE / 2) / SIZE + rng.normal(0, 2e-5, (SIZE, SIZE))
    if dent:
        cy, cx = rng.integers(14, SIZE - 14, 2)
        z += 0.002 * np.exp(-((v - cy) ** 2 + (u - cx) ** 2) / (2 * 3.0**2))
    return np.stack([(u - SIZE / 2) * 0.001, (v - SIZE / 2) * 0.001, z], -1).astype(np.float32)


def _samples(n: int, dent: bool, seed: int, image_seed: int) -> list[PointMapSample]:
    """`n` shots; the colour images come from `image_seed` alone, so a dented shot's image is
    byte-identical to that of its good twin (as in the synthetic generator's 3D mode)."""
    rng, image_rng = np.random.default_rng(seed), np.random.default_rng(image_seed)
    out = []
    for i in range(n):
        image = (128 + 12 * image_rng.standard_normal((SIZE, SIZE, 3))).clip(0, 255).astype(np.uint8)
        out.append(
            PointMapSample(
                path=f"mem://{seed}/{i}",
                label=ANOMALOUS if dent else GOOD,
                defect_type="dent" if dent else "good",
                image=image,
                xyz=_plane(rng, dent),
            )
        )
    return out


@pytest.fixture(scope="module")
def data() -> tuple[list, list]:
    return _samples(6, False, 0, 10), _samples(4, False, 1, 11) + _samples(4, True, 2, 11)


def _fit(data: tuple[list, list], **params) -> Model:
    torch.set_num_threads(1)
    return Model.create("btf", image_size=SIZE, coreset_ratio=1.0, **params).fit(
        data[0], calibration_fraction=0.0, progress=False
    )


def test_the_bank_holds_rgb_and_fpfh_features_side_by_side(data) -> None:
    fused, scaled, rgb = _fit(data), _fit(data, fpfh_scale=2.0), _fit(data, modality="rgb")
    det: BTF = fused.detector  # type: ignore[assignment]
    n_rgb = det.embedding_.target_dim
    assert det.memory_bank_.shape[1] == n_rgb + 33 and rgb.detector.memory_bank_.shape[1] == n_rgb
    # with the whole bank kept, its rows are exactly the training positions' fused features
    from iadkit.data.transforms import ImageSet

    ds = ImageSet(data[0], fused.preprocess)
    feats = det.patch_features(torch.stack([ds.image(i) for i in range(len(ds))]))
    rows = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    assert det.memory_bank_.shape[0] == rows.shape[0]
    exact = torch.cdist(rows, det.memory_bank_, compute_mode="donot_use_mm_for_euclid_dist")
    assert exact.min(1).values.max() < 1e-4
    # the colour half is the RGB-only model's bank; the FPFH half scales with fpfh_scale
    torch.testing.assert_close(
        torch.sort(det.memory_bank_[:, :n_rgb], 0).values, torch.sort(rgb.detector.memory_bank_, 0).values
    )
    torch.testing.assert_close(
        torch.sort(scaled.detector.memory_bank_[:, n_rgb:], 0).values,
        2 * torch.sort(det.memory_bank_[:, n_rgb:], 0).values,
    )


def test_depth_finds_the_dent_colour_cannot(data) -> None:
    test = data[1]
    labels = np.array([s.label for s in test])
    auroc = {m: image_auroc(labels, _fit(data, modality=m).predict(test).scores) for m in ("rgb+fpfh", "fpfh", "rgb")}
    assert auroc["fpfh"] == 1.0 and auroc["rgb+fpfh"] == 1.0, auroc
    assert auroc["rgb"] == 0.5, auroc  # each dented shot's colour image is its good twin's
