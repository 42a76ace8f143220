"""Frozen features computed once, for training the trainable half of a method on a CPU.

Every trained method here stands on a frozen network (a teacher, an encoder, a feature
extractor). Without per-epoch augmentation of the images, that network gives the same output
for an image in every epoch, so recomputing it is pure waste — and on a CPU it is most of the
training cost. `cache_features` runs the frozen part once over the training images (through
`FeaturePath`, i.e. ONNX Runtime on a CPU when it is installed: 2-4x faster than eager torch
here, equal within 1e-4), and keeps the outputs per image, in memory or, above a budget, in a
memory-mapped temporary file. `train_on_indices` is the epoch loop over such a cache (or any
indexable training data): a seeded random order per epoch, the same order `ImageSet.batches`
uses, so a method switching to cached features sees its batches in the same order.

Which methods use it (and what cannot be cached) is said in each method's docstring.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from iadkit.data.transforms import ImageSet
from iadkit.progress import step_bar

DEFAULT_BUDGET_MB = 2048
BUDGET_ENV = "IADKIT_FEATURE_CACHE_MB"


class FeatureCache:
    """Per-image frozen tensors: ``levels[i]`` is an [N, ...] float32 array (RAM or memmap).

    `take(indices)` returns torch tensors of those images on a device. Close it (or use it as a
    context manager) to delete a memory-mapped file early; it is deleted on garbage collection
    otherwise.
    """

    def __init__(self, levels: Sequence[np.ndarray], tmpdir: tempfile.TemporaryDirectory[str] | None = None) -> None:
        self.levels = list(levels)
        self._tmpdir = tmpdir

    def __len__(self) -> int:
        return int(self.levels[0].shape[0]) if self.levels else 0

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.levels)

    @property
    def on_disk(self) -> bool:
        return self._tmpdir is not None

    def take(self, indices: np.ndarray | Sequence[int], device: torch.device | str = "cpu") -> list[torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        return [torch.from_numpy(np.ascontiguousarray(a[idx])).to(device) for a in self.levels]

    def all(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        return self.take(np.arange(len(self)), device)

    def close(self) -> None:
        self.levels = []
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def budget_mb() -> float:
    """Memory the cache may take before it goes to a memory-mapped file ($IADKIT_FEATURE_CACHE_MB)."""
    try:
        return float(os.environ.get(BUDGET_ENV, DEFAULT_BUDGET_MB))
    except ValueError:
        return float(DEFAULT_BUDGET_MB)


@torch.no_grad()
def cache_features(
    compute: Callable[[torch.Tensor], Any],
    train: ImageSet,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    description: str = "frozen features",
    progress: bool = True,
    budget: float | None = None,
    keep_pixels: bool = False,
) -> FeatureCache:
    """Run `compute(images)` (a tensor or a tuple of tensors per batch) once over `train` and
    keep the outputs per image, in order. The first batch gives the shapes; when the whole
    cache would exceed `budget` MiB (default `budget_mb()`), it is a memory-mapped file.

    Decoded pixels are cached by the ImageSet only with `keep_pixels` (for a method whose
    trainable part also reads the images every epoch, e.g. STFPM's student).
    """
    n = len(train)
    levels: list[np.ndarray] = []
    tmpdir: tempfile.TemporaryDirectory[str] | None = None
    caching = train.cache_enabled
    train.cache_enabled = caching and keep_pixels
    try:
        with step_bar(math.ceil(n / batch_size), description, enabled=progress) as bar:
            start = 0
            for batch in train.batches(batch_size):
                out = compute(batch.images.to(device))
                outs = list(out) if isinstance(out, (tuple, list)) else [out]
                if not levels:
                    per_image = sum(o[0].numel() for o in outs) * 4
                    limit = (budget if budget is not None else budget_mb()) * 2**20
                    if per_image * n > limit:
                        tmpdir = tempfile.TemporaryDirectory(prefix="iadkit-features-")
                        levels = [
                            np.lib.format.open_memmap(
                                os.path.join(tmpdir.name, f"level{i}.npy"),
                                mode="w+",
                                dtype=np.float32,
                                shape=(n, *o.shape[1:]),
                            )
                            for i, o in enumerate(outs)
                        ]
                    else:
                        levels = [np.empty((n, *o.shape[1:]), dtype=np.float32) for o in outs]
                b = outs[0].shape[0]
                for dst, o in zip(levels, outs):
                    dst[start : start + b] = o.detach().float().cpu().numpy()
                start += b
                bar.advance()
    finally:
        train.cache_enabled = caching
    return FeatureCache(levels, tmpdir)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded random order of epoch `epoch` (the order `ImageSet.batches(shuffle=True,
    seed=seed + epoch)` uses)."""
    return np.random.default_rng(seed + epoch).permutation(n)


def train_on_indices(
    n: int,
    step: Callable[[np.ndarray], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    description: str = "train",
    progress: bool = True,
    scheduler: Any = None,
) -> list[float]:
    """The fixed-schedule epoch loop over `n` training items: each epoch visits them once in
    `epoch_order`; `step(indices)` returns the batch loss, which is back-propagated and applied.
    A last batch of one item is dropped when others exist (batch-norm in training mode cannot
    normalise one sample). `scheduler.step()` runs after every epoch when given. Returns the
    mean loss of each epoch; a non-finite loss raises `TrainingDivergedError`."""
    from iadkit.components.distillation import TrainingDivergedError

    drop_last = n % batch_size == 1 and n > 1
    stop = n - (1 if drop_last else 0)
    per_epoch = math.ceil(stop / batch_size)
    history: list[float] = []
    with step_bar(epochs * per_epoch, description, enabled=progress) as bar:
        for epoch in range(epochs):
            order = epoch_order(n, seed, epoch)[:stop]
            total, count = 0.0, 0
            for start in range(0, stop, batch_size):
                idx = order[start : start + batch_size]
                loss = step(idx)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        f"{description}: the training loss became {float(loss.detach())} in epoch {epoch + 1}; "
                        "lower the learning rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
                bar.advance(loss=total / count, epoch=f"{epoch + 1}/{epochs}")
            if scheduler is not None:
                scheduler.step()
            history.append(total / max(count, 1))
    return history


__all__ = ["BUDGET_ENV", "FeatureCache", "budget_mb", "cache_features", "epoch_order", "train_on_indices"]
