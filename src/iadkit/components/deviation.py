"""Pieces of the deviation-network family (DevNet, DRA): top-K MIL scoring, the heads, and
balanced batches of normal images and labelled anomalies.

- *Top-K multiple-instance learning* (Pang et al., "Explainable Deep Few-shot Anomaly
  Detection with Deviation Networks", 2021): an image is a bag of patch instances, the
  positions of a feature map. A 1x1 convolution scores every position; the image score is the
  mean of the K largest absolute position scores, K = max(1, int(ratio * positions)) with
  ratio 0.1 (`topk_mil_score`). Only the most anomalous patches decide, so a defect covering a
  few positions is not averaged away.
- *Heads* (DRA, Ding et al., CVPR 2022, Fig. 2; the authors' code): `PlainHead` is the top-K
  MIL scorer above (DevNet's scorer and DRA's seen- and pseudo-abnormality heads);
  `CompositeHead` scores the latent residual ``mean(reference maps) - map`` after a 3x3
  conv-BN-ReLU; `HolisticHead` scores the average-pooled map with a 2-layer MLP (256 hidden)
  and returns the absolute value (DRA's normality head).
- *Balanced batches* (the authors' ``BalancedBatchSampler``): each batch holds
  ``batch_size // 2`` normal images and the rest labelled anomalies, each side drawn by
  walking endless fresh random permutations of its indices, so the few anomalies recur in
  every batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

TOPK_RATIO = 0.1


def topk_mil_score(maps: torch.Tensor, ratio: float = TOPK_RATIO) -> torch.Tensor:
    """Mean of the K largest absolute values of each map: [B, h, w] (or [B, 1, h, w]) -> [B].

    K = max(1, int(ratio * h * w)), as DevNet's code (``int(size * topk)``, at least one).
    """
    flat = maps.reshape(maps.shape[0], -1).abs()
    k = max(1, int(flat.shape[1] * ratio))
    return torch.topk(flat, k, dim=1).values.mean(1)


class PlainHead(nn.Module):
    """1x1 convolution to one score per position, then the top-K MIL image score.

    `forward(x)` returns (image scores [B], absolute position scores [B, h, w]).
    """

    def __init__(self, in_channels: int, topk: float = TOPK_RATIO) -> None:
        super().__init__()
        self.scoring = nn.Conv2d(in_channels, 1, kernel_size=1)
        self.topk = float(topk)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.scoring(x)[:, 0].abs()
        return topk_mil_score(maps, self.topk), maps


class CompositeHead(PlainHead):
    """DRA's latent-residual head: ``reference - x`` -> 3x3 conv-BN-ReLU -> `PlainHead`.

    `reference` is the mean feature map of the reference normal images, [C, h, w].
    """

    def __init__(self, in_channels: int, topk: float = TOPK_RATIO) -> None:
        super().__init__(in_channels, topk)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.BatchNorm2d(in_channels), nn.ReLU()
        )

    def forward(self, x: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if reference.shape != x.shape[1:]:
            raise ValueError(f"reference map {tuple(reference.shape)} does not match features {tuple(x.shape[1:])}")
        return super().forward(self.conv(reference[None] - x))


class HolisticHead(nn.Module):
    """DRA's normality head: global average pool -> Linear(C, 256) -> ReLU -> Linear(256, 1) -> |.|: [B]."""

    def __init__(self, in_channels: int, hidden: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(self.drop(F.relu(self.fc1(pooled))))[:, 0].abs()


def _endless(indices: Sequence[int], generator: torch.Generator) -> Iterator[int]:
    """Walk fresh random permutations of `indices` forever."""
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    while True:
        for i in idx[torch.randperm(len(idx), generator=generator)]:
            yield int(i)


def balanced_batches(
    normal: Sequence[int], anomalous: Sequence[int], batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """`steps` batches of ``batch_size // 2`` normal and ``batch_size - batch_size // 2`` anomalous indices.

    Parameters
    ----------
    normal, anomalous
        Indices of the normal images and of the labelled anomalies (both non-empty).
    batch_size
        Images per batch (at least 2).
    steps
        Number of batches.
    generator
        Source of the permutations (seeded by the caller).
    """
    if not normal or not anomalous:
        raise ValueError("balanced batches need at least one normal image and one labelled anomaly")
    if batch_size < 2:
        raise ValueError(f"a balanced batch needs at least 2 images, got batch_size={batch_size}")
    n_normal = batch_size // 2
    normal_stream, anomalous_stream = _endless(normal, generator), _endless(anomalous, generator)
    for _ in range(steps):
        batch = [next(normal_stream) for _ in range(n_normal)]
        batch += [next(anomalous_stream) for _ in range(batch_size - n_normal)]
        yield batch


__all__ = ["TOPK_RATIO", "CompositeHead", "HolisticHead", "PlainHead", "balanced_batches", "topk_mil_score"]
