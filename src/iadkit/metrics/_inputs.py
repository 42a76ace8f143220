"""Turning what callers pass (numpy arrays, torch tensors, lists) into validated numpy arrays.

Metrics accept both numpy and torch because detectors return tensors while loaders and
users often hold arrays. Everything is converted once here, without copying when the input
is already a CPU array of a usable dtype, because pixel-level inputs are tens of millions of
values and every silent copy costs hundreds of megabytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from iadkit.errors import MetricUndefinedError

ArrayLike = Any  # np.ndarray | torch.Tensor | Sequence[float] — torch stays an optional import here.


def to_numpy(x: ArrayLike) -> np.ndarray:
    """A numpy view of `x` (torch tensors are detached and moved to the CPU; bfloat16/float16
    become float32 because numpy has no bfloat16 and float16 sorting is slow)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor, without importing torch
        t = x.detach().cpu()
        if t.dtype.is_floating_point and t.element_size() < 4:
            t = t.float()
        return t.numpy()
    arr = np.asarray(x)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    return arr


def score_dtype(*arrays: np.ndarray) -> np.dtype:
    """The float dtype scores are compared in: float32 stays float32 (half the memory of
    float64 and exactly what detectors output), anything wider or integer becomes float64 so
    no two distinct scores are merged by rounding."""
    dt = np.result_type(*[a.dtype for a in arrays])
    if dt == np.float32:
        return np.dtype(np.float32)
    if dt.kind in "fiub":
        return np.dtype(np.float64)
    raise TypeError(f"anomaly scores must be real numbers, got dtype {dt}")


def binary_labels(y: ArrayLike, what: str) -> np.ndarray:
    """Labels as a bool array (True = anomalous / defect).

    bool arrays are used as is; numeric arrays must hold only 0 and 1. We do not threshold
    other values silently: a mask resized with bilinear interpolation (values like 0.5) or an
    unlabelled image (-1) is a bug upstream that should be fixed there, not hidden here.
    """
    arr = to_numpy(y)
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{what} must be bool or 0/1 numbers, got dtype {arr.dtype}")
    is_one = arr == 1
    if not np.all(is_one | (arr == 0)):
        bad = np.unique(arr[~(is_one | (arr == 0))])[:5]
        hint = ""
        if np.any(bad == -1):
            hint = " (-1 marks an unlabelled image: drop unlabelled images before computing metrics)"
        elif np.any(bad == 255):
            hint = " (0/255 masks: pass `mask > 0`)"
        else:
            hint = " (a mask resized with interpolation? resize masks with nearest-neighbour, or pass `mask > 0.5`)"
        raise ValueError(f"{what} must contain only 0 (good) and 1 (anomalous), found {bad.tolist()}{hint}")
    return is_one


def image_inputs(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D (bool labels, float scores) of equal length."""
    y = binary_labels(labels, "image labels")
    s = to_numpy(scores)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(
            f"image labels and scores must be 1-D (one value per image), got shapes {y.shape} and {s.shape}"
        )
    if y.shape != s.shape:
        raise ValueError(f"image labels and scores differ in length: {y.shape[0]} labels, {s.shape[0]} scores")
    s = s.astype(score_dtype(s), copy=False)
    if np.isnan(s).any():
        idx = np.flatnonzero(np.isnan(s))[:5].tolist()
        raise MetricUndefinedError(f"image scores contain NaN (at indices {idx}); fix the detector's output first")
    return y, s


def _as_image_list(x: ArrayLike, what: str) -> list[np.ndarray]:
    """One 2-D array per image, from [N,H,W], [N,1,H,W], [H,W] or a sequence of [H,W]."""
    if isinstance(x, (list, tuple)):
        out: list[np.ndarray] = []
        for i, item in enumerate(x):
            a = to_numpy(item)
            if a.ndim == 3 and a.shape[0] == 1:
                a = a[0]
            if a.ndim != 2:
                raise ValueError(f"{what}[{i}] must be 2-D [H,W], got shape {a.shape}")
            out.append(a)
        return out
    a = to_numpy(x)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim == 2:
        return [a]
    if a.ndim != 3:
        raise ValueError(f"{what} must be [N,H,W], [N,1,H,W], [H,W] or a list of [H,W] arrays, got shape {a.shape}")
    return list(a)


def pixel_inputs(maps: ArrayLike, masks: ArrayLike) -> tuple[list[np.ndarray], list[np.ndarray], np.dtype]:
    """Per-image (maps, bool masks) with matching shapes, plus the score dtype to use."""
    map_list = _as_image_list(maps, "anomaly maps")
    mask_list = _as_image_list(masks, "masks")
    if len(map_list) != len(mask_list):
        raise ValueError(f"got {len(map_list)} anomaly maps but {len(mask_list)} masks; pass one mask per map")
    if not map_list:
        raise MetricUndefinedError("no anomaly maps given: pixel metrics need at least one test image")
    bool_masks = []
    for i, (m, g) in enumerate(zip(map_list, mask_list)):
        if m.shape != g.shape:
            raise ValueError(
                f"anomaly map {i} has shape {m.shape} but its mask has shape {g.shape}; "
                "resize maps to the mask resolution (or masks with nearest-neighbour) first"
            )
        bool_masks.append(binary_labels(g, f"mask {i}"))
    dtype = score_dtype(*map_list)
    return map_list, bool_masks, dtype


def check_no_nan_sorted(sorted_arrays: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> None:
    """NaN sorts last, so the last element of each sorted array reveals it for free; only
    then do we pay to find which image holds it, for the error message."""
    if any(a.size and np.isnan(a[-1]) for a in sorted_arrays):
        bad = [i for i, m in enumerate(maps) if np.isnan(m).any()][:5]
        raise MetricUndefinedError(
            f"anomaly maps contain NaN (images {bad}); fix the detector's output before computing metrics"
        )


def iter_chunks(n: int, size: int) -> Iterator[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))
