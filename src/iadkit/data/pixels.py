"""`Preprocess` in numpy: the same pixels without torch, for the exported-model runtime.

`iadkit.runtime` must run where torch is not installed, and its scores must equal the torch
model's. Every step of `iadkit.data.transforms.Preprocess` is therefore repeated here with
numpy alone, to the same numbers:

* to [0, 1] floats: uint8 / 255, uint16 / 65535 (16-bit precision kept), floats as given;
  grayscale replicated to 3 channels; a 4th (alpha) channel dropped;
* resize: bilinear with antialiasing exactly as ``F.interpolate(mode="bilinear",
  antialias=True, align_corners=False)`` computes it (PyTorch's separable kernel: triangle
  filter stretched by the scale when shrinking, weights normalised per output pixel, width
  first, then height, in float32). Measured against torch: at most ~1e-6 apart (tests).
  ONNX's own ``Resize(antialias=1)`` is *not* used: ONNX Runtime 1.32 differs from torch by up
  to 0.048 when shrinking (a different filter support), and torch's ONNX exporter cannot
  export the antialiased resize at all;
* centre crop, with torch's rounding of the offsets.

Normalisation ((x - mean) / std) is left to the exported graph, so that the runtime feeds
it [0, 1] pixels and the mean and std live in one place.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from iadkit.errors import ImageReadError


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return (int(size), int(size))
    h, w = size
    return (int(h), int(w))


@functools.lru_cache(maxsize=64)
def antialias_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(source indices [n_out, K], weights [n_out, K] float32) of torch's antialiased
    bilinear resampling of one axis from `n_in` to `n_out` samples.

    As ATen's ``_compute_weights_aa``: scale = n_in / n_out; the triangle filter's support is
    `scale` pixels when shrinking (1 when enlarging); output i gathers inputs
    ``int(c - support + 0.5) .. int(c + support + 0.5) - 1`` around its centre
    ``c = scale * (i + 0.5)``, weighted by ``max(0, 1 - |(j - c + 0.5) / max(scale, 1)|)`` and
    normalised to sum 1. Computed in float32, as torch does for float32 images.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"resize needs positive sizes, got {n_in} -> {n_out}")
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    support = scale if scale >= 1.0 else f32(1.0)
    invscale = f32(1.0) / scale if scale >= 1.0 else f32(1.0)
    centre = scale * (np.arange(n_out, dtype=f32) + f32(0.5))
    # static_cast<int64_t> truncates toward zero, as astype does
    xmin = np.maximum((centre - support + f32(0.5)).astype(np.int64), 0)
    xmax = np.minimum((centre + support + f32(0.5)).astype(np.int64), n_in)
    size = xmax - xmin
    k = int(size.max())
    j = np.arange(k)
    idx = xmin[:, None] + j[None, :]
    x = ((idx.astype(f32) - centre[:, None]) + f32(0.5)) * invscale
    w = np.where(j[None, :] < size[:, None], np.maximum(f32(0.0), f32(1.0) - np.abs(x)), f32(0.0)).astype(f32)
    total = w.sum(1, keepdims=True, dtype=f32)
    w = np.where(total != 0, w / np.where(total != 0, total, f32(1.0)), f32(0.0)).astype(f32)
    return np.minimum(idx, n_in - 1), w


def _resample_rows(x: np.ndarray, n_out: int) -> np.ndarray:
    """Antialiased bilinear along the first axis of a contiguous float32 array: a sum of K
    weighted gathers of whole rows (contiguous memory, hence fast)."""
    idx, w = antialias_weights(int(x.shape[0]), int(n_out))
    wshape = (n_out,) + (1,) * (x.ndim - 1)
    out = x[idx[:, 0]] * w[:, 0].reshape(wshape)
    for k in range(1, idx.shape[1]):
        out += x[idx[:, k]] * w[:, k].reshape(wshape)
    return out


def resize_bilinear_antialias(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Resize an HxW or HxWxC float array to `size` (h, w) as torch's
    ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)`` does (float32 out)."""
    h, w = _pair(size)
    x = np.asarray(image, dtype=np.float32)
    if x.shape[1] != w:  # width first, as PyTorch's separable kernel
        x = np.swapaxes(_resample_rows(np.ascontiguousarray(np.swapaxes(x, 0, 1)), w), 0, 1)
    if x.shape[0] != h:
        x = _resample_rows(np.ascontiguousarray(x), h)
    return np.ascontiguousarray(x)


