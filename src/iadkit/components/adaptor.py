"""Feature adaptor and feature-space discriminator (SimpleNet and its descendants, e.g. GLASS).

SimpleNet (Liu et al., CVPR 2023) adapts frozen pretrained features to the target domain
with a linear layer, synthesises anomalous features by adding Gaussian noise to the adapted
ones, and trains a small MLP discriminator to output positive values for normal features
and negative values for the noisy ones, with a truncated L1 loss that stops pushing once a
margin is reached:

    L = mean max(0, th+ - D(q)) + mean max(0, th- + D(q-)),   th+ = th- = 0.5.

All modules act on feature vectors [N, C] (positions flattened into the batch).
"""

from __future__ import annotations

import torch
from torch import nn


def xavier_normal_init(module: nn.Module) -> nn.Module:
    """The authors' code's `init_weight`: xavier-normal weights of every Linear layer (std
    sqrt(2 / (fan_in + fan_out))), biases left as PyTorch initialises them."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
    return module


class FeatureAdaptor(nn.Module):
    """A linear map C -> C' (SimpleNet's feature adaptor; C' = C by default), xavier-normal
    initialised as the authors' code does (the paper specifies none)."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, out_channels or channels)
        xavier_normal_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Discriminator(nn.Module):
    """Linear -> BatchNorm -> LeakyReLU(0.2) -> Linear(1): the 2-layer MLP of SimpleNet.

    Returns one logit per vector, [N]; positive = normal.
    """

    def __init__(self, channels: int, hidden: int | None = None, negative_slope: float = 0.2) -> None:
        super().__init__()
        hidden = hidden or channels
        self.body = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(negative_slope),
        )
        self.tail = nn.Linear(hidden, 1, bias=False)
        xavier_normal_init(self)  # as the authors' code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(x))[:, 0]


def gaussian_feature_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + N(0, sigma^2) i.i.d.: SimpleNet's synthetic anomalous features."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x + sigma * noise


def truncated_l1_loss(
    normal_scores: torch.Tensor, anomalous_scores: torch.Tensor, th_pos: float = 0.5, th_neg: float = 0.5
) -> torch.Tensor:
    """mean max(0, th+ - D(q)) + mean max(0, th- + D(q-)); zero once normal scores exceed
    +th+ and anomalous ones fall below -th-."""
    return torch.clamp(th_pos - normal_scores, min=0).mean() + torch.clamp(th_neg + anomalous_scores, min=0).mean()


__all__ = ["Discriminator", "FeatureAdaptor", "gaussian_feature_noise", "truncated_l1_loss", "xavier_normal_init"]
