"""Procedural good parts for the synthetic dataset: drawing primitives, textures, objects.

Every scene is split into `sample_*` (draw the random nuisances and the layout from a numpy
Generator into a plain dict) and `render_*` (a pure function of that dict and the image
size). The split exists for logical defects: a "missing hole" is the same dict with one hole
removed, rendered again, so everything except the missing part is pixel-identical.

Images are float arrays HxWxC in [0, 1] (C = 1 grayscale, 3 RGB) *before* optics, lighting and
sensor noise, which `synthetic.py` applies afterwards to good and defective twins alike.
Shapes are anti-aliased by supersampling (`SS` samples per pixel and axis, box-averaged).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SS = 4  # supersampling factor for shapes (anti-aliasing)
Params = dict[str, Any]


@dataclass
class Rendered:
    """A rendered scene: the image and where defects may be placed (the part's surface)."""

    image: np.ndarray  # HxWxC float32 in [0, 1]
    surface: np.ndarray  # HxW bool; all True for textures


# -- primitives ------------------------------------------------------------------------------
def pixel_grid(size: int, ss: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of sample centres in output-pixel units; pixel i covers [i, i+1)."""
    c = (np.arange(size * ss, dtype=np.float32) + 0.5) / ss
    return c[:, None] + np.zeros((1, size * ss), np.float32), c[None, :] + np.zeros((size * ss, 1), np.float32)


def downsample(a: np.ndarray, ss: int) -> np.ndarray:
    """Box-average an (H*ss)x(W*ss)[xC] array down to HxW[xC] (summing strided views: fast)."""
    if ss == 1:
        return a
    h, w = a.shape[0] // ss, a.shape[1] // ss
    r = a.reshape(h, ss, w, ss, *a.shape[2:])
    rows = r[:, 0].astype(np.float32)
    for k in range(1, ss):
        rows += r[:, k]
    out = rows[:, :, 0].copy()
    for k in range(1, ss):
        out += rows[:, :, k]
    return out / (ss * ss)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation, periodic (wraps)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return f / max(float(f.std()), 1e-6)


def sample_field(field: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear lookup of a periodic field at fractional (rows, cols)."""
    return ndimage.map_coordinates(field, [rows.ravel(), cols.ravel()], order=1, mode="grid-wrap").reshape(rows.shape)


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def ellipse_coverage(size: int, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
    """Anti-aliased coverage (HxW in [0, 1]) of a rotated filled ellipse."""
    out = np.zeros((size, size), np.float32)
    r = max(rx, ry) + 1  # only the bounding box is sampled
    x0, x1 = max(0, int(cx - r)), min(size, int(cx + r) + 1)
    y0, y1 = max(0, int(cy - r)), min(size, int(cy + r) + 1)
    if x0 >= x1 or y0 >= y1:
        return out
    ys = (np.arange(y0 * SS, y1 * SS, dtype=np.float32) + 0.5) / SS
    xs = (np.arange(x0 * SS, x1 * SS, dtype=np.float32) + 0.5) / SS
    dx, dy = xs[None, :] - cx, ys[:, None] - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    out[y0:y1, x0:x1] = downsample(((u / rx) ** 2 + (v / ry) ** 2 <= 1.0).astype(np.float32), SS)
    return out


def disc_coverage(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage of a disc from its signed distance (exact enough for AA, and cheap)."""
    y, x = pixel_grid(size)
    return np.clip(r - np.sqrt((x - cx) ** 2 + (y - cy) ** 2) + 0.5, 0.0, 1.0)


def polygon_coverage(size: int, points: list[tuple[float, float]]) -> np.ndarray:
    """Anti-aliased coverage of a filled polygon given in output-pixel (x, y) coordinates."""
    out = np.zeros((size, size), np.float32)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = max(0, int(min(xs)) - 1), min(size, int(max(xs)) + 2)  # draw only the bounding box
    y0, y1 = max(0, int(min(ys)) - 1), min(size, int(max(ys)) + 2)
    if x0 >= x1 or y0 >= y1:
        return out
    img = Image.new("L", ((x1 - x0) * SS, (y1 - y0) * SS), 0)
    ImageDraw.Draw(img).polygon([((x - x0) * SS - 0.5, (y - y0) * SS - 0.5) for x, y in points], fill=255)
    out[y0:y1, x0:x1] = downsample(np.asarray(img, np.float32) / 255.0, SS)
    return out


def polyline_coverage(size: int, lines: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """Anti-aliased coverage of thick polylines; each line is (Nx2 array of (x, y), width px)."""
    img = Image.new("L", (size * SS, size * SS), 0)
    draw = ImageDraw.Draw(img)
    for pts, width in lines:
        xy = [(float(x) * SS - 0.5, float(y) * SS - 0.5) for x, y in pts]
        draw.line(xy, fill=255, width=max(1, round(width * SS)), joint="curve")
        r = width * SS / 2  # round caps: PIL's line ends are square-cut
        for x, y in (xy[0], xy[-1]):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return downsample(np.asarray(img, np.float32) / 255.0, SS)


def rotated_rect(cx: float, cy: float, w: float, h: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    pts = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    return [(cx + px * c - py * s, cy + px * s + py * c) for px, py in pts]


def erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    return ndimage.binary_erosion(mask, iterations=pixels) if pixels > 0 else mask


# -- textures ----------------------------------------------------------------------------------
def sample_fabric(rng: np.random.Generator, size: int) -> Params:
    """Plain-weave linen: thread period ~1/12 of the image, small rotation, random phase."""
    period = size / rng.uniform(11.0, 13.5)
    base = (np.array([0.62, 0.56, 0.46]) * rng.uniform(0.97, 1.03, 3)).astype(np.float32)
    return {
        "period": period,
        "angle": math.radians(rng.uniform(-3.0, 3.0)),
        "offset": rng.uniform(0, 2 * period, 2),
        "warp_width": rng.uniform(0.74, 0.94, 64),  # thread-thickness jitter, per thread
        "weft_width": rng.uniform(0.74, 0.94, 64),
        "warp_color": base,
        "weft_color": base * np.array([0.93, 0.94, 0.97], np.float32),
        "fibre": smooth_noise(rng, (2 * size, 2 * size), 0.8),  # on the 2x supersampling grid
    }


def render_fabric(p: Params, size: int) -> Rendered:
    ss = 2
    y, x = pixel_grid(size, ss)
    c, s = math.cos(p["angle"]), math.sin(p["angle"])
    u = (x * c + y * s + np.float32(p["offset"][0])) / np.float32(p["period"])
    v = (-x * s + y * c + np.float32(p["offset"][1])) / np.float32(p["period"])
    i, j = np.floor(u).astype(np.int32), np.floor(v).astype(np.int32)
    fu, fv = u - i, v - j
    # Round thread cross-sections: height 1 at the thread centre, 0 at its edge.
    ww, fw = p["warp_width"].astype(np.float32), p["weft_width"].astype(np.float32)
    hw = np.sqrt(np.clip(1 - (np.abs(2 * fu - 1) / ww[i % 64]) ** 2, 0, 1))
    hf = np.sqrt(np.clip(1 - (np.abs(2 * fv - 1) / fw[j % 64]) ** 2, 0, 1))
    warp_top = (i + j) % 2 == 0
    # A thread passing over is brightest mid-cell and dips where it goes under.
    vw = hw * np.where(warp_top, 0.7 + 0.3 * np.sin(np.pi * fv), 0.55)
    vf = hf * np.where(~warp_top, 0.7 + 0.3 * np.sin(np.pi * fu), 0.55)
    show_warp = np.where(warp_top, hw > 0, hf <= 0)
    val = np.where(show_warp, vw, vf)
    val = 0.3 + 0.7 * val + 0.05 * p["fibre"]
    col = np.where(show_warp[..., None], p["warp_color"], p["weft_color"])
    img = downsample((col * val[..., None]).astype(np.float32), ss)
    return Rendered(np.clip(img, 0, 1), np.ones((size, size), bool))


def sample_metal(rng: np.random.Generator, size: int) -> Params:
    """Brushed steel: long anisotropic streaks, a broad specular band across the brushing."""
    n = 2 * size
    return {
        "angle": math.radians(rng.uniform(-4.0, 4.0)),
        "offset": rng.uniform(0, n, 2),
        # Streak fields are stored 8x compressed along the brushing (they are smooth there).
        "fine": smooth_noise(rng, (n, n // 8), (0.7, 0.25 * n / 8)),
        "coarse": smooth_noise(rng, (n, n // 8), (3.0, 0.3 * n / 8)),
        "level": rng.uniform(0.46, 0.54),
        "band_pos": rng.uniform(0.15, 0.85) * size,
        "band_width": rng.uniform(0.15, 0.3) * size,
        "band_gain": rng.uniform(0.08, 0.16),
    }


def render_metal(p: Params, size: int) -> Rendered:
    y, x = pixel_grid(size)
    c, s = math.cos(p["angle"]), math.sin(p["angle"])
    u = x * c + y * s  # along the brushing
    v = -x * s + y * c  # across it
    rows, cols = v + p["offset"][0], (u + p["offset"][1]) / 8
    val = p["level"] + 0.045 * sample_field(p["fine"], rows, cols) + 0.03 * sample_field(p["coarse"], rows, cols)
    val = val + p["band_gain"] * np.exp(-(((u - p["band_pos"]) / p["band_width"]) ** 2))
    return Rendered(np.clip(val, 0, 1)[..., None].astype(np.float32), np.ones((size, size), bool))


def sample_wood(rng: np.random.Generator, size: int) -> Params:
    """Plank cut near the log: ring arcs around a far-away pith, bent by turbulence."""
    dist = size * rng.uniform(1.0, 1.6)
    alpha = math.pi + rng.uniform(-0.3, 0.3)
    light = (np.array([0.80, 0.62, 0.42]) * rng.uniform(0.97, 1.03, 3)).astype(np.float32)
    return {
        "centre": (size / 2 + dist * math.cos(alpha), size / 2 + dist * math.sin(alpha)),
        "stretch": rng.uniform(2.5, 4.0),
        "period": size / rng.uniform(4.5, 6.5),
        "phase": rng.uniform(0, 1),
        # Smooth fields are stored compressed (4x; grain 8x along the fibres) and interpolated.
        "turb": smooth_noise(rng, (size // 4, size // 4), size / 28),
        "turb_amp": rng.uniform(0.08, 0.16),
        "grain": smooth_noise(rng, (size // 4, 2 * size), (0.025 * size, 0.6)),
        "light": light,
        "dark": light * np.array([0.70, 0.62, 0.55], np.float32),
    }


def render_wood(p: Params, size: int) -> Rendered:
    ss = 2
    y, x = pixel_grid(size, ss)
    dx, dy = x - p["centre"][0], (y - p["centre"][1]) / p["stretch"]
    r = np.sqrt(dx * dx + dy * dy) / p["period"]
    r = r + np.float32(p["phase"]) + np.float32(p["turb_amp"]) * sample_field(p["turb"], y / 4, x / 4)
    ring = r - np.floor(r)
    late = smoothstep(0.55, 0.92, ring) * (1 - smoothstep(0.95, 1.0, ring))  # dark latewood band
    col = p["light"] * (1 - late[..., None]) + p["dark"] * late[..., None]
    col = col * (1 + 0.06 * sample_field(p["grain"], y / 4, x * 2))[..., None]
    img = downsample(col.astype(np.float32), ss)
    return Rendered(np.clip(img, 0, 1), np.ones((size, size), bool))


# -- objects ----------------------------------------------------------------------------------
def _rubber_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dark matte conveyor belt (grayscale)."""
    return (0.2 + 0.02 * smooth_noise(rng, (size, size), 3.0) + 0.012 * smooth_noise(rng, (size, size), 0.7)).astype(
        np.float32
    )


def sample_washer(rng: np.random.Generator, size: int) -> Params:
    """A turned flange washer with six bolt holes, placed and rotated at random."""
    scale = rng.uniform(0.97, 1.03)
    return {
        "centre": (size / 2 + rng.uniform(-0.04, 0.04) * size, size / 2 + rng.uniform(-0.04, 0.04) * size),
        "rotation": rng.uniform(0, 2 * math.pi),
        "r_out": 0.37 * size * scale,
        "r_in": 0.14 * size * scale,
        "r_bolt": 0.255 * size * scale,
        "r_hole": 0.045 * size * scale,
        "holes": list(range(6)),
        "light_angle": rng.uniform(0, 2 * math.pi),
        "level": rng.uniform(0.55, 0.63),
        "background": _rubber_background(rng, size),
        "turning_phase": rng.uniform(0, 2 * math.pi),
    }


def washer_hole_centres(p: Params) -> list[tuple[float, float]]:
    cx, cy = p["centre"]
    angles = [p["rotation"] + k * math.pi / 3 for k in p["holes"]]
    return [(cx + p["r_bolt"] * math.cos(a), cy + p["r_bolt"] * math.sin(a)) for a in angles]


def render_washer(p: Params, size: int) -> Rendered:
    y, x = pixel_grid(size)
    cx, cy = p["centre"]
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    cov = np.clip(p["r_out"] - r + 0.5, 0, 1) - np.clip(p["r_in"] - r + 0.5, 0, 1)
    for hx, hy in washer_hole_centres(p):
        cov -= disc_coverage(size, hx, hy, p["r_hole"])
    cov = np.clip(cov, 0, 1)
    theta = np.arctan2(y - cy, x - cx)
    # Lit from one side; fine concentric lathe marks; chamfers at both rims.
    shade = p["level"] + 0.1 * np.cos(theta - p["light_angle"]) * (r / p["r_out"])
    shade = shade + 0.025 * np.sin(2 * np.pi * r / (0.018 * size) + p["turning_phase"])
    rim = smoothstep(0.05 * size, 0.0, np.minimum(p["r_out"] - r, r - p["r_in"]))
    shade = shade - 0.12 * rim * np.cos(theta - p["light_angle"])
    # Soft shadow of the washer on the belt, offset away from the light.
    shift = (-1.5 * math.sin(p["light_angle"]), -1.5 * math.cos(p["light_angle"]))
    shadow = ndimage.gaussian_filter(ndimage.shift(cov, shift, order=1), 1.2)
    bg = p["background"] * (1 - 0.35 * shadow)
    img = cov * shade + (1 - cov) * bg
    return Rendered(np.clip(img, 0, 1)[..., None].astype(np.float32), erode(cov > 0.999, 1))


LABEL_ICONS = ("square", "disc", "diamond")


def sample_label(rng: np.random.Generator, size: int) -> Params:
    """A printed label on cardboard: logo, title, two text lines, three icons in four slots."""
    kraft = np.array([0.60, 0.46, 0.30]) * rng.uniform(0.96, 1.04, 3)
    fibres = 0.05 * smooth_noise(rng, (size, size), 1.5) + 0.03 * smooth_noise(rng, (size, size), 6.0)
    bg = kraft * (1 + fibres)[..., None]
    return {
        "centre": (size / 2 + rng.uniform(-0.035, 0.035) * size, size / 2 + rng.uniform(-0.035, 0.035) * size),
        "angle": math.radians(rng.uniform(-4.0, 4.0)),
        "paper": np.array([0.93, 0.92, 0.88]) * rng.uniform(0.98, 1.02, 3),
        "ink": rng.uniform(0.9, 1.1),  # print density
        "register": rng.uniform(-0.006, 0.006, 2) * size,  # print registration relative to the label
        "elements": ["logo", "title", "line1", "line2", "icon0", "icon1", "icon2"],
        "icon_slots": {"icon0": 0, "icon1": 1, "icon2": 2},  # slot 3 stays empty
        "icon_shapes": {"icon0": "square", "icon1": "disc", "icon2": "diamond"},
        "background": bg.astype(np.float32),
        "paper_noise": smooth_noise(rng, (size, size), 0.8),
    }


def _label_to_image(p: Params, size: int, lx: float, ly: float) -> tuple[float, float]:
    """Label coordinates (units of the image size, origin at the label centre) -> pixels."""
    c, s = math.cos(p["angle"]), math.sin(p["angle"])
    lx, ly = lx * size + p["register"][0], ly * size + p["register"][1]
    return p["centre"][0] + lx * c - ly * s, p["centre"][1] + lx * s + ly * c


def label_element_coverage(p: Params, size: int, name: str) -> np.ndarray:
    """Coverage of one printed element (its shape follows the element's kind and slot)."""
    to_img = lambda lx, ly: _label_to_image(p, size, lx, ly)
    if name == "logo":
        cx, cy = to_img(-0.24, -0.12)
        return disc_coverage(size, cx, cy, 0.065 * size)
    rects = {  # centre x, centre y, width, height
        "title": (0.08, -0.15, 0.30, 0.055),
        "line1": (0.08, -0.06, 0.30, 0.025),
        "line2": (0.02, 0.0, 0.18, 0.025),
    }
    if name in rects:
        lx, ly, w, h = rects[name]
        cx, cy = to_img(lx, ly)
        return polygon_coverage(size, rotated_rect(cx, cy, w * size, h * size, p["angle"]))
    slot = p["icon_slots"][name]
    cx, cy = to_img(-0.24 + slot * 0.15, 0.13)
    shape = p["icon_shapes"][name]
    if shape == "square":
        return polygon_coverage(size, rotated_rect(cx, cy, 0.08 * size, 0.08 * size, p["angle"]))
    if shape == "disc":
        return disc_coverage(size, cx, cy, 0.05 * size)
    d = 0.058 * size  # diamond: half-diagonal
    return polygon_coverage(size, rotated_rect(cx, cy, d * math.sqrt(2), d * math.sqrt(2), p["angle"] + math.pi / 4))


INK = {
    "logo": (0.72, 0.16, 0.12),
    "title": (0.12, 0.12, 0.14),
    "line1": (0.35, 0.35, 0.37),
    "line2": (0.35, 0.35, 0.37),
}
ICON_INK = (0.14, 0.20, 0.42)


def render_label(p: Params, size: int) -> Rendered:
    cx, cy = p["centre"]
    paper_cov = polygon_coverage(size, rotated_rect(cx, cy, 0.72 * size, 0.52 * size, p["angle"]))
    paper = p["paper"] * (1 + 0.02 * p["paper_noise"])[..., None]
    img = paper_cov[..., None] * paper + (1 - paper_cov[..., None]) * p["background"]
    for name in p["elements"]:
        cov = label_element_coverage(p, size, name)[..., None]
        ink = np.array(INK.get(name, ICON_INK))
        ink = paper + (ink - paper) * min(1.0, p["ink"])  # lighter print when the density is low
        img = img * (1 - cov) + cov * ink
    return Rendered(np.clip(img, 0, 1).astype(np.float32), erode(paper_cov > 0.999, 1))


# -- a compartment tray (logical anomalies: counts and positions) -----------------------------
TRAY_SLOTS = 6  # 2 rows x 3 columns: the nuts fill one row, the bolts the other
TRAY_COLUMNS = (-0.27, 0.0, 0.27)  # compartment centres, tray coordinates (units of the image size)
TRAY_ROWS = (-0.135, 0.135)
TRAY_CELL = (0.24, 0.23)  # compartment floor, width x height
NUT_RADIUS = 0.04  # hexagon circumradius
NUT_HOLE = 0.016
BOLT_LENGTH = 0.115  # shank
BOLT_WIDTH = 0.027
BOLT_HEAD = (0.035, 0.05)  # along x across


def tray_part_pose(rng: np.random.Generator, kind: str, heading: float = 0.0) -> dict[str, float]:
    """Where a part lies in its compartment: a small offset and an orientation (a bolt's
    head points along `heading`, give or take a few degrees)."""
    if kind == "nut":
        angle = rng.uniform(0, math.pi / 3)  # a hexagon repeats every 60 degrees
    else:
        angle = heading + rng.normal(0, 0.12)
    return {"dx": float(rng.uniform(-0.018, 0.018)), "dy": float(rng.uniform(-0.018, 0.018)), "angle": float(angle)}


def tray_layout(nut_row: int) -> tuple[str, ...]:
    """The kind of part in each slot (row-major) when the nuts fill row `nut_row`."""
    return tuple("nut" if slot // 3 == nut_row else "bolt" for slot in range(TRAY_SLOTS))


def sample_tray(rng: np.random.Generator, size: int) -> Params:
    """A dark plastic tray with six compartments on a light table: three brass nuts fill one
    row and three steel bolts the other, every bolt's head pointing the same way.

    Which row holds the nuts and which way the bolts point vary from tray to tray (the tray
    is symmetric and is filled either way round), so every compartment may hold either kind
    and a bolt may point either way: the rules - one kind per row, all bolts alike - bind
    parts that are two compartments apart, not what one compartment looks like.
    """
    table = 0.04 * smooth_noise(rng, (size, size), 4.0) + 0.015 * smooth_noise(rng, (size, size), 0.8)
    nut_row = int(rng.integers(2))
    heading = 0.0 if rng.random() < 0.5 else math.pi
    return {
        "centre": (size / 2 + rng.uniform(-0.02, 0.02) * size, size / 2 + rng.uniform(-0.02, 0.02) * size),
        "angle": math.radians(rng.uniform(-2.5, 2.5)),
        "table": (np.array([0.78, 0.77, 0.74]) * rng.uniform(0.97, 1.03, 3) * (1 + table)[..., None]).astype(
            np.float32
        ),
        "plastic": np.array([0.20, 0.22, 0.27]) * rng.uniform(0.95, 1.05),
        "brass": np.array([0.74, 0.58, 0.26]) * rng.uniform(0.94, 1.06, 3),
        "steel": np.array([0.62, 0.63, 0.66]) * rng.uniform(0.94, 1.06),
        "light": rng.uniform(0, 2 * math.pi),
        "nut_row": nut_row,
        "heading": heading,
        # slot -> list of (kind, pose); a good tray has exactly one part per slot
        "parts": {i: [(kind, tray_part_pose(rng, kind, heading))] for i, kind in enumerate(tray_layout(nut_row))},
    }


def _tray_to_image(p: Params, size: int, tx: float, ty: float) -> tuple[float, float]:
    c, s = math.cos(p["angle"]), math.sin(p["angle"])
    tx, ty = tx * size, ty * size
    return p["centre"][0] + tx * c - ty * s, p["centre"][1] + tx * s + ty * c


def tray_slot_centre(slot: int) -> tuple[float, float]:
    """Compartment centre in tray coordinates."""
    return TRAY_COLUMNS[slot % 3], TRAY_ROWS[slot // 3]


def tray_part_coverage(p: Params, size: int, slot: int, kind: str, pose: dict[str, float]) -> np.ndarray:
    """Anti-aliased coverage of one part (a nut's hole left open)."""
    sx, sy = tray_slot_centre(slot)
    cx, cy = _tray_to_image(p, size, sx + pose["dx"], sy + pose["dy"])
    a = p["angle"] + pose["angle"]
    if kind == "nut":
        r = NUT_RADIUS * size
        hexagon = [(cx + r * math.cos(a + k * math.pi / 3), cy + r * math.sin(a + k * math.pi / 3)) for k in range(6)]
        return np.clip(polygon_coverage(size, hexagon) - disc_coverage(size, cx, cy, NUT_HOLE * size), 0.0, 1.0)
    length, width = BOLT_LENGTH * size, BOLT_WIDTH * size
    head_len, head_w = BOLT_HEAD[0] * size, BOLT_HEAD[1] * size
    # shank centred on the part, head at one end
    shank = polygon_coverage(size, rotated_rect(cx, cy, length, width, a))
    hx, hy = cx - (length + head_len) / 2 * math.cos(a), cy - (length + head_len) / 2 * math.sin(a)
    head = polygon_coverage(size, rotated_rect(hx, hy, head_len, head_w, a))
    return np.clip(shank + head, 0.0, 1.0)


def render_tray(p: Params, size: int) -> Rendered:
    y, x = pixel_grid(size)
    cx, cy = p["centre"]
    tray_cov = polygon_coverage(size, rotated_rect(cx, cy, 0.86 * size, 0.58 * size, p["angle"]))
    floor_cov = np.zeros((size, size), np.float32)
    for slot in range(TRAY_SLOTS):
        fx, fy = _tray_to_image(p, size, *tray_slot_centre(slot))
        floor_cov = np.maximum(
            floor_cov,
            polygon_coverage(size, rotated_rect(fx, fy, TRAY_CELL[0] * size, TRAY_CELL[1] * size, p["angle"])),
        )
    plastic = np.asarray(p["plastic"], np.float32)
    # Compartment floors are a little lighter than the walls; the table casts no pattern on them.
    tray_img = plastic * (1 + 0.25 * floor_cov)[..., None]
    img = tray_cov[..., None] * tray_img + (1 - tray_cov[..., None]) * p["table"]
    # Parts: flat colour, lit from one side across each part, with a soft shadow on the floor.
    lx, ly = math.cos(p["light"]), math.sin(p["light"])
    shade = 1 + 0.12 * ((x - cx) * lx + (y - cy) * ly) / size
    all_parts = np.zeros((size, size), np.float32)
    colour_sum = np.zeros((size, size, 3), np.float32)
    for slot, items in p["parts"].items():
        for kind, pose in items:
            cov = tray_part_coverage(p, size, slot, kind, pose)
            colour = np.asarray(p["brass"] if kind == "nut" else p["steel"], np.float32)
            new = cov * (1 - all_parts)  # a part lying on another hides it
            colour_sum += new[..., None] * colour
            all_parts = all_parts + new
    shadow = ndimage.gaussian_filter(ndimage.shift(all_parts, (1.0, 1.0), order=1), 1.0)
    img = img * (1 - 0.35 * shadow * (1 - all_parts))[..., None]
    parts_img = colour_sum / np.maximum(all_parts, 1e-6)[..., None] * shade[..., None]
    img = img * (1 - all_parts[..., None]) + parts_img * all_parts[..., None]
    return Rendered(np.clip(img, 0, 1).astype(np.float32), erode(tray_cov > 0.999, 1))


@dataclass(frozen=True)
class Scene:
    """How to draw one category's good part: random layout, then a pure render."""

    sample: Callable[[np.random.Generator, int], Params]
    render: Callable[[Params, int], Rendered]


SCENES: dict[str, Scene] = {
    "fabric": Scene(sample_fabric, render_fabric),
    "metal": Scene(sample_metal, render_metal),
    "wood": Scene(sample_wood, render_wood),
    "washer": Scene(sample_washer, render_washer),
    "label": Scene(sample_label, render_label),
    "tray": Scene(sample_tray, render_tray),
}
