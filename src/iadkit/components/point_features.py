"""FPFH point descriptors (Rusu, Blodow & Beetz, ICRA 2009) with numpy / scipy, per pixel of a point map.

BTF (Horwitz & Hoshen, "Back to the Feature", 2022) describes each point of an MVTec 3D-AD
point map by its Fast Point Feature Histogram, computed with Open3D, and uses these 33-d
vectors as the 3D half of its memory bank. This module computes the same descriptors
without Open3D (which is a 400 MB wheel), on an organised H x W x 3 map, returning
H x W x 33 with zeros where the map has no point.

The descriptor, step by step
----------------------------
1. Normals: for each point, the covariance of its neighbours (the `normal_max_nn` nearest
   within `normal_radius`, itself included); the normal is the eigenvector of the smallest
   eigenvalue (PCA). Fewer than 3 neighbours: (0, 0, 1), as in Open3D.
2. Pair features of a point p1 (normal n1) and a neighbour p2 (n2), d = p2 - p1: the
   source of the Darboux frame is the point whose normal makes the smaller angle with the
   line p1p2 (if acos|n1.d| > acos|n2.d| the roles swap and d = -d; a difference below
   1e-9 rad counts as a tie and does not swap); then
   u = n1, v = (d x u) / |d x u|, w = u x v and
   f0 = atan2(w.n2, u.n2) (alpha), f1 = v.n2 (phi), f2 = u.d / |d| (theta); all zero when
   d = 0 or d is parallel to u.
3. SPFH(p): for each neighbour (the `max_nn` nearest within `radius`, p excluded), add
   100 / (number of neighbours) to bin floor(11 (f0 + pi) / (2 pi)) of the first 11 bins,
   floor(11 (f1 + 1) / 2) of the next 11 and floor(11 (f2 + 1) / 2) of the last 11
   (clamped to 0..10): three histograms that each sum to 100.
4. FPFH(p) = SPFH(p) + the average of the neighbours' SPFH weighted by 1 / |p - p_k|^2,
   each 11-bin block of that average rescaled to sum to 100; a point without neighbours
   gets zeros.

=====================  ==========================  ========================  ==========================
item                   paper (Rusu 2009)           Open3D 0.20 (BTF)         ours
=====================  ==========================  ========================  ==========================
neighbour weight       1 / distance                1 / distance^2            1 / distance^2 (default);
                                                                             ``distance_power=1``: paper
neighbour average      (1/k) sum w_k SPFH_k        per-block renormalised    as Open3D
                                                   to 100
bins                   11 per feature, 3 features  same                      same
normal orientation     (not specified)             unoriented (eigen-solver  towards the viewpoint
                                                   sign)                     (the camera, origin)
neighbourhoods         radius                      hybrid: max_nn nearest    as Open3D (scipy cKDTree;
                                                   within radius             points at exactly the
                                                                             radius are excluded;
                                                                             equidistant ones at the
                                                                             max_nn cut: lower index)
frame source           smaller angle to p1p2       strict comparison         ties within 1e-9 rad keep
                                                                             p1 (deterministic)
=====================  ==========================  ========================  ==========================

Orienting normals towards the camera makes the descriptor a function of the geometry
alone: rotating the cloud about the camera leaves it unchanged, whereas an unoriented
normal's sign (Open3D's) can flip between two views of one surface and change f0 and f2.
Defaults are BTF's: normals from 30 neighbours within 0.1, FPFH from 100 within 0.25, in
the map's units (BTF's voxel size 0.05 times 2 and 5).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

FPFH_BINS = 11
FPFH_DIM = 3 * FPFH_BINS
BTF_NORMAL_RADIUS = 0.1
BTF_NORMAL_MAX_NN = 30
BTF_FEATURE_RADIUS = 0.25
BTF_FEATURE_MAX_NN = 100
SWAP_TOLERANCE = 1e-9  # radians; see pair_features
_TIE_MARGIN = 16  # extra candidates fetched to order equidistant neighbours at the max_nn cut
_CHUNK = 4096  # points per vectorised block (chunk x max_nn pair features at a time)


def _check_points(points: np.ndarray, what: str = "points") -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"{what} must be an N x 3 array, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError(f"{what} contain NaN or infinite coordinates")
    return pts


def neighbours(
    points: np.ndarray, radius: float, max_nn: int, tree: cKDTree | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The `max_nn` nearest points within `radius` of each point, itself included.

    Parameters
    ----------
    points
        N x 3 points.
    radius, max_nn
        The neighbourhood (Open3D's ``KDTreeSearchParamHybrid``).
    tree
        A prebuilt ``cKDTree`` of `points`, to reuse.

    Returns (indices [N, max_nn], squared distances [N, max_nn]) sorted by distance; absent
    neighbours have index N and distance inf. Distances equal to within 1e-9 of the radius
    squared count as equal and are ordered by index, so that which of several equidistant
    points make the cut does not depend on rounding (on an organised grid whole rings of
    neighbours are equidistant; a rotated copy of the cloud then keeps the same neighbours).
    """
    if radius <= 0 or max_nn < 1:
        raise ValueError(f"radius must be > 0 and max_nn >= 1, got {radius} and {max_nn}")
    pts = np.asarray(points, dtype=np.float64)
    n = len(pts)
    tree = tree if tree is not None else cKDTree(pts)
    k = min(int(max_nn) + _TIE_MARGIN, n)  # a few more, to order the ties at the cut
    dist, idx = tree.query(pts, k=k, distance_upper_bound=radius)
    if k == 1:
        dist, idx = dist[:, None], idx[:, None]
    d2 = dist * dist
    quantum = radius * radius * 1e-9
    level = np.where(np.isfinite(d2), np.floor(d2 / quantum), np.inf)
    order = _row_lexsort(level, idx)
    idx = np.take_along_axis(idx, order, axis=1)[:, :max_nn]
    d2 = np.take_along_axis(d2, order, axis=1)[:, :max_nn]
    if idx.shape[1] < max_nn:  # fewer points than max_nn in the whole cloud
        pad = max_nn - idx.shape[1]
        idx = np.concatenate([idx, np.full((n, pad), n)], axis=1)
        d2 = np.concatenate([d2, np.full((n, pad), np.inf)], axis=1)
    return idx, d2


