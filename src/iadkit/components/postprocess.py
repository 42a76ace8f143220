"""Map post-processing shared by the methods: upsampling to input size and Gaussian smoothing.

Written with plain tensor ops (interpolate, matmul) so the same code runs in evaluation, in
the server and inside an exported ONNX graph.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, radius = round(truncate * sigma) as in scipy.ndimage."""
    radius = max(1, int(truncate * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


@functools.lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float, truncate: float, mode: str) -> torch.Tensor:
    """[n, n] matrix applying the 1-D Gaussian with `mode` padding folded in (float32, CPU).

    Row i holds the taps of output i on the inputs, with padded positions mapped back into
    the signal (reflect: mirror without repeating the edge, as ``F.pad(mode="reflect")``;
    replicate: clamp), so ``M @ v`` equals pad-then-convolve exactly.
    """
    k = gaussian_kernel1d(sigma, truncate).double()
    r = (k.numel() - 1) // 2
    idx = torch.arange(n)[:, None] + torch.arange(-r, r + 1)[None, :]
    if mode == "reflect":
        idx = idx.abs()
        idx = torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)
    else:
        idx = idx.clamp(0, n - 1)
    m = torch.zeros(n, n, dtype=torch.float64)
    m.scatter_add_(1, idx, k.expand(n, -1).contiguous())
    return m.float()


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of [B, H, W] (or [B, 1, H, W]) maps with reflect padding.

    Each direction is one matrix product with a banded matrix that has the padding folded in
    (`_blur_matrix`): the same numbers as pad + 1-D convolution (to float rounding), but
    about 5x faster on CPU than single-channel ``conv2d`` with a 33-tap kernel, which was the
    largest cost of a PatchCore prediction at 224 px. Plain matmuls, so it exports to ONNX.
    """
    if sigma <= 0:
        return maps
    squeeze = maps.ndim == 3
    x = maps[:, None] if squeeze else maps
    r = (gaussian_kernel1d(sigma, truncate).numel() - 1) // 2
    # Reflect padding needs r < size; fall back to replicate for tiny maps.
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    h, w = int(x.shape[-2]), int(x.shape[-1])
    mh = _blur_matrix(h, float(sigma), float(truncate), mode).to(device=x.device, dtype=x.dtype)
    mw = mh if w == h else _blur_matrix(w, float(sigma), float(truncate), mode).to(device=x.device, dtype=x.dtype)
    x = torch.matmul(x, mw.T)  # along rows: [..., H, W] @ [W, W]
    x = torch.matmul(x.transpose(-1, -2), mh.T).transpose(-1, -2).contiguous()  # along columns
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
