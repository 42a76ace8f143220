"""Synthetic 3D inspection data: an RGB image and a pixel-aligned point map per shot (MVTec 3D-AD style).

Why: 3D methods (BTF, depth baselines) need data where some defects are geometric only -
a dent or a bump that a colour camera cannot see - and others are visible in colour, with
exact ground truth. The scene is a speckled rubber puck on a flat plate, seen from above by a
structured-light sensor with a colour camera under a diffuse dome light:

* geometry: a height map (metres) - the puck (radius ~32 mm, 12 mm high, rounded rim, a
  shallow dome, a centre recess, small part-to-part undulation) on a slightly tilted plate
  about 0.3 m from the sensor;
* point map: each pixel's camera coordinates (x, y, z) by pinhole projection of its depth,
  0.04 mm depth noise, and no point (0, 0, 0) on the puck's steep side wall and at 0.2 % of
  random pixels (sensor dropouts);
* colour: the surface's albedo under a dome light, so shading does not reveal the shape
  (nor a dent); optics, lighting gradient, gain and noise as in the 2D generator.

Defects and what shows them:

==============  ===========================================  ========  ==========
defect          what                                         geometry  RGB
==============  ===========================================  ========  ==========
dent            smooth depression 0.3-0.8 mm deep            yes       no
bump            smooth protrusion 0.3-0.8 mm high            yes       no
cut             groove 0.2-0.4 mm deep, lighter inside       yes       yes
contamination   a colour stain, flat                         no        yes
==============  ===========================================  ========  ==========

For a defect invisible in RGB the defective shot's RGB image is byte-identical to its
defect-free twin. Ground truth: a pixel is in the mask when the defect changed its height by
at least max(0.05 mm, 15 % of the largest change) or its colour by at least max(3/255, 15 %
of the largest change), before noise; enclosed gaps of blob-like defects are filled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from scipy import ndimage

from iadkit.data.synth_scenes import pixel_grid, polyline_coverage, smooth_noise

FIELD_OF_VIEW = 0.10  # metres covered by the image width at the plate's distance
WORKING_DISTANCE = 0.30  # metres from the sensor to the plate
DEPTH_NOISE = 0.00004  # metres (0.04 mm)
DROPOUT = 0.002  # fraction of pixels without a point
STEEP_SLOPE = 2.5  # height change per unit of lateral distance above which the sensor sees no point
HEIGHT_ABS_THRESHOLD = 0.00005  # metres: a smaller change is not in the mask
COLOUR_ABS_THRESHOLD = 3 / 255
MASK_REL_THRESHOLD = 0.15
DEFECT_AREA_RANGE = (0.003, 0.03)
_MAX_DEFECT_ATTEMPTS = 50


@dataclass(frozen=True)
class Spec3D:
    """A synthetic 3D category: its defect types and which modality shows each.

    Parameters
    ----------
    name, description
        Category name and a one-line description.
    defects
        Defect type -> (visible in geometry, visible in RGB).
    """

    name: str
    description: str
    defects: Mapping[str, tuple[bool, bool]]
    kind: str = "object"
    channels: int = 3

    @property
    def defect_types(self) -> tuple[str, ...]:
        return tuple(self.defects)

    @property
    def rgb_invisible(self) -> tuple[str, ...]:
        """Defect types the RGB image does not show (geometry only)."""
        return tuple(d for d, (_, rgb) in self.defects.items() if not rgb)


CATEGORIES_3D: dict[str, Spec3D] = {
    "puck": Spec3D(
        "puck",
        "speckled rubber puck on a plate, RGB + organised point map (metres); dents and bumps "
        "show in the geometry only",
        MappingProxyType(
            {"dent": (True, False), "bump": (True, False), "cut": (True, True), "contamination": (False, True)}
        ),
    ),
}


@dataclass
class Shot3D:
    """A rendered shot before noise: height above the plate (m), albedo (HxWx3), puck mask."""

    height: np.ndarray
    albedo: np.ndarray
    surface: np.ndarray  # where defects may go: the puck's flat top


@dataclass(frozen=True)
class Synth3DImage:
    """One generated 3D sample.

    image: HxWx3 uint8 RGB; xyz: HxWx3 float32 point map (0 = no point); mask: HxW bool or
    None; reference / reference_xyz: the same shot without the defect (defective samples).
    """

    image: np.ndarray
    xyz: np.ndarray
    mask: np.ndarray | None
    reference: np.ndarray | None = None
    reference_xyz: np.ndarray | None = None


# -- the scene ---------------------------------------------------------------------------------
def sample_puck(rng: np.random.Generator, size: int) -> dict[str, Any]:
    pitch = FIELD_OF_VIEW / size
    return {
        "pitch": pitch,
        "centre": (size / 2 + rng.uniform(-0.03, 0.03) * size, size / 2 + rng.uniform(-0.03, 0.03) * size),
        "radius": rng.uniform(0.031, 0.033),  # m
        "thickness": rng.uniform(0.0115, 0.0125),
        "dome": rng.uniform(0.0003, 0.0006),
        "recess_radius": rng.uniform(0.0055, 0.0065),
        "recess_depth": rng.uniform(0.0015, 0.0025),
        "undulation": 0.0001 * smooth_noise(rng, (size, size), size / 10),
        "tilt": rng.uniform(-0.03, 0.03, 2),  # plate slope (dz per metre) along x and y
        "rubber": np.array([0.23, 0.22, 0.21]) * rng.uniform(0.95, 1.05, 3),
        "plate": np.array([0.55, 0.60, 0.58]) * rng.uniform(0.96, 1.04, 3),
        "speckle": smooth_noise(rng, (size, size), 0.7),
        "mottle": smooth_noise(rng, (size, size), size / 16),
        "plate_grain": smooth_noise(rng, (size, size), 1.5),
    }


def render_puck(p: dict[str, Any], size: int) -> Shot3D:
    y, x = pixel_grid(size)
    r = np.hypot(x - p["centre"][0], y - p["centre"][1]) * p["pitch"]  # metres from the axis
    rim = 0.004  # fillet radius of the top edge
    inner = p["radius"] - rim
    top = p["thickness"] + p["dome"] * (1 - (r / p["radius"]) ** 2) + p["undulation"]
    fillet = np.sqrt(np.clip(rim**2 - (r - inner) ** 2, 0, None)) - rim  # 0 at the edge start, -rim at the rim
    height = np.where(r <= inner, top, np.where(r <= p["radius"], top + fillet, 0.0))
    recess = r < p["recess_radius"]
    height = np.where(recess, height - p["recess_depth"] * (1 - (r / p["recess_radius"]) ** 4), height)
    on_puck = r <= p["radius"]
    rubber = p["rubber"] * (1 + 0.12 * p["speckle"] + 0.05 * p["mottle"])[..., None]
    plate = p["plate"] * (1 + 0.03 * p["plate_grain"])[..., None]
    albedo = np.where(on_puck[..., None], rubber, plate).astype(np.float32)
    surface = (r < inner - 0.002) & (r > p["recess_radius"] + 0.001)
    return Shot3D(height.astype(np.float64), np.clip(albedo, 0, 1), surface)


# -- defects -------------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, surface: np.ndarray, margin_px: float) -> tuple[float, float]:
    allowed = ndimage.binary_erosion(surface, iterations=max(1, math.ceil(margin_px)))
    if not allowed.any():
        allowed = surface
    ys, xs = np.nonzero(allowed)
    k = int(rng.integers(len(ys)))
    return float(xs[k]) + rng.uniform(0, 1), float(ys[k]) + rng.uniform(0, 1)


def _blob(size: int, rng: np.random.Generator, surface: np.ndarray, radius_frac: tuple[float, float]) -> np.ndarray:
    """A smooth elliptical bump profile in [0, 1], zero outside, on the surface."""
    rx = size * rng.uniform(*radius_frac)
    ry = rx * rng.uniform(0.6, 1.0)
    a = rng.uniform(0, math.pi)
    cx, cy = _pick(rng, surface, rx + 1)
    y, x = pixel_grid(size)
    c, s = math.cos(a), math.sin(a)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    d2 = (u / rx) ** 2 + (v / ry) ** 2
    return np.where(d2 < 1, (1 - d2) ** 2, 0.0)


def dent(shot: Shot3D, rng: np.random.Generator, size: int) -> Shot3D:
    depth = rng.uniform(0.0003, 0.0008)
    return Shot3D(shot.height - depth * _blob(size, rng, shot.surface, (0.035, 0.06)), shot.albedo, shot.surface)


def bump(shot: Shot3D, rng: np.random.Generator, size: int) -> Shot3D:
    h = rng.uniform(0.0003, 0.0008)
    return Shot3D(shot.height + h * _blob(size, rng, shot.surface, (0.03, 0.05)), shot.albedo, shot.surface)


def cut(shot: Shot3D, rng: np.random.Generator, size: int) -> Shot3D:
    """A knife cut: a groove whose inside shows lighter, unweathered rubber."""
    length = size * rng.uniform(0.15, 0.25)
    cx, cy = _pick(rng, shot.surface, 0.06 * size)
    a = rng.uniform(0, math.pi)
    d = np.array([math.cos(a), math.sin(a)]) * length / 2
    c = np.array([cx, cy])
    bend = np.array([-d[1], d[0]]) * rng.uniform(-0.25, 0.25)
    t = np.linspace(0, 1, 16)[:, None]
    pts = (1 - t) ** 2 * (c - d) + 2 * (1 - t) * t * (c + bend) + t**2 * (c + d)
    cov = polyline_coverage(size, [(pts, rng.uniform(1.0, 1.6) * max(1.0, size / 96))]) * shot.surface
    depth = rng.uniform(0.0002, 0.0004)
    albedo = np.clip(shot.albedo + cov[..., None] * rng.uniform(0.12, 0.2), 0, 1).astype(np.float32)
    return Shot3D(shot.height - depth * cov, albedo, shot.surface)


def contamination(shot: Shot3D, rng: np.random.Generator, size: int) -> Shot3D:
    """A flat colour stain (oil, paint): the geometry is untouched."""
    alpha = np.clip(_blob(size, rng, shot.surface, (0.05, 0.08)) * 2.0, 0, 1)
    tint = np.array([0.35, 0.25, 0.05]) * rng.uniform(0.8, 1.2)
    albedo = np.clip(shot.albedo * (1 - 0.35 * alpha[..., None]) + 0.35 * alpha[..., None] * tint, 0, 1)
    return Shot3D(shot.height, albedo.astype(np.float32), shot.surface)


SCENES_3D: dict[
    str, tuple[Callable[[np.random.Generator, int], dict[str, Any]], Callable[[dict[str, Any], int], Shot3D]]
] = {
    "puck": (sample_puck, render_puck),
}

DEFECTS_3D: dict[str, Callable[[Shot3D, np.random.Generator, int], Shot3D]] = {
    "dent": dent,
    "bump": bump,
    "cut": cut,
    "contamination": contamination,
}
_BLOB_DEFECTS = frozenset({"dent", "bump", "contamination"})


# -- sensor ------------------------------------------------------------------------------------------
def point_map(shot: Shot3D, p: dict[str, Any], size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Camera coordinates of every pixel (pinhole at the origin looking along +z); 0 = no point.

    With `rng`, depth noise and random dropouts are added (the steep-wall gaps are always there).
    """
    y, x = pixel_grid(size)
    f = size * WORKING_DISTANCE / FIELD_OF_VIEW  # focal length in pixels
    c = size / 2
    lateral = (x - c) / f, (y - c) / f  # ray slopes
    plate = (
        WORKING_DISTANCE + p["tilt"][0] * lateral[0] * WORKING_DISTANCE + p["tilt"][1] * lateral[1] * WORKING_DISTANCE
    )
    z = plate - shot.height
    if rng is not None:
        z = z + rng.normal(0.0, DEPTH_NOISE, z.shape)
    xyz = np.stack([lateral[0] * z, lateral[1] * z, z], axis=-1).astype(np.float32)
    gy, gx = np.gradient(shot.height, p["pitch"])
    missing = np.hypot(gx, gy) > STEEP_SLOPE
    if rng is not None:
        missing |= rng.random(z.shape) < DROPOUT
    xyz[missing] = 0.0
    return xyz