def _row_lexsort(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Per-row argsort by (primary, secondary), both [N, k]."""
    order = np.argsort(secondary, axis=1, kind="stable")
    p = np.take_along_axis(primary, order, axis=1)
    return np.take_along_axis(order, np.argsort(p, axis=1, kind="stable"), axis=1)


def estimate_normals(
    points: np.ndarray,
    *,
    radius: float = BTF_NORMAL_RADIUS,
    max_nn: int = BTF_NORMAL_MAX_NN,
    viewpoint: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Unit normals by PCA of each point's neighbourhood, oriented towards `viewpoint`.

    Parameters
    ----------
    points
        N x 3 points.
    radius, max_nn
        Neighbourhood: the `max_nn` nearest points within `radius` (the point included).
    viewpoint
        The sensor position; each normal is flipped to face it (n . (viewpoint - p) >= 0).

    Returns
    -------
    numpy.ndarray
        N x 3 float64 unit normals; (0, 0, 1) (then oriented) where fewer than 3 neighbours.
    """
    pts = _check_points(points)
    n = len(pts)
    normals = np.tile(np.array([0.0, 0.0, 1.0]), (n, 1))
    if n == 0:
        return normals
    idx, _ = neighbours(pts, radius, max_nn)
    padded = np.concatenate([pts, np.zeros((1, 3))])
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, min(lo + _CHUNK, n))
        nb = idx[sl]
        valid = nb < n
        count = valid.sum(axis=1)
        q = padded[nb]  # chunk x k x 3 (absent neighbours are zeros, masked below)
        w = valid[..., None].astype(np.float64)
        mean = (q * w).sum(axis=1) / np.maximum(count, 1)[:, None]
        centred = (q - mean[:, None, :]) * w
        cov = np.einsum("nki,nkj->nij", centred, centred) / np.maximum(count, 1)[:, None, None]
        _, vecs = np.linalg.eigh(cov)
        est = vecs[:, :, 0]  # eigenvector of the smallest eigenvalue
        enough = count >= 3
        normals[sl][enough] = est[enough]
    view = np.asarray(viewpoint, dtype=np.float64)
    flip = np.einsum("ij,ij->i", normals, view - pts) < 0
    normals[flip] *= -1.0
    return normals


