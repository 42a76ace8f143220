"""Anomaly synthesis: turn good images into plausible defective ones for self-supervision.

CutPaste (Li, Sohn, Yoon, Pfister, "CutPaste: Self-Supervised Learning for Anomaly
Detection and Localization", CVPR 2021) makes local irregularities out of the image itself:

- **CutPaste**: cut a rectangle whose area is 2%-15% of the image and whose aspect ratio is
  in (0.3, 1) U (1, 3.3), colour-jitter it, paste it at a random location.
- **CutPaste-Scar**: a long thin rectangle, width 2-16 px and length 10-25 px (at the
  paper's 256 px input), colour-jittered, rotated by -45..45 degrees, pasted at random.

Pixel sizes of the scar are given at `reference_size` (256, the paper's input) and scaled to
the actual image size, so a scar covers the same share of the part at any resolution.

All functions take unnormalised images [3, H, W] with values in [0, 1] and a
`torch.Generator`, so a training run is reproducible, and return the augmented image and
the pasted region as a bool mask [H, W] (for tests and for methods that supervise pixels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CUTPASTE_AREA_RATIO = (0.02, 0.15)
CUTPASTE_ASPECT_RATIO = (0.3, 3.3)
SCAR_WIDTH = (2.0, 16.0)
SCAR_LENGTH = (10.0, 25.0)
SCAR_ANGLE = (-45.0, 45.0)
JITTER = 0.1


def _uniform(lo: float, hi: float, g: torch.Generator | None) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g))


def _randint(lo: int, hi: int, g: torch.Generator | None) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def _check_image(image: torch.Tensor) -> None:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W] in [0, 1], got shape {tuple(image.shape)}")


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x[0], x[1], x[2]
    maxc, _ = x.max(dim=0)
    minc, _ = x.min(dim=0)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = delta.clamp_min(1e-12)
    h = torch.where(
        maxc == r,
        ((g - b) / safe) % 6.0,
        torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc])


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x[0], x[1], x[2]
    k = torch.stack([(5.0 + h * 6.0) % 6.0, (3.0 + h * 6.0) % 6.0, (1.0 + h * 6.0) % 6.0])
    return v[None] - v[None] * s[None] * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def rotate(image: torch.Tensor, degrees: float, *, fill: float = 0.0) -> torch.Tensor:
    """Rotate [..., H, W] about the image centre by `degrees` (positive: clockwise on screen,
    so +90 equals ``torch.rot90(x, -1, (-2, -1))``), bilinear, with `fill` outside the source
    image (imgaug's Affine defaults).

    Parameters
    ----------
    image
        [H, W], [C, H, W] or [B, C, H, W] float tensor.
    degrees
        Rotation angle in degrees.
    fill
        Value of the pixels that come from outside the image.
    """
    shape = image.shape
    h, w = shape[-2], shape[-1]
    x = image.reshape(-1, 1, h, w)
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    # affine_grid works in [-1, 1] coordinates per axis: correct for the aspect ratio so the
    # rotation is a true rotation in pixels. Output pixel p samples the input at R(-theta) p.
    mat = torch.tensor([[c, s * h / w, 0.0], [-s * w / h, c, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(mat[None].expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    if fill == 0.0:
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    else:  # rotate (x - fill) with zero padding, so the outside becomes exactly `fill`
        out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    return out.reshape(shape)


def color_jitter(
    patch: torch.Tensor,
    *,
    brightness: float = JITTER,
    contrast: float = JITTER,
    saturation: float = JITTER,
    hue: float = JITTER,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random brightness, contrast, saturation (factors in [1-a, 1+a]) and hue shift
    (in [-a, a] turns), the usual colour-jitter definitions; output clipped to [0, 1]."""
    x = patch
    if brightness > 0:
        x = (x * _uniform(1 - brightness, 1 + brightness, generator)).clamp(0, 1)
    if contrast > 0:
        mean = _grayscale(x).mean()
        x = (mean + (x - mean) * _uniform(1 - contrast, 1 + contrast, generator)).clamp(0, 1)
    if saturation > 0:
        gray = _grayscale(x)
        x = (gray + (x - gray) * _uniform(1 - saturation, 1 + saturation, generator)).clamp(0, 1)
    if hue > 0:
        hsv = _rgb_to_hsv(x)
        hsv = torch.stack([(hsv[0] + _uniform(-hue, hue, generator)) % 1.0, hsv[1], hsv[2]])
        x = _hsv_to_rgb(hsv).clamp(0, 1)
    return x


def cutpaste(
    image: torch.Tensor,
    *,
    area_ratio: tuple[float, float] = CUTPASTE_AREA_RATIO,
    aspect_ratio: tuple[float, float] = CUTPASTE_ASPECT_RATIO,
    jitter: float = JITTER,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste: a jittered rectangle of the image pasted elsewhere. Returns (image, mask).

    The aspect ratio is drawn log-uniformly over `aspect_ratio`, so tall and wide patches
    are equally likely, as the paper's (0.3, 1) U (1, 3.3) intends.
    """
    _check_image(image)
    _, h, w = image.shape
    area = _uniform(*area_ratio, generator) * h * w
    aspect = math.exp(_uniform(math.log(aspect_ratio[0]), math.log(aspect_ratio[1]), generator))
    ph = max(1, min(h, round(math.sqrt(area / aspect))))
    pw = max(1, min(w, round(math.sqrt(area * aspect))))
    sy, sx = _randint(0, h - ph, generator), _randint(0, w - pw, generator)
    dy, dx = _randint(0, h - ph, generator), _randint(0, w - pw, generator)
    patch = color_jitter(
        image[:, sy : sy + ph, sx : sx + pw],
        brightness=jitter,
        contrast=jitter,
        saturation=jitter,
        hue=jitter,
        generator=generator,
    )
    out = image.clone()
    out[:, dy : dy + ph, dx : dx + pw] = patch
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[dy : dy + ph, dx : dx + pw] = True
    return out, mask


def cutpaste_scar(
    image: torch.Tensor,
    *,
    width: tuple[float, float] = SCAR_WIDTH,
    length: tuple[float, float] = SCAR_LENGTH,
    angle: tuple[float, float] = SCAR_ANGLE,
    reference_size: float = 256,
    jitter: float = JITTER,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste-Scar: a thin jittered strip of the image, rotated, pasted elsewhere.

    `width`/`length` are pixels at `reference_size` and scale with the image (never below
    1 px). The strip is resampled bilinearly along its rotated axes.
    """
    _check_image(image)
    _, h, w = image.shape
    scale = min(h, w) / float(reference_size)
    sw = min(float(w), max(1.0, _uniform(*width, generator) * scale))
    sl = min(float(h), max(1.0, _uniform(*length, generator) * scale))
    theta = math.radians(_uniform(*angle, generator))
    # source: an axis-aligned sw x sl strip, jittered in place
    iw, il = max(1, math.ceil(sw)), max(1, math.ceil(sl))
    sy, sx = _randint(0, h - il, generator), _randint(0, w - iw, generator)
    source = image.clone()
    source[:, sy : sy + il, sx : sx + iw] = color_jitter(
        image[:, sy : sy + il, sx : sx + iw],
        brightness=jitter,
        contrast=jitter,
        saturation=jitter,
        hue=jitter,
        generator=generator,
    )
    src_cy, src_cx = sy + il / 2.0, sx + iw / 2.0
    # destination: the rotated strip's bounding box must lie in the image
    cos, sin = math.cos(theta), math.sin(theta)
    half_bw = 0.5 * (abs(sw * cos) + abs(sl * sin))
    half_bh = 0.5 * (abs(sw * sin) + abs(sl * cos))
    cy = _uniform(min(half_bh, h / 2), max(h - half_bh, h / 2), generator)
    cx = _uniform(min(half_bw, w / 2), max(w - half_bw, w / 2), generator)
    # for every output pixel centre p: strip coordinates (u, v) = R(-theta) (p - c)
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5 - cy
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5 - cx
    u = cos * xs + sin * ys  # along the width
    v = -sin * xs + cos * ys  # along the length
    mask = (u.abs() <= sw / 2) & (v.abs() <= sl / 2)
    # the matching source pixel, in grid_sample's normalised coordinates (align_corners=False)
    qx = (src_cx + u) / w * 2 - 1
    qy = (src_cy + v) / h * 2 - 1
    grid = torch.stack([qx, qy], dim=-1)[None].to(image.dtype)
    strip = F.grid_sample(source[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    out = torch.where(mask[None], strip, image)
    return out, mask


__all__ = [
    "CUTPASTE_AREA_RATIO",
    "CUTPASTE_ASPECT_RATIO",
    "JITTER",
    "SCAR_ANGLE",
    "SCAR_LENGTH",
    "SCAR_WIDTH",
    "color_jitter",
    "cutpaste",
    "cutpaste_scar",
    "rotate",
]
