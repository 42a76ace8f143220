"""Test-only pieces for the task-plan settings (continual, multi_class): a three-category
in-memory source and a continual test detector. Listed in grids' ``imports``; no tests here.

Source ``taskbench``: categories "flat" (grey 100), "dark" (grey 40), "light" (grey 170);
8 good training images each; test: 4 good + 4 with a 3x3 spot (masks given). The spot is
bright on flat and dark, dark on light.
"""

from __future__ import annotations

import numpy as np
import torch

import _dummy  # noqa: F401  (registers test_pixel_zscore, a method that refits per task)
from iadkit.data import register_source
from iadkit.data.transforms import ImageSet
from iadkit.methods.base import Detector, register
from iadkit.types import ANOMALOUS, GOOD, Prediction, Sample

SIZE = 16
CATEGORIES = ["flat", "dark", "light"]
LEVEL = {"flat": 100, "dark": 40, "light": 170}


def images(category: str) -> tuple[list[Sample], list[Sample]]:
    base = LEVEL[category]
    rng = np.random.default_rng(CATEGORIES.index(category) + 10)
    train, test = [], []
    for i in range(16):
        img = (base + rng.normal(0, 3, (SIZE, SIZE, 1))).clip(0, 255).astype(np.uint8)
        mask = np.zeros((SIZE, SIZE), bool)
        anomalous = i >= 12
        if anomalous:
            r, c = 3 + (i % 3) * 3, 4 + (i % 2) * 5
            img[r : r + 3, c : c + 3] = 10 if category == "light" else 240
            mask[r : r + 3, c : c + 3] = True
        s = Sample(
            path=f"mem://{category}/{i:02d}.png",
            label=ANOMALOUS if anomalous else GOOD,
            category=category,
            defect_type="spot" if anomalous else "good",
            image=img,
            mask=mask if anomalous else None,
        )
        (train if i < 8 else test).append(s)
    return train, test


register_source("taskbench", lambda location, category: images(category), lambda location: list(CATEGORIES))

FITS: list[tuple[str, int]] = []  # (method, number of training images) of every fit / partial_fit


@register
class TaskMeans(Detector):
    """Continual test detector: one mean image per task; an image is scored against the task
    whose mean is nearest (no task id at test time)."""

    name = "test_task_means"
    family = "test"
    continual = True
    map_sigma = 0.0

    def _build(self) -> None:
        self.register_buffer("means_", torch.empty(0, 3, SIZE, SIZE))

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        self._fit_task(train, progress=progress)

    def _fit_task(self, train: ImageSet, *, progress: bool) -> None:
        FITS.append((self.name, len(train)))
        mean = torch.cat([b.images for b in train.batches(8)]).mean(0, keepdim=True)
        self.means_ = torch.cat([self.means_, mean.to(self.means_)])

    def _predict(self, images: torch.Tensor) -> Prediction:
        diff = (images[:, None] - self.means_[None]).abs().mean(2)  # [B, T, H, W]
        nearest = diff.flatten(2).median(2).values.argmin(1)
        maps = diff[torch.arange(len(images)), nearest]
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)


def grid(methods: list, settings: list, *, categories: list[str] | None = None, gallery: int = 1) -> dict:
    return {
        "name": "tasks",
        "methods": methods,
        "datasets": [{"source": "taskbench", "categories": categories or list(CATEGORIES)}],
        "settings": settings,
        "seeds": [0],
        "image_size": SIZE,
        "batch_size": 4,
        "device": "cpu",
        "gallery_size": gallery,
        "imports": ["tasks_support"],
    }
