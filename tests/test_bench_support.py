"""Test-only pieces for the benchmark tests: a tiny in-memory dataset source and detectors
that fail, get interrupted or kill their own process on purpose.

Listed in a grid's ``imports`` so Ray workers register them too. No tests live here.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import torch

import _dummy  # noqa: F401  (registers test_pixel_zscore)
from iadkit.data import register_source
from iadkit.data.transforms import ImageSet
from iadkit.methods.base import Detector, register
from iadkit.methods.params import param
from iadkit.types import ANOMALOUS, GOOD, Prediction, Sample

SIZE = 16
CATEGORIES = ["flat", "dark"]
FIT_CALLS: list[str] = []  # (method/category) of every fit in this process: shows what a rerun skipped


def _images(category: str) -> tuple[list[Sample], list[Sample]]:
    """8 good training images; test: 4 good (one with a hot pixel) + 4 with a 3x3 spot (masks given)."""
    base = {"flat": 100, "dark": 40}[category]
    rng = np.random.default_rng(CATEGORIES.index(category))
    train, test = [], []
    for i in range(14):
        img = (base + rng.normal(0, 3, (SIZE, SIZE, 1))).clip(0, 255).astype(np.uint8)
        mask = np.zeros((SIZE, SIZE), bool)
        anomalous = i >= 10
        if anomalous:
            r, c = 3 + (i % 3) * 3, 4 + (i % 2) * 5
            # The last defect is faint, so it scores below the glitchy good image 9.
            img[r : r + 3, c : c + 3] = base + 12 if i == 13 else 230 - 10 * (i - 10)
            mask[r : r + 3, c : c + 3] = True
        if i == 9:  # a good image with a hot pixel: the false alarm
            img[12, 2] = min(255, base + 60)
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


register_source("tinybench", lambda location, category: _images(category), lambda location: list(CATEGORIES))


class _Base(Detector):
    """Mean-image difference (a test detector)."""

    family = "test"
    map_sigma = 0.0

    def _build(self) -> None:
        self.register_buffer("mean_", torch.empty(0))

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        FIT_CALLS.append(f"{self.name}/{train.samples[0].category}")
        self.mean_ = torch.cat([b.images for b in train.batches(8)]).mean(0)

    def _predict(self, images: torch.Tensor) -> Prediction:
        maps = (images - self.mean_).abs().mean(1)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)


@register
class Seeded(_Base):
    """Deterministic given its seed: scores carry seed-dependent noise (checks seed plumbing)."""

    name = "test_bench_seeded"

    noise: float = param(0.05, "Amplitude of the seed-dependent offset.")

    def _build(self) -> None:
        super()._build()
        self.register_buffer("offset_", torch.empty(0))

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        super()._fit(train, progress=progress)
        g = torch.Generator().manual_seed(self.seed)
        self.offset_ = torch.rand(SIZE, SIZE, generator=g) * self.noise

    def _predict(self, images: torch.Tensor) -> Prediction:
        maps = (images - self.mean_).abs().mean(1) + self.offset_
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)


@register
class Failing(_Base):
    """Fails in fit (a test detector)."""

    name = "test_bench_fail"

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        FIT_CALLS.append(f"{self.name}/{train.samples[0].category}")
        raise RuntimeError("deliberate failure in fit (test)")


INTERRUPT = {"on": False}


@register
class Interrupting(_Base):
    """Raises KeyboardInterrupt while INTERRUPT['on'] (a user pressing Ctrl-C mid-grid)."""

    name = "test_bench_interrupt"

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        if INTERRUPT["on"]:
            raise KeyboardInterrupt
        super()._fit(train, progress=progress)


@register
class Killing(_Base):
    """SIGKILLs its own process when IADKIT_TEST_SIGKILL=1 (the OOM killer, a power cut)."""

    name = "test_bench_sigkill"

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        if os.environ.get("IADKIT_TEST_SIGKILL") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        super()._fit(train, progress=progress)


def grid(
    methods: list, *, categories: list[str] | None = None, seeds: list[int] | None = None, gallery: int = 2
) -> dict:
    """A config dict over the tiny source."""
    return {
        "name": "tiny",
        "methods": methods,
        "datasets": [{"source": "tinybench", "categories": categories or list(CATEGORIES)}],
        "seeds": seeds or [0],
        "image_size": SIZE,
        "batch_size": 4,
        "device": "cpu",
        "gallery_size": gallery,
        "imports": ["test_bench_support"],
    }


@register
class Labelled(_Base):
    """Declares itself semi-supervised (a test detector): records how many labelled defects
    its fit received and learns the mean of the good ones."""

    name = "test_bench_labelled"
    supervision = "semi-supervised"

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        labels = train.labels
        FIT_CALLS.append(f"{self.name}/{train.samples[0].category}/{int((labels == ANOMALOUS).sum())}")
        x = torch.cat([b.images for b in train.batches(8)])
        self.mean_ = x[labels == GOOD].mean(0)
