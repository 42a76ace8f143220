"""A tiny, deterministic detector for testing the pipeline around methods.

Per-pixel z-score against the mean and std of the training images: enough to detect
bright spots on a flat background, trivially fast, and it has learned tensors to save.
"""

from __future__ import annotations

import torch

from iadkit.data.transforms import ImageSet
from iadkit.methods.base import Detector, register
from iadkit.methods.params import param, positive
from iadkit.types import Prediction


@register
class PixelZScore(Detector):
    """Per-pixel z-score against the training images (a test detector)."""

    name = "test_pixel_zscore"
    family = "test"
    map_sigma = 0.0

    eps: float = param(1e-3, "Added to the standard deviation.", check=positive())

    def _build(self) -> None:
        self.register_buffer("mean_", torch.empty(0))
        self.register_buffer("std_", torch.empty(0))

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        x = torch.cat([b.images for b in train.batches(8)])
        self.mean_ = x.mean(0)
        self.std_ = x.std(0, unbiased=False) + self.eps

    def _predict(self, images: torch.Tensor) -> Prediction:
        maps = ((images - self.mean_) / self.std_).abs().mean(1)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)


@register
class ScoreOnly(PixelZScore):
    """Like PixelZScore but draws no maps, as image-level methods (CutPaste) do."""

    name = "test_score_only"
    produces_maps = False

    def _predict(self, images: torch.Tensor) -> Prediction:
        return Prediction(scores=super()._predict(images).scores, maps=None)