def pair_features(p1: np.ndarray, n1: np.ndarray, p2: np.ndarray, n2: np.ndarray) -> np.ndarray:
    """The Darboux-frame features (f0 = alpha, f1 = phi, f2 = theta) of point pairs.

    Parameters
    ----------
    p1, n1, p2, n2
        [..., 3] points and unit normals.

    Returns
    -------
    numpy.ndarray
        [..., 3]: f0 in [-pi, pi], f1 and f2 in [-1, 1]; zeros for coincident points or a
        line parallel to the source normal (Open3D's ``ComputePairFeatures``).
    """
    d = p2 - p1
    dist = np.linalg.norm(d, axis=-1)
    safe = np.where(dist > 0, dist, 1.0)
    a1 = np.einsum("...i,...i->...", n1, d) / safe
    a2 = np.einsum("...i,...i->...", n2, d) / safe
    # Open3D swaps when acos|a1| > acos|a2|. Two points with the same neighbourhood get the
    # same normal up to rounding, so |a1| = |a2| is common and the strict test would follow
    # the rounding noise (flipping f0 and f2); a near-tie keeps p1 as the source.
    swap = np.arccos(np.clip(np.abs(a1), 0.0, 1.0)) > np.arccos(np.clip(np.abs(a2), 0.0, 1.0)) + SWAP_TOLERANCE
    s = swap[..., None]
    u = np.where(s, n2, n1)
    other = np.where(s, n1, n2)
    d = np.where(s, -d, d)
    f2 = np.where(swap, -a2, a1)
    v = np.cross(d, u)
    v_norm = np.linalg.norm(v, axis=-1)
    ok = (dist > 0) & (v_norm > 0)
    v = v / np.where(v_norm > 0, v_norm, 1.0)[..., None]
    w = np.cross(u, v)
    f1 = np.einsum("...i,...i->...", v, other)
    f0 = np.arctan2(np.einsum("...i,...i->...", w, other), np.einsum("...i,...i->...", u, other))
    return np.where(ok[..., None], np.stack([f0, f1, f2], axis=-1), 0.0)


def _bins(features: np.ndarray) -> np.ndarray:
    """[..., 3] pair features -> [..., 3] bin indices 0..32 (one per 11-bin block)."""
    b0 = np.floor(FPFH_BINS * (features[..., 0] + np.pi) / (2.0 * np.pi))
    b1 = np.floor(FPFH_BINS * (features[..., 1] + 1.0) * 0.5)
    b2 = np.floor(FPFH_BINS * (features[..., 2] + 1.0) * 0.5)
    b = np.clip(np.stack([b0, b1, b2], axis=-1), 0, FPFH_BINS - 1).astype(np.int64)
    return b + np.array([0, FPFH_BINS, 2 * FPFH_BINS])


def _others(idx: np.ndarray, n: int) -> np.ndarray:
    """Neighbour table with each point's own entry (and absent ones) marked absent (= n)."""
    out = idx.copy()
    out[out == np.arange(len(idx))[:, None]] = n
    return out


