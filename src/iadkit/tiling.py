"""Tiling: score a high-resolution part at the model's resolution, tile by tile.

A 2048 x 2048 photo resized to a 256-px model input loses 8x in each direction: a scratch of
a few pixels vanishes in the resize. Instead the image is cut into overlapping square tiles
of `tile` pixels (ideally the model's input size, so no tile is resized at all), each tile is
scored by the model as an image of its own, and:

* the image score is the maximum of the tiles' scores (a part is as bad as its worst tile);
* the anomaly map is stitched back at the image's full resolution, each tile's map weighted
  by a smooth window (a sine window: largest in the tile's centre, small but positive at its
  edges) and normalised by the summed weights. Where tiles overlap, the tile that sees a
  pixel near its centre (with context on all sides, away from the network's zero padding)
  dominates; a pixel covered by one tile only keeps that tile's value exactly.

Tiles start every ``stride = round(tile * (1 - overlap))`` pixels; the last tile of a row or
column is aligned with the image's edge, so every pixel is covered and no tile is padded.
Along a side not longer than `tile` the tile spans the whole side (an image that fits in one
tile is one tile: the whole image, as without tiling).

A model fitted with tiles (``Model.fit(..., tile=256)``) learns from the tiles of good
images, stores its `Tiling`, and then predicts (and calibrates its threshold) with the same
tiles; the exported runtime and the server read it from the model. This module is numpy only,
shared by `iadkit.Model` and the torch-free `iadkit.runtime`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from iadkit.errors import InvalidParameterError

Box = tuple[int, int, int, int]  # top, left, bottom, right (bottom/right exclusive)
DEFAULT_OVERLAP = 0.25
MIN_TILE = 16


@dataclass(frozen=True)
class Tiling:
    """How an image larger than the model's input is cut into tiles.

    Parameters
    ----------
    tile : int
        Side of a square tile, in pixels of the original image (the model's input size avoids
        resizing the tiles; another size is resized to the input like a whole image).
    overlap : float
        Share of a tile shared with its neighbour, in [0, 1) (0.25: tiles start every 3/4 tile).
    """

    tile: int
    overlap: float = DEFAULT_OVERLAP

    def __post_init__(self) -> None:
        if isinstance(self.tile, bool) or not isinstance(self.tile, (int, np.integer)) or self.tile < MIN_TILE:
            raise InvalidParameterError(f"tile must be a whole number of pixels >= {MIN_TILE}, got {self.tile!r}")
        if (
            isinstance(self.overlap, bool)
            or not isinstance(self.overlap, (int, float))
            or not 0.0 <= self.overlap < 1.0
        ):
            raise InvalidParameterError(f"overlap must be a share of the tile in [0, 1), got {self.overlap!r}")
        object.__setattr__(self, "tile", int(self.tile))
        object.__setattr__(self, "overlap", float(self.overlap))

    @property
    def stride(self) -> int:
        return max(1, round(self.tile * (1.0 - self.overlap)))

    def applies(self, shape: Sequence[int]) -> bool:
        """Whether an image of `shape` (h, w, ...) is cut into more than one tile."""
        return int(shape[0]) > self.tile or int(shape[1]) > self.tile

    def boxes(self, shape: Sequence[int]) -> list[Box]:
        """The tiles of an image of `shape`, row by row: (top, left, bottom, right)."""
        h, w = int(shape[0]), int(shape[1])
        rows = _starts(h, self.tile, self.stride)
        cols = _starts(w, self.tile, self.stride)
        th, tw = min(h, self.tile), min(w, self.tile)
        return [(top, left, top + th, left + tw) for top in rows for left in cols]

    def to_dict(self) -> dict[str, Any]:
        return {"tile": self.tile, "overlap": self.overlap}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tiling:
        return cls(tile=int(d["tile"]), overlap=float(d.get("overlap", DEFAULT_OVERLAP)))


def resolve_tiling(stored: Tiling | None, tile: int | None, overlap: float | None) -> Tiling | None:
    """The tiling a predict call uses: `tile` None keeps the model's stored tiling (if any),
    0 turns tiling off, a size asks for tiles of that size (`overlap` default: the stored one,
    else 0.25)."""
    if tile is None:
        if overlap is not None and stored is not None:
            return Tiling(stored.tile, overlap)
        return stored
    if isinstance(tile, (int, np.integer)) and not isinstance(tile, bool) and tile == 0:
        return None
    if overlap is None:
        overlap = stored.overlap if stored is not None else DEFAULT_OVERLAP
    return Tiling(tile, overlap)


def _starts(n: int, tile: int, stride: int) -> list[int]:
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, stride))
    starts.append(n - tile)  # the last tile ends at the edge
    return starts


@functools.lru_cache(maxsize=16)
def blend_window(h: int, w: int) -> np.ndarray:
    """[h, w] float32 weights: the outer product of sine windows ``sin(pi * (i + 0.5) / n)``,
    1 in the centre, small but positive at the edges."""

    def sine(n: int) -> np.ndarray:
        return np.sin(np.pi * (np.arange(n) + 0.5) / n)

    return np.outer(sine(h), sine(w)).astype(np.float32)


def cut(image: np.ndarray, boxes: Sequence[Box]) -> list[np.ndarray]:
    """The tiles of an HxW(xC) image (views, no copies)."""
    return [image[top:bottom, left:right] for top, left, bottom, right in boxes]


def stitch(maps: Sequence[np.ndarray], boxes: Sequence[Box], shape: Sequence[int]) -> np.ndarray:
    """One [h, w] map from the tiles' maps (each at its box's size), window-weighted."""
    h, w = int(shape[0]), int(shape[1])
    total = np.zeros((h, w), np.float64)
    weight = np.zeros((h, w), np.float64)
    for amap, (top, left, bottom, right) in zip(maps, boxes):
        win = blend_window(bottom - top, right - left)
        total[top:bottom, left:right] += win * amap
        weight[top:bottom, left:right] += win
    return (total / weight).astype(np.float32)


def predict_tiled(
    image: np.ndarray,
    tiling: Tiling,
    score: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray | None]],
    *,
    batch_size: int = 16,
) -> tuple[float, np.ndarray | None]:
    """(image score, full-resolution map or None) of one image, tile by tile.

    `score(tiles)` scores a list of image arrays and returns (scores [n], maps [n, H, W] at
    the model's input size, or None for image-level methods). Maps are resized back to each
    tile's size (bilinear, as torch's antialiased resize) before stitching.
    """
    from iadkit.data.pixels import resize_bilinear_antialias

    boxes = tiling.boxes(image.shape)
    scores: list[np.ndarray] = []
    tile_maps: list[np.ndarray] = []
    has_maps = True
    for start in range(0, len(boxes), batch_size):
        part = boxes[start : start + batch_size]
        s, m = score(cut(image, part))
        scores.append(np.asarray(s, dtype=np.float64))
        if m is None:
            has_maps = False
            continue
        for amap, (top, left, bottom, right) in zip(m, part):
            amap = np.asarray(amap, dtype=np.float32)
            if amap.shape != (bottom - top, right - left):
                amap = resize_bilinear_antialias(amap, (bottom - top, right - left))
            tile_maps.append(amap)
    image_score = float(np.concatenate(scores).max())
    if not has_maps:
        return image_score, None
    return image_score, stitch(tile_maps, boxes, image.shape)


__all__ = ["DEFAULT_OVERLAP", "Tiling", "blend_window", "cut", "predict_tiled", "resolve_tiling", "stitch"]
