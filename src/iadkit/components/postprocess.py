"""Map post-processing shared by the methods: upsampling to input size and Gaussian smoothing.

Written with plain tensor ops (interpolate, conv2d) so the same code runs in evaluation, in
the server and inside an exported ONNX graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, radius = round(truncate * sigma) as in scipy.ndimage."""
    radius = max(1, int(truncate * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of [B, H, W] (or [B, 1, H, W]) maps with reflect padding."""
    if sigma <= 0:
        return maps
    squeeze = maps.ndim == 3
    x = maps[:, None] if squeeze else maps
    k = gaussian_kernel1d(sigma, truncate).to(device=x.device, dtype=x.dtype)
    r = (k.numel() - 1) // 2
    # Reflect padding needs r < size; fall back to replicate for tiny maps.
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    x = F.pad(x, (r, r, 0, 0), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode=mode)
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0] if squeeze else x


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of [B, h, w] or [B, 1, h, w] maps to [B, H, W]."""
    x = maps[:, None] if maps.ndim == 3 else maps
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x[:, 0]


def upsample_and_smooth(maps: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """The field's usual map post-processing: bilinear upsampling to input size, then blur."""
    return gaussian_blur(upsample(maps, size), sigma)


class MapPostprocess(nn.Module):
    """Module form of `upsample_and_smooth`, for methods that keep it in their graph."""

    def __init__(self, size: tuple[int, int], sigma: float = 4.0) -> None:
        super().__init__()
        self.size = tuple(size)
        self.sigma = float(sigma)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return upsample_and_smooth(maps, self.size, self.sigma)


def sigma_for_size(size: int, reference_size: int = 224, reference_sigma: float = 4.0) -> float:
    """Scale a smoothing sigma chosen at one input size to another (keeps the physical blur)."""
    return reference_sigma * size / reference_size if size > 0 else reference_sigma


def blur_at_reference_sigma(maps: torch.Tensor, reference_sigma: float, reference_size: int = 224) -> torch.Tensor:
    """Gaussian blur of input-sized [B, H, W] maps with a sigma chosen at a `reference_size`-px
    input, scaled to these maps' smaller side (`sigma_for_size`), so that a method's σ = 4
    means the same physical blur at any image size. `reference_sigma` <= 0: unchanged (for
    methods whose paper does not smooth)."""
    if reference_sigma <= 0:
        return maps
    return gaussian_blur(maps, sigma_for_size(min(maps.shape[-2:]), reference_size, reference_sigma))


__all__ = [
    "MapPostprocess",
    "blur_at_reference_sigma",
    "gaussian_blur",
    "gaussian_kernel1d",
    "sigma_for_size",
    "upsample",
    "upsample_and_smooth",
]
