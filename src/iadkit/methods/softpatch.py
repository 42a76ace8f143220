"""SoftPatch — PatchCore that finds and softens the defects hidden among the "good" images.

Paper: X. Jiang, J. Liu, J. Wang, Q. Nie, K. Wu, Y. Liu, C. Wang, F. Zheng, "SoftPatch:
Unsupervised Anomaly Detection with Noisy Data", NeurIPS 2022; code:
github.com/TencentYoutuResearch/AnomalyDetection-SoftPatch (src/softpatch.py, src/sampler.py).

The noisy setting: a few defective images slipped into the training set. PatchCore stores
their defective patches in its memory bank, and a test defect that resembles one finds a
close neighbour and scores low. SoftPatch adds patch-level *noise discrimination* before the
coreset (paper §3.2–3.3):

1. Embed every training image with PatchCore's locally aware patch features (`PatchCore`,
   shared, not copied). For the outlier scores, the features are reduced to `projection_dim`
   dimensions by the same random projection the coreset uses.
2. At every patch position p, compare the N training images' patches at p with each other and
   give each an outlier score (`components.outliers`): its Local Outlier Factor among the N
   with k = `lof_k` neighbours (``weight_method="lof"``, default), or 1 + its Mahalanobis
   distance to the position's Gaussian (``"gaussian"``), or 1 + its distance to the nearest
   other image's patch (``"nearest"``). A defect is rare, so its patches are outliers at
   their positions.
3. Discard the `threshold` share of all training patches with the largest outlier scores (the
   score quantile 1 - threshold over all patches of all images) and run the greedy coreset on
   the rest ("weighted coreset": discarded patches can be neither chosen nor need covering).
   The bank keeps as many patches as PatchCore's would (``coreset_ratio`` of *all* patches).
4. Each bank patch keeps its outlier score as a soft weight. A test patch's score is its
   nearest-neighbour distance times the weight of that neighbour (``soft_weight``), so a
   neighbour that looked like noise counts as farther away; the image score is the maximum
   patch score, the map the patch scores (upsampled and smoothed with sigma 4 by the model).

What was down-weighted is reported in ``fit_info_["images"]``: for every training image (in
training order, by path) the share of its patches that were discarded and its mean and
maximum outlier score — the images with a large discarded share are the ones SoftPatch took
for noise. ``fit_info_["discarded_share"]`` holds the same shares as a list.

paper -> reference code -> ours:

=============================  ======================================  ======================================
paper                          reference code                          ours
=============================  ======================================  ======================================
WRN-50 layer2+3 PatchCore      same features as PatchCore's code       `PatchCore`'s features (EfficientNet-
features                       (1024-d)                                Lite0 blocks.2+4, 152-d; see PatchCore)
outlier score on features      on the sampler's 128-d projection       on the coreset's 128-d random projection
                               (a randomly initialised nn.Linear)      (Gaussian JL matrix), when D > 128
LOF per position, k not given  sklearn LocalOutlierFactor, k = 5 (the  LOF in torch, all positions batched,
                               CLI option lof_k 6 is passed as LOF_k    equal to scikit-learn's to 1e-6 (tested);
                               and never reaches the model)            ``lof_k`` = 5
Gaussian / nearest variants    Mahalanobis + 1 (cov + 0.01 I) /        same formulas (``weight_method``)
                               1-NN distance (incl. ~0 self) + 1
remove outlier patches,        quantile(all scores, 1 - 0.15); score   same (``threshold`` = 0.15)
threshold 0.15                 above it -> sampling weight 0
weighted coreset               approximate greedy, distances x 0 for   exact greedy / composable coreset over
                               removed patches; size 10 % of all       the kept patches; size ``coreset_ratio``
                                                                       of all patches
soft re-weighting of scores    score x LOF of the nearest bank patch;  same; ``soft_weight=False`` is the
                               image score = max (no PatchCore Eq. 7)  code's --without_soft_weight
coreset 10 %, 1 NN             sampling_ratio 0.1 (open-iad: 0.001),   ``coreset_ratio`` 0.1, ``num_neighbors``
                               anomaly_score_num_nn 1                  fixed to 1
map: upsample + Gaussian 4     RescaleSegmentor, sigma 4               the model's Postprocess, sigma 4
=============================  ======================================  ======================================

Memory: the outlier scores compare every image with every other at each position, so all
training patch features are held at once (the reference does the same): N x h x w x D floats,
e.g. 754 ELPV images at 28 x 28 x 152 -> 360 MB. With a single training image there is
nothing to compare: every patch keeps weight 1 and none is discarded (``fit_info_`` says so).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from iadkit.components.memory_bank import random_projection
from iadkit.components.outliers import OUTLIER_METHODS, outlier_scores
from iadkit.data.transforms import ImageSet
from iadkit.methods.base import register
from iadkit.methods.params import Interval, OneOf, at_least, param
from iadkit.methods.patchcore import PatchCore
from iadkit.types import Prediction

log = logging.getLogger(__name__)


@register
class SoftPatch(PatchCore):
    """PatchCore with patch-level noise discrimination, a weighted coreset and soft re-weighting (Jiang et al. 2022)."""

    name = "softpatch"
    family = "noisy"
    paper = "Jiang et al., SoftPatch: Unsupervised Anomaly Detection with Noisy Data, NeurIPS 2022"
    smoke_params = {"coreset_ratio": 0.1}

    weight_method: str = param(
        "lof", "Outlier score per patch position: 'lof' (paper), 'gaussian' or 'nearest'.", check=OneOf(OUTLIER_METHODS)
    )
    lof_k: int = param(5, "Neighbours of the Local Outlier Factor (reference code: 5).", check=at_least(1))
    threshold: float = param(
        0.15,
        "Share of all training patches discarded as noise before the coreset (paper: 0.15).",
        check=Interval(0, 1, closed="left"),
    )
    soft_weight: bool = param(True, "Multiply test distances by the neighbour's outlier score (paper).", inference=True)
    num_neighbors: int = param(
        1,
        "SoftPatch scores an image by its largest re-weighted patch score (no PatchCore Eq. 7): 1 only.",
        check=OneOf((1,)),
    )

    def _build(self) -> None:
        super()._build()
        self.register_buffer("bank_weights_", torch.empty(0))

    # -- fit ---------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        maps = [
            self.embed(images).cpu()
            for images in self.single_pass(train, self.batch_size, "softpatch features", progress=progress)
        ]
        feats = torch.cat(maps)  # [N, D, h, w]
        n, d, h, w = feats.shape
        patches = feats.permute(0, 2, 3, 1).reshape(n, h * w, d)  # [N, P, D]
        scores = self.patch_outlier_scores(patches)  # [N, P]
        if n >= 2 and self.threshold > 0:
            cut = float(np.quantile(scores.numpy().astype(np.float64), 1.0 - self.threshold))
            discard = scores > cut
        else:
            cut, discard = float("inf"), torch.zeros_like(scores, dtype=torch.bool)
        kept = ~discard.reshape(-1)
        n_kept = int(kept.sum())
        # The bank is as large as PatchCore's would be: coreset_ratio of *all* patches (the
        # +0.5 keeps int(n_kept * ratio) from rounding just below the target).
        target = max(1, int(kept.numel() * self.coreset_ratio))
        builder = self.coreset_builder(min(1.0, (target + 0.5) / n_kept))
        builder.add(patches.reshape(-1, d)[kept])
        result = builder.result()
        assert result.indices is not None
        self.set_bank(result, (h, w))
        self.bank_weights_ = scores.reshape(-1)[kept][result.indices].clamp_min(0).contiguous().to(self.device)
        self.fit_info_.update(n_patches=int(kept.numel()), n_kept=n_kept)
        self.fit_info_.update(self._noise_info(train, scores, discard, cut))

    def patch_outlier_scores(self, patches: torch.Tensor) -> torch.Tensor:
        """Outlier score of every training patch among the patches at its position: [N, P, D] -> [N, P]."""
        n, _, d = patches.shape
        if n < 2:
            log.warning("softpatch: one training image, nothing to compare; every patch keeps weight 1")
            return torch.ones(patches.shape[:2])
        x = patches.transpose(0, 1)  # [P, N, D]: groups of the N images' patches at one position
        if d > self.projection_dim > 0:
            x = x @ random_projection(d, self.projection_dim, self.seed)
        return outlier_scores(x, self.weight_method, k=self.lof_k).T.contiguous()

    def _noise_info(self, train: ImageSet, scores: torch.Tensor, discard: torch.Tensor, cut: float) -> dict[str, Any]:
        share = discard.float().mean(1)
        images = [
            {
                "path": sample.path,
                "discarded_share": float(share[i]),
                "mean_outlier_score": float(scores[i].mean()),
                "max_outlier_score": float(scores[i].max()),
            }
            for i, sample in enumerate(train.samples)
        ]
        return {
            "weight_method": self.weight_method if scores.shape[0] >= 2 else "none (one training image)",
            "score_threshold": cut,
            "n_discarded": int(discard.sum()),
            "discarded_share": [float(s) for s in share],
            "images": images,
        }

    # -- predict -----------------------------------------------------------------------------------
    def _predict(self, images: torch.Tensor) -> Prediction:
        dist, idx, _ = self.nearest_patches(images)
        if self.soft_weight:
            dist = dist * self.bank_weights_[idx]
        scores = dist.flatten(1).max(1).values
        return Prediction(scores=scores.to(images.device), maps=dist.to(images.device))
