"""Heatmap overlays: an anomaly map drawn over its image, with the ground-truth outline.

The one place overlays are made: `model_overlay` renders a model's map over the image as the
model saw it, on the model's colour range, for `iadkit predict`, the benchmark report's
gallery and the server alike, so a user sees the same picture everywhere.

Design choices, and why:
- The colour range is fixed by the caller (`map_range`, normally the model's range
  measured on good images), never stretched per image: a per-image stretch would paint the
  most "anomalous" pixel of a perfectly good part bright red.
- The colour is blended in proportion to the normalised score (weight = `alpha` * value),
  so pixels at the low end of the range show the photo untouched and only suspicious
  regions are tinted. A constant-alpha blend tints the whole part blue with ``jet``.
- Ground truth is drawn as a contour (black under white, readable on any colour), not a
  filled area, so the heatmap beneath stays visible.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from matplotlib import colormaps


def _as_rgb_float(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"overlay: expected an HxWx3 (or HxW / HxWx1) image, got shape {img.shape}")
    img = img[:, :, :3]
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    elif img.dtype == np.uint16:
        img = img.astype(np.float32) / 65535.0
    else:
        img = img.astype(np.float32)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.clip(img, 0.0, 1.0)


def normalize_map(amap: np.ndarray, map_range: tuple[float, float]) -> np.ndarray:
    """Map scores to [0, 1] with a fixed range: lo -> 0, hi -> 1, clipped outside."""
    lo, hi = float(map_range[0]), float(map_range[1])
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        raise ValueError(f"overlay: map_range must be two finite numbers with lo < hi, got {map_range}")
    a = np.nan_to_num(np.asarray(amap, dtype=np.float32), nan=lo, posinf=hi, neginf=lo)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def overlay(
    image: np.ndarray,
    amap: np.ndarray,
    map_range: tuple[float, float],
    mask: np.ndarray | None = None,
    *,
    alpha: float = 0.6,
    cmap: str = "jet",
) -> np.ndarray:
    """Blend an anomaly map over an image and outline the ground-truth mask.

    image: HxWx3 (or HxW) float in [0, 1] (uint8/uint16 accepted). amap: hxw scores,
    resized bilinearly to the image when its size differs. mask: optional hxw bool (True =
    defect), resized nearest-neighbour. Returns an HxWx3 uint8 RGB array.
    """
    img = _as_rgb_float(image)
    h, w = img.shape[:2]
    a = np.asarray(amap, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"overlay: anomaly map must be HxW, got shape {a.shape}")
    if a.shape != (h, w):
        a = np.asarray(cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR), dtype=np.float32)
    norm = normalize_map(a, map_range)
    colour = colormaps[cmap](norm)[..., :3].astype(np.float32)
    weight = (float(alpha) * norm)[..., None]
    out = (1.0 - weight) * img + weight * colour
    out8 = np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)
    if mask is not None:
        m = np.asarray(mask).astype(np.uint8)
        if m.ndim != 2:
            raise ValueError(f"overlay: mask must be HxW, got shape {m.shape}")
        if m.shape != (h, w):
            m = np.asarray(cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST), dtype=np.uint8)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        if contours:
            thick = max(1, round(max(h, w) / 200))
            out8 = np.ascontiguousarray(out8)
            cv2.drawContours(out8, contours, -1, (0, 0, 0), thick + 2)
            cv2.drawContours(out8, contours, -1, (255, 255, 255), thick)
    return out8


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an HxWx3 uint8 array as PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def overlay_png(
    image: np.ndarray,
    amap: np.ndarray,
    map_range: tuple[float, float],
    mask: np.ndarray | None = None,
    **kwargs: object,
) -> bytes:
    """`overlay(...)` encoded as PNG bytes (what the benchmark stores in its database)."""
    return png_bytes(overlay(image, amap, map_range, mask, **kwargs))  # type: ignore[arg-type]


def save_overlay(
    path: str | Path,
    image: np.ndarray,
    amap: np.ndarray,
    map_range: tuple[float, float],
    mask: np.ndarray | None = None,
    **kwargs: object,
) -> Path:
    """Write `overlay(...)` as a PNG file atomically (a killed run never leaves half a file)."""
    from iadkit.files import atomic_write_bytes

    return atomic_write_bytes(path, overlay_png(image, amap, map_range, mask, **kwargs))


def side_by_side(image: np.ndarray, over: np.ndarray, mask: np.ndarray | None = None, gap: int = 4) -> np.ndarray:
    """[photo with the ground-truth outline | heatmap overlay] in one uint8 image."""
    img = _as_rgb_float(image)
    if over.shape[:2] != img.shape[:2]:
        raise ValueError(f"side_by_side: image {img.shape[:2]} and overlay {over.shape[:2]} differ in size")
    # The photo alone, still outlined: overlay with a zero map draws only the contour.
    plain = overlay(img, np.zeros(img.shape[:2], np.float32), (0.0, 1.0), mask)
    spacer = np.full((img.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([plain, spacer, over], axis=1)


def model_view(model: Any, image: np.ndarray) -> np.ndarray:
    """The image as `model` sees it (its resize and crop), HxWx3 float in [0, 1].

    `model` is an `iadkit.Model` or an exported model of `iadkit.runtime` (both preprocessors
    have `view`). A model that tiles an image larger than its input sees the whole image at
    full resolution (its stitched maps have that size)."""
    tiling = getattr(model, "tiling", None)
    if tiling is not None and tiling.applies(np.asarray(image).shape[:2]):
        from iadkit.data.pixels import to_unit_float

        return to_unit_float(image)
    return np.asarray(model.preprocess.view(image))


def model_overlay(
    model: Any,
    sample: Any,
    amap: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    with_photo: bool = False,
    max_side: int | None = None,
    min_side: int | None = None,
) -> bytes:
    """PNG of `amap` (a map `model` produced) over the image of `sample` (a Sample, a path or
    an HxWxC array), coloured on the model's heat-map range (`model.map_range`; an
    uncalibrated model has none, and then the map's own min..max is used).

    `mask` (in the model's input geometry) or, for a Sample with a ground-truth mask, its mask
    is outlined. `with_photo` puts the plain photo beside the overlay (the report's gallery).
    `max_side` shrinks large images and `min_side` enlarges tiny ones (so the outline does not
    hide a defect of a few pixels).
    """
    if isinstance(sample, np.ndarray):
        image = sample
    elif isinstance(sample, (str, Path)):
        from iadkit.data.io import read_image

        image = read_image(sample)
    else:  # a Sample (imported only here: arrays and paths stay torch-free for the runtime's server)
        from iadkit.types import Sample

        if not isinstance(sample, Sample):
            raise TypeError(
                f"cannot draw an overlay of {type(sample).__name__}: give a Sample, a path or an HxWxC array"
            )
        image = sample.load_image()
        if mask is None and sample.has_mask:
            try:
                mask = model.preprocess.mask(sample.load_mask(shape=image.shape[:2])).numpy()
            except (ValueError, OSError):
                mask = None
    rgb = model_view(model, image)
    h, w = rgb.shape[:2]
    scale = 1.0
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
    elif min_side is not None and max(h, w) < min_side:
        scale = min_side / max(h, w)
    if scale != 1.0:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
        rgb = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=interp)
    a = np.asarray(amap, dtype=np.float32)
    map_range = model.map_range
    if map_range is None:
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        map_range = (lo, hi if hi > lo else lo + 1e-6)
    over = overlay(rgb, a, map_range, mask)
    return png_bytes(side_by_side(rgb, over, mask) if with_photo else over)
