"""A tiny, deterministic detector for testing the pipeline around methods.

Per-pixel z-score against the mean and std of the training images: enough to detect
bright spots on a flat background, trivially fast, and it has learned tensors to save.
"""

from __future__ import annotations

import torch

from iadkit.data.transforms import ImageSet
from iadkit.methods.base import Detector, register
from iadkit.types import Prediction


@register
class PixelZScore(Detector):
    name = "test_pixel_zscore"
    family = "test"

    def __init__(self, *, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean_", torch.empty(0))
        self.register_buffer("std_", torch.empty(0))

    def fit(self, train: ImageSet, *, progress: bool = True) -> "PixelZScore":
        x = torch.cat([b.images for b in train.batches(8)])
        self.mean_ = x.mean(0)
        self.std_ = x.std(0, unbiased=False) + self.eps
        self._mark_fitted()
        return self

    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted()
        maps = ((images - self.mean_) / self.std_).abs().mean(1)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)


@register
class ScoreOnly(PixelZScore):
    """Like PixelZScore but draws no maps, as image-level methods (CutPaste) do."""

    name = "test_score_only"

    def predict(self, images: torch.Tensor) -> Prediction:
        return Prediction(scores=super().predict(images).scores, maps=None)
