"""Defects for the synthetic dataset, one function per defect type.

A defect function takes the good scene (its layout dict and its rendered image) and returns
the defective scene image. Structural defects paint onto the rendered image; logical defects
(missing or extra parts) change the layout and render it again, so the result is locally
normal everywhere and only the arrangement is wrong.

Sizes scale with the image so that a defect covers roughly 0.3-3% of the image, and
contrasts stay of the order of the natural variation between good parts (lighting, print
density, texture contrast): the dataset should reward detectors that look locally.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from iadkit.data.synth_scenes import (
    LABEL_ICONS,
    TRAY_SLOTS,
    Params,
    Rendered,
    Scene,
    ellipse_coverage,
    erode,
    pixel_grid,
    polyline_coverage,
    smoothstep,
    tray_part_pose,
)


@dataclass(frozen=True)
class DefectContext:
    """The good twin a defect is applied to."""

    scene: Scene
    params: Params
    good: Rendered
    size: int

    def rerender(self, params: Params) -> np.ndarray:
        return self.scene.render(params, self.size).image


DefectFn = Callable[[DefectContext, np.random.Generator], np.ndarray]


# -- placement helpers --------------------------------------------------------------------------
def pick_point(rng: np.random.Generator, surface: np.ndarray, margin: float) -> tuple[float, float]:
    """A random (x, y) on the surface at least `margin` px from its edge and the image border."""
    m = max(1, math.ceil(margin))
    allowed = erode(surface, m).copy()
    allowed[:m], allowed[-m:], allowed[:, :m], allowed[:, -m:] = False, False, False, False
    if not allowed.any():
        allowed = surface
    ys, xs = np.nonzero(allowed)
    k = int(rng.integers(len(ys)))
    return float(xs[k]) + rng.uniform(0, 1), float(ys[k]) + rng.uniform(0, 1)


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _on_surface(ctx: DefectContext, cov: np.ndarray) -> np.ndarray:
    return cov * ctx.good.surface


def _paint(image: np.ndarray, cov: np.ndarray, delta: np.ndarray | float) -> np.ndarray:
    """image + cov * delta (delta per channel or scalar), clipped to [0, 1]."""
    return np.clip(image + cov[..., None] * delta, 0.0, 1.0).astype(np.float32)


# -- structural defects ---------------------------------------------------------------------------
def scratch(ctx: DefectContext, rng: np.random.Generator) -> np.ndarray:
    """A thin, slightly curved, bright or dark anti-aliased line."""
    s = ctx.size
    length = s * rng.uniform(0.22, 0.38)
    cx, cy = pick_point(rng, ctx.good.surface, 0.1 * s)
    a = rng.uniform(0, math.pi)
    d = np.array([math.cos(a), math.sin(a)]) * length / 2
    c = np.array([cx, cy])
    bend = np.array([-d[1], d[0]]) * rng.uniform(-0.3, 0.3)
    pts = _bezier(c - d, c + bend, c + d, 24)
    width = rng.uniform(0.9, 1.4) * max(1.0, s / 96)
    cov = _on_surface(ctx, polyline_coverage(s, [(pts, width)]))
    sign = 1.0 if rng.random() < 0.6 else -1.0
    return _paint(ctx.good.image, cov, sign * rng.uniform(0.12, 0.22))


def thread(ctx: DefectContext, rng: np.random.Generator) -> np.ndarray:
    """A pulled or foreign thread in a weave: a straight line along warp or weft, lighter or darker."""
    s, p = ctx.size, ctx.params
    length = s * rng.uniform(0.2, 0.32)
    cx, cy = pick_point(rng, ctx.good.surface, 0.12 * s)
    a = p["angle"] + (0 if rng.random() < 0.5 else math.pi / 2)
    d = np.array([math.cos(a), math.sin(a)]) * length / 2
    c = np.array([cx, cy])
    cov = polyline_coverage(s, [(np.stack([c - d, c + d]), p["period"] * rng.uniform(0.35, 0.5))])
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return _paint(ctx.good.image, cov, sign * rng.uniform(0.1, 0.18))


def crack(ctx: DefectContext, rng: np.random.Generator) -> np.ndarray:
    """A dark branching random walk, thinner on the branches."""
    s = ctx.size
    step = 0.8
    n = int(s * rng.uniform(0.2, 0.32) / step)
    x, y = pick_point(rng, ctx.good.surface, 0.15 * s)
    heading = rng.uniform(0, 2 * math.pi)
    width = rng.uniform(1.0, 1.5) * max(1.0, s / 96)
    main = [(x, y)]
    branches: list[tuple[np.ndarray, float]] = []
    for i in range(n):
        heading += rng.normal(0, 0.3)
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        main.append((x, y))
        if len(branches) < 2 and i > n // 4 and rng.random() < 0.05:
            bh = heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0)
            bx, by, pts = x, y, [(x, y)]
            for _ in range(int((n - i) * rng.uniform(0.3, 0.5))):
                bh += rng.normal(0, 0.3)
                bx, by = bx + step * math.cos(bh), by + step * math.sin(bh)
                pts.append((bx, by))
            if len(pts) > 2:
                branches.append((np.array(pts), 0.7 * width))
    cov = _on_surface(ctx, polyline_coverage(s, [(np.array(main), width), *branches]))
    darkness = rng.uniform(0.35, 0.55)
    return np.clip(ctx.good.image * (1 - darkness * cov[..., None]), 0, 1).astype(np.float32)


def hole(ctx: DefectContext, rng: np.random.Generator) -> np.ndarray:
    """A small dark elliptical opening with a shaded, frayed rim."""
    s = ctx.size
    rx = s * rng.uniform(0.03, 0.05)
    ry = rx * rng.uniform(0.6, 1.0)
    a = rng.uniform(0, math.pi)
    cx, cy = pick_point(rng, ctx.good.surface, rx + 2)
    inner = ellipse_coverage(s, cx, cy, rx, ry, a)
    rim_w = rng.uniform(0.8, 1.5)
    outer = ellipse_coverage(s, cx, cy, rx + rim_w, ry + rim_w, a)
    img = ctx.good.image
    dark = img.reshape(-1, img.shape[2]).mean(0) * rng.uniform(0.15, 0.3)
    img = img * (1 - inner[..., None]) + dark * inner[..., None]
    return np.clip(img * (1 - 0.3 * (outer - inner))[..., None], 0, 1).astype(np.float32)


def dent(ctx: DefectContext, rng: np.random.Generator) -> np.ndarray:
    """A shallow impact: a smooth depression lit from one side (dark flank, bright flank)."""
    s = ctx.size
    rx = s * rng.uniform(0.035, 0.06)
    ry = rx * rng.uniform(0.6, 1.0)
    a = rng.uniform(0, math.pi)
    cx, cy = pick_point(rng, ctx.good.surface, rx + 1)
    y, x = pixel_grid(s)
    c, sn = math.cos(a), math.sin(a)
    u, v = (x - cx) * c + (y - cy) * sn, -(x - cx) * sn + (y - cy) * c
    d2 = (u / rx) ** 2 + (v / ry) ** 2
    depth = np.where(d2 < 1, (1 - d2) ** 2, 0.0)
    gy, gx = np.gradient(depth)
    light = rng.uniform(0, 2 * math.pi)
    slope = (gx * math.cos(light) + gy * math.sin(light)) * rx  # ~[-1.5, 1.5]
    k = rng.uniform(0.18, 0.3)
    factor = 1 + k * slope - 0.12 * depth
    factor = 1 + (factor - 1) * ctx.good.surface
    return np.clip(ctx.good.image * factor[..., None], 0, 1).astype(np.float32)


def stain(ctx: DefectContext, rng: np.random.Generator) -> np.ndarray:
    """A low-contrast, soft-edged, irregular blob (oil, dirt, water mark), slightly tinted."""
    s = ctx.size
    r = s * rng.uniform(0.055, 0.085)
    cx, cy = pick_point(rng, ctx.good.surface, r * 1.5)
    y, x = pixel_grid(s)
    blob = np.zeros((s, s), np.float32)
    for _ in range(int(rng.integers(3, 6))):  # a few overlapping lobes make an irregular outline
        ox, oy = rng.normal(0, 0.45 * r, 2)
        rr = r * rng.uniform(0.5, 0.8)
        blob += np.exp(-((x - cx - ox) ** 2 + (y - cy - oy) ** 2) / (2 * rr * rr))
    alpha = smoothstep(0.25, 0.9, blob / blob.max()) * ctx.good.surface
    channels = ctx.good.image.shape[2]
    tint = np.array([0.75, 0.95, 1.15])[:channels] if channels == 3 else np.ones(1)
    strength = rng.uniform(0.15, 0.25) * (1 if rng.random() < 0.75 else -0.8)  # mostly darker
    return np.clip(ctx.good.image * (1 - strength * alpha[..., None] * tint), 0, 1).astype(np.float32)


# -- logical defects --------------------------------------------------------------------------------
def missing_hole(ctx: DefectContext, rng: np.random.Generator) -> np.ndarray:
    """Washer: one of the six bolt holes was never drilled."""
    p = copy.copy(ctx.params)
    holes = list(p["holes"])
    holes.pop(int(rng.integers(len(holes))))
    p["holes"] = holes
    return ctx.rerender(p)


def missing_print(ctx: DefectContext, rng: np.random.Generator) -> np.ndarray:
    """Label: the logo or one icon was not printed."""
    p = copy.copy(ctx.params)
    optional = ["logo", *(e for e in p["elements"] if e.startswith("icon"))]
    gone = optional[int(rng.integers(len(optional)))]
    p["elements"] = [e for e in p["elements"] if e != gone]
    return ctx.rerender(p)


def extra_print(ctx: DefectContext, rng: np.random.Generator) -> np.ndarray:
    """Label: one icon was printed twice, the copy in the normally empty fourth slot."""
    p = copy.copy(ctx.params)
    shape = LABEL_ICONS[int(rng.integers(len(LABEL_ICONS)))]
    p["elements"] = [*p["elements"], "icon3"]
    p["icon_slots"] = {**p["icon_slots"], "icon3": 3}
    p["icon_shapes"] = {**p["icon_shapes"], "icon3": shape}
    return ctx.rerender(p)


def _tray_parts(ctx: DefectContext) -> dict[int, list]:
    return {slot: list(items) for slot, items in ctx.params["parts"].items()}


def tray_missing_part(ctx: DefectContext, rng: np.random.Generator) -> np.ndarray:
    """Tray: one compartment is empty - five parts instead of six."""
    p = copy.copy(ctx.params)
    parts = _tray_parts(ctx)
    parts[int(rng.integers(TRAY_SLOTS))] = []
    p["parts"] = parts
    return ctx.rerender(p)


def tray_extra_part(ctx: DefectContext, rng: np.random.Generator) -> np.ndarray:
    """Tray: a compartment holds a second part of its kind beside the first - seven parts."""
    p = copy.copy(ctx.params)
    parts = _tray_parts(ctx)
    slot = int(rng.integers(TRAY_SLOTS))
    kind, first = parts[slot][0]
    pose = tray_part_pose(rng, kind)
    # Beside the first part, inside the compartment: the two overlap at most a little.
    if kind == "nut":
        direction = rng.uniform(0, 2 * math.pi)
        pose["dx"], pose["dy"] = first["dx"] + 0.075 * math.cos(direction), first["dy"] + 0.065 * math.sin(direction)
    else:
        pose["dx"], pose["dy"] = first["dx"] + rng.uniform(-0.02, 0.02), first["dy"] + rng.choice([-1, 1]) * 0.06
        pose["angle"] = first["angle"] + rng.normal(0, 0.1)
    parts[slot] = parts[slot] + [(kind, pose)]
    p["parts"] = parts
    return ctx.rerender(p)


def tray_swapped_parts(ctx: DefectContext, rng: np.random.Generator) -> np.ndarray:
    """Tray: a nut and a bolt have exchanged compartments - right count, wrong places (the
    bolt points the way the others do)."""
    p = copy.copy(ctx.params)
    parts = _tray_parts(ctx)
    nut_row = p["nut_row"]
    nut_slot, bolt_slot = 3 * nut_row + int(rng.integers(3)), 3 * (1 - nut_row) + int(rng.integers(3))
    parts[nut_slot] = [("bolt", tray_part_pose(rng, "bolt", p["heading"]))]
    parts[bolt_slot] = [("nut", tray_part_pose(rng, "nut"))]
    p["parts"] = parts
    return ctx.rerender(p)


def tray_reversed_part(ctx: DefectContext, rng: np.random.Generator) -> np.ndarray:
    """Tray: one bolt points the other way - every part in its place, one turned round."""
    p = copy.copy(ctx.params)
    parts = _tray_parts(ctx)
    slot = 3 * (1 - p["nut_row"]) + int(rng.integers(3))
    kind, pose = parts[slot][0]
    parts[slot] = [(kind, {**pose, "angle": pose["angle"] + math.pi})]
    p["parts"] = parts
    return ctx.rerender(p)


DEFECTS: dict[str, DefectFn] = {
    "scratch": scratch,
    "thread": thread,
    "crack": crack,
    "hole": hole,
    "dent": dent,
    "stain": stain,
    "missing_hole": missing_hole,
    "missing_print": missing_print,
    "extra_print": extra_print,
    "missing_part": tray_missing_part,
    "extra_part": tray_extra_part,
    "swapped_parts": tray_swapped_parts,
    "reversed_part": tray_reversed_part,
}