def _defect_mask(name: str, good: Shot3D, bad: Shot3D, rgb_good: np.ndarray, rgb_bad: np.ndarray) -> np.ndarray:
    mask = np.zeros(good.height.shape, bool)
    dh = np.abs(bad.height - good.height)
    if dh.max() > 0:
        mask |= dh >= max(HEIGHT_ABS_THRESHOLD, MASK_REL_THRESHOLD * dh.max())
    dc = np.abs(rgb_bad - rgb_good).max(axis=2)
    if dc.max() > 0:
        mask |= dc >= max(COLOUR_ABS_THRESHOLD, MASK_REL_THRESHOLD * dc.max())
    if name in _BLOB_DEFECTS:
        mask = ndimage.binary_fill_holes(mask)
    return mask


def synthesize_3d(
    category: str,
    defect_type: str | None,
    *,
    image_size: int,
    streams: list[np.random.Generator],
    optics: Callable[[np.ndarray, dict[str, Any]], np.ndarray],
    sample_optics: Callable[[np.random.Generator, int], dict[str, Any]],
    to_uint8: Callable[[np.ndarray], np.ndarray],
) -> Synth3DImage:
    """One shot; `streams` are (scene, optics, noise, defect, depth noise) generators.

    Called by :func:`iadkit.data.synthetic.synthesize_3d`, which owns seeding, optics and
    validation; this function only draws.
    """
    r_scene, r_optics, r_noise, r_defect, r_depth = streams
    sample, render = SCENES_3D[category]
    params = sample(r_scene, image_size)
    good = render(params, image_size)
    light = sample_optics(r_optics, 3)
    clean_rgb = optics(good.albedo, light)
    noise = r_noise.normal(0.0, light["noise"], clean_rgb.shape).astype(np.float32)
    depth_state = r_depth.bit_generator.state  # the defective twin gets the same sensor noise
    good_xyz = point_map(good, params, image_size, r_depth)
    if defect_type is None:
        return Synth3DImage(to_uint8(clean_rgb + noise), good_xyz, None)
    lo, hi = DEFECT_AREA_RANGE
    fn = DEFECTS_3D[defect_type]
    for _ in range(_MAX_DEFECT_ATTEMPTS):
        bad = fn(good, r_defect, image_size)
        bad_rgb = optics(bad.albedo, light) if bad.albedo is not good.albedo else clean_rgb
        mask = _defect_mask(defect_type, good, bad, clean_rgb, bad_rgb)
        if lo <= mask.mean() <= hi:
            r_depth.bit_generator.state = depth_state
            bad_xyz = point_map(bad, params, image_size, r_depth)
            return Synth3DImage(
                to_uint8(bad_rgb + noise), bad_xyz, mask, reference=to_uint8(clean_rgb + noise), reference_xyz=good_xyz
            )
    raise RuntimeError(  # a generator bug, not a user error
        f"could not draw a {defect_type} defect of {lo:.1%}-{hi:.1%} of a {image_size}px image in {_MAX_DEFECT_ATTEMPTS} tries"
    )


__all__ = [
    "CATEGORIES_3D",
    "DEFECTS_3D",
    "SCENES_3D",
    "Spec3D",
    "Synth3DImage",
    "point_map",
    "render_puck",
    "sample_puck",
]