def spfh(points: np.ndarray, normals: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Simplified point feature histograms [N, 33] from a neighbour table.

    Parameters
    ----------
    points, normals
        N x 3 points and unit normals.
    idx
        Neighbour table from :func:`neighbours` (the point's own entry is skipped).
    """
    n = len(points)
    others = _others(idx, n)
    out = np.zeros((n, FPFH_DIM))
    pad_p = np.concatenate([points, np.zeros((1, 3))])
    pad_n = np.concatenate([normals, np.zeros((1, 3))])
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, min(lo + _CHUNK, n))
        nb = others[sl]
        valid = nb < n
        count = valid.sum(axis=1)
        feats = pair_features(points[sl, None, :], normals[sl, None, :], pad_p[nb], pad_n[nb])
        bins = _bins(feats)  # chunk x k x 3
        incr = np.where(valid, 100.0 / np.maximum(count, 1)[:, None], 0.0)
        m = sl.stop - sl.start
        flat = (np.arange(m)[:, None, None] * FPFH_DIM + bins).ravel()
        weights = np.broadcast_to(incr[..., None], bins.shape).ravel()
        out[sl] = np.bincount(flat, weights=weights, minlength=m * FPFH_DIM).reshape(m, FPFH_DIM)
    return out


def fpfh(
    points: np.ndarray,
    normals: np.ndarray,
    *,
    radius: float = BTF_FEATURE_RADIUS,
    max_nn: int = BTF_FEATURE_MAX_NN,
    distance_power: float = 2.0,
) -> np.ndarray:
    """Fast point feature histograms [N, 33] of an unorganised cloud.

    Parameters
    ----------
    points, normals
        N x 3 points and their unit normals (:func:`estimate_normals`).
    radius, max_nn
        Neighbourhood of both the SPFH and the weighting: the `max_nn` nearest within
        `radius` (the point itself counts towards `max_nn`, as in Open3D).
    distance_power
        Neighbour weight 1 / distance ** power: 2 as Open3D and PCL compute it, 1 as the
        paper writes it.
    """
    pts = _check_points(points)
    nrm = _check_points(normals, "normals")
    if nrm.shape != pts.shape:
        raise ValueError(f"normals {nrm.shape} must match points {pts.shape}")
    n = len(pts)
    if n == 0:
        return np.zeros((0, FPFH_DIM))
    idx, d2 = neighbours(pts, radius, max_nn)
    hist = spfh(pts, nrm, idx)
    others = _others(idx, n)
    out = np.zeros((n, FPFH_DIM))
    pad_h = np.concatenate([hist, np.zeros((1, FPFH_DIM))])
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, min(lo + _CHUNK, n))
        nb = others[sl]
        dist2 = d2[sl]
        use = (nb < n) & (dist2 > 0)
        weight = np.where(use, 1.0 / np.where(use, dist2, 1.0) ** (distance_power / 2.0), 0.0)
        acc = np.einsum("nk,nkd->nd", weight, pad_h[nb])  # chunk x 33
        block_sum = acc.reshape(-1, 3, FPFH_BINS).sum(axis=2)
        scale = np.where(block_sum != 0, 100.0 / np.where(block_sum != 0, block_sum, 1.0), 0.0)
        acc = (acc.reshape(-1, 3, FPFH_BINS) * scale[:, :, None]).reshape(-1, FPFH_DIM)
        has_neighbours = (nb < n).any(axis=1, keepdims=True)  # chunk x 1
        out[sl] = np.where(has_neighbours, acc + hist[sl], 0.0)
    return out


def fpfh_map(
    xyz: np.ndarray,
    *,
    normal_radius: float = BTF_NORMAL_RADIUS,
    normal_max_nn: int = BTF_NORMAL_MAX_NN,
    feature_radius: float = BTF_FEATURE_RADIUS,
    feature_max_nn: int = BTF_FEATURE_MAX_NN,
    viewpoint: tuple[float, float, float] = (0.0, 0.0, 0.0),
    distance_power: float = 2.0,
) -> np.ndarray:
    """Per-pixel FPFH of an organised point map: H x W x 3 -> H x W x 33 float32.

    Parameters
    ----------
    xyz
        Organised point map; (0, 0, 0) marks a missing point (MVTec 3D-AD's convention),
        whose descriptor is all zeros. Only the valid points form the cloud.
    normal_radius, normal_max_nn
        Neighbourhood of the PCA normals (BTF: 0.1, 30).
    feature_radius, feature_max_nn
        Neighbourhood of the histograms (BTF: 0.25, 100).
    viewpoint
        Where the sensor is, for orienting the normals (camera coordinates: the origin).
    distance_power
        See :func:`fpfh`.
    """
    arr = np.asarray(xyz)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"xyz must be an H x W x 3 point map, got shape {arr.shape}")
    valid = np.any(arr != 0, axis=2)
    out = np.zeros((*arr.shape[:2], FPFH_DIM), dtype=np.float32)
    pts = arr[valid].astype(np.float64)
    if len(pts) == 0:
        return out
    normals = estimate_normals(pts, radius=normal_radius, max_nn=normal_max_nn, viewpoint=viewpoint)
    feats = fpfh(pts, normals, radius=feature_radius, max_nn=feature_max_nn, distance_power=distance_power)
    out[valid] = feats.astype(np.float32)
    return out


__all__ = [
    "FPFH_DIM",
    "estimate_normals",
    "fpfh",
    "fpfh_map",
    "neighbours",
    "pair_features",
    "spfh",
]