def channel_kind(image: np.ndarray) -> int:
    """1 for a grayscale image (HxW, HxWx1, or colour channels that are all equal), else 3."""
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ImageReadError(f"expected a non-empty HxWxC image with C in 1, 3 or 4, got shape {arr.shape}")
    if arr.ndim == 2 or arr.shape[2] == 1:
        return 1
    rgb = arr[:, :, :3]
    same = np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 1], rgb[:, :, 2])
    return 1 if same else 3


KIND_NAMES = {1: "grayscale", 3: "colour"}


def check_channels(image: np.ndarray, channels: int | None, where: str) -> int:
    """The image's kind (1 gray, 3 colour); raises `ImageReadError` naming `where` when a model
    trained on `channels` (None: not recorded, nothing checked) would get the other kind."""
    kind = channel_kind(image)
    if channels is not None and kind != channels:
        raise ImageReadError(
            f"{where}: a {KIND_NAMES[kind]} image, but this model was trained on {KIND_NAMES[channels]} images; "
            f"its score would not be comparable. Give {KIND_NAMES[channels]} images, or train a model on "
            f"{KIND_NAMES[kind]} ones"
        )
    return kind


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """HxWxC (or HxW) uint8/uint16/float array -> HxWx3 float32 in [0, 1]
    (grayscale replicated, alpha dropped), as ``Preprocess.to_unit_float``."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or 0 in arr.shape:
        raise ImageReadError(f"expected a non-empty HxWxC image with C in 1, 3 or 4, got shape {arr.shape}")
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / np.float32(255.0)
    elif arr.dtype == np.uint16:
        out = arr.astype(np.float32) / np.float32(65535.0)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():  # NaN pixels would give a NaN score, never a verdict
            raise ImageReadError("the image holds NaN or infinite pixel values; give finite values in [0, 1]")
        out = np.array(arr, dtype=np.float32)
    else:
        raise ImageReadError(f"unsupported image dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return out


@dataclass(frozen=True)
class PixelPreprocess:
    """The geometry of a model's `Preprocess` (resize, centre crop) in numpy.

    Parameters
    ----------
    image_size : (int, int)
        Resize to this (height, width), bilinear with antialiasing.
    crop_size : (int, int), optional
        Then centre-crop to this size.
    mean, std : 3 floats
        The normalisation the model applies (inside the exported graph); kept for reference.
    channels : {1, 3}, optional
        The kind of image the model was trained on (1 grayscale, 3 colour); an image of the
        other kind is refused, as by ``Preprocess.check_channels``. None: nothing checked.
    """

    image_size: tuple[int, int]
    crop_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channels: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PixelPreprocess:
        """From ``Preprocess.to_dict()`` (what model files and exported graphs record)."""
        crop = d.get("crop_size")
        return cls(
            image_size=_pair(d["image_size"]),
            crop_size=_pair(crop) if crop else None,
            mean=tuple(float(m) for m in d.get("mean", (0.0, 0.0, 0.0))),  # type: ignore[arg-type]
            std=tuple(float(s) for s in d.get("std", (1.0, 1.0, 1.0))),  # type: ignore[arg-type]
            channels=d.get("channels"),
        )

    def check_channels(self, image: np.ndarray, where: str) -> int:
        """As ``Preprocess.check_channels``: the image's kind, or `ImageReadError` naming `where`."""
        return check_channels(image, self.channels, where)

    @property
    def output_size(self) -> tuple[int, int]:
        return self.crop_size or self.image_size

    def geometry(self, hwc: np.ndarray) -> np.ndarray:
        """Resize, then centre-crop an HxWxC float array (as ``Preprocess.geometry``)."""
        x = hwc
        if tuple(x.shape[:2]) != self.image_size:
            x = resize_bilinear_antialias(x, self.image_size)
        if self.crop_size is not None:
            ch, cw = self.crop_size
            top = (self.image_size[0] - ch) // 2
            left = (self.image_size[1] - cw) // 2
            x = x[top : top + ch, left : left + cw]
        return x

    def view(self, image: np.ndarray) -> np.ndarray:
        """The image as the model sees it: HxWx3 float32 in [0, 1], before normalisation."""
        return np.ascontiguousarray(self.geometry(to_unit_float(image)))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One image -> 3xHxW float32 in [0, 1] (the exported graph's input, per image)."""
        return np.ascontiguousarray(self.view(image).transpose(2, 0, 1))

    def batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([self(im) for im in images])


__all__ = [
    "KIND_NAMES",
    "PixelPreprocess",
    "antialias_weights",
    "channel_kind",
    "check_channels",
    "resize_bilinear_antialias",
    "to_unit_float",
]
