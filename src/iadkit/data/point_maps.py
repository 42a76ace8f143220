"""Organised point maps (MVTec 3D-AD ``xyz/*.tiff``): reading, background-plane removal, samples.

MVTec 3D-AD stores, beside each RGB image ``<split>/<defect>/rgb/<stem>.png``, an organised
point cloud ``<split>/<defect>/xyz/<stem>.tiff``: a float32 H x W x 3 array of (x, y, z)
camera coordinates, pixel-aligned with the RGB image, with (0, 0, 0) where the sensor saw
no point. Units are those of the file; the thresholds BTF uses on it (4-6 thousandths)
imply metres, and the synthetic 3D generator writes metres too.

Plane removal is the preprocessing of BTF (Horwitz & Hoshen 2022, ``utils/preprocessing.py``
of their code, reused by M3DM): the objects lie on a flat background, which would dominate
any point feature, so a plane is fitted by RANSAC to the points of a 10-pixel border of the
map (where only the background is seen) and every point closer to it than 5 mm is zeroed.

======================  ==============================  ======================================
step                    BTF reference code              ours
======================  ==============================  ======================================
border points           10-px strips, non-zero points   same (a point is missing when all
                        (any zero coordinate = missing) three coordinates are 0)
plane fit               Open3D ``segment_plane``:       RANSAC: least-squares plane through
                        threshold 0.004, ransac_n 50,   `sample_size` (50) random points,
                        1000 iterations                 1000 iterations, threshold 0.004,
                                                        most inliers wins (then lower mean
                                                        distance); final least-squares refit
                                                        on its inliers; seeded
removal                 |plane . (x, 1)| < 0.005 -> 0   same
largest DBSCAN cluster  eps 0.006, 30 points            not done (see the docstring of
                                                        :func:`remove_background_plane`)
======================  ==============================  ======================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iadkit.errors import DatasetLayoutError, ImageReadError
from iadkit.types import Sample

XYZ_EXTENSIONS = (".tiff", ".tif")
BTF_BORDER = 10
BTF_RANSAC_THRESHOLD = 0.004
BTF_RANSAC_SAMPLE = 50
BTF_RANSAC_ITERATIONS = 1000
BTF_PLANE_DISTANCE = 0.005


def read_xyz(path: str | Path, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read an organised point map: H x W x 3 float32, (0, 0, 0) = no point.

    Parameters
    ----------
    path
        The ``xyz/<stem>.tiff`` file.
    expected_shape
        (H, W) of the RGB image the map must be aligned with; None skips the check.

    NaN points (another common "no point" marker) become (0, 0, 0). Raises ImageReadError
    naming the file for: a missing or unreadable file, a shape other than H x W x 3, a
    non-float sample type, infinite values, or a size different from `expected_shape`.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: point map not found (MVTec 3D-AD keeps one xyz/<stem>.tiff per rgb/<stem>.png)")
    import tifffile

    try:
        arr = tifffile.imread(p)
    except Exception as exc:  # truncated strips, not a TIFF, bad compression, ...
        raise ImageReadError(f"{p}: cannot read the point map as TIFF ({type(exc).__name__}: {exc})") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        hint = " (channels first? MVTec 3D-AD stores H x W x 3)" if arr.ndim == 3 and arr.shape[0] == 3 else ""
        raise ImageReadError(f"{p}: a point map must be an H x W x 3 array of (x, y, z), got shape {arr.shape}{hint}")
    if arr.dtype.kind != "f":
        raise ImageReadError(f"{p}: a point map holds float coordinates, got dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float32)
    if np.isinf(arr).any():
        raise ImageReadError(f"{p}: the point map contains infinite coordinates")
    nan = np.isnan(arr).any(axis=2)
    if nan.any():
        arr = arr.copy()
        arr[nan] = 0.0
    if expected_shape is not None and tuple(arr.shape[:2]) != tuple(expected_shape):
        raise ImageReadError(
            f"{p}: point map is {arr.shape[1]}x{arr.shape[0]} (WxH) but its RGB image is "
            f"{expected_shape[1]}x{expected_shape[0]}; the two must be pixel-aligned"
        )
    return np.ascontiguousarray(arr)


def valid_points(xyz: np.ndarray) -> np.ndarray:
    """H x W bool: True where the map holds a point (not all three coordinates zero)."""
    return np.any(xyz != 0, axis=-1)


def _plane_through(points: np.ndarray) -> np.ndarray:
    """Least-squares planes through point sets [..., n, 3] -> [..., 4] (unit normal, offset)."""
    centre = points.mean(axis=-2)
    _, _, vt = np.linalg.svd(points - centre[..., None, :], full_matrices=False)
    normal = vt[..., -1, :]
    offset = -np.einsum("...i,...i->...", normal, centre)
    return np.concatenate([normal, offset[..., None]], axis=-1)


def fit_plane_ransac(
    points: np.ndarray,
    *,
    threshold: float = BTF_RANSAC_THRESHOLD,
    sample_size: int = BTF_RANSAC_SAMPLE,
    iterations: int = BTF_RANSAC_ITERATIONS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """RANSAC plane fit: (plane [a, b, c, d] with unit normal, inlier mask [N]).

    Parameters
    ----------
    points
        N x 3 points.
    threshold
        Inlier distance to a candidate plane.
    sample_size
        Points per candidate (3 is classic RANSAC; BTF passes 50 to Open3D).
    iterations
        Number of candidates.
    seed
        Seed of the candidate draws (the result is deterministic).
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must be N x 3, got shape {pts.shape}")
    if sample_size < 3 or iterations < 1:
        raise ValueError(f"sample_size must be >= 3 and iterations >= 1, got {sample_size} and {iterations}")
    if len(pts) < sample_size:
        raise ValueError(f"a plane fit needs at least {sample_size} points, got {len(pts)}")
    rng = np.random.default_rng(seed)
    best, best_key = None, (-1, 0.0)
    batch = 64  # candidates evaluated together: an N x 64 distance matrix
    for start in range(0, iterations, batch):
        b = min(batch, iterations - start)
        idx = np.stack([rng.choice(len(pts), sample_size, replace=False) for _ in range(b)])
        planes = _plane_through(pts[idx])  # b x 4
        dist = np.abs(pts @ planes[:, :3].T + planes[:, 3])  # N x b
        inside = dist < threshold
        counts = inside.sum(axis=0)
        mean_dist = np.where(counts > 0, (dist * inside).sum(axis=0) / np.maximum(counts, 1), np.inf)
        for j in range(b):
            key = (int(counts[j]), -float(mean_dist[j]))
            if key > best_key:
                best, best_key = planes[j], key
    assert best is not None
    inliers = np.abs(pts @ best[:3] + best[3]) < threshold
    if inliers.sum() >= 3:  # refine on the consensus set
        best = _plane_through(pts[inliers])
        inliers = np.abs(pts @ best[:3] + best[3]) < threshold
    return best, inliers


def border_points(xyz: np.ndarray, border: int = BTF_BORDER) -> np.ndarray:
    """The valid points of the `border`-pixel frame of an organised map (N x 3).

    Parameters
    ----------
    xyz
        H x W x 3 point map.
    border
        Width of the frame in pixels (BTF: 10).
    """
    h, w = xyz.shape[:2]
    frame = np.zeros((h, w), dtype=bool)
    frame[:border], frame[-border:], frame[:, :border], frame[:, -border:] = True, True, True, True
    return xyz[frame & valid_points(xyz)]


def fit_background_plane(
    xyz: np.ndarray,
    *,
    border: int = BTF_BORDER,
    threshold: float = BTF_RANSAC_THRESHOLD,
    sample_size: int = BTF_RANSAC_SAMPLE,
    iterations: int = BTF_RANSAC_ITERATIONS,
    seed: int = 0,
) -> np.ndarray:
    """The background plane [a, b, c, d] (unit normal), fitted by RANSAC to the map's border.

    Parameters
    ----------
    xyz
        H x W x 3 point map whose border shows only the background.
    border
        Frame width in pixels.
    threshold, sample_size, iterations, seed
        RANSAC settings (:func:`fit_plane_ransac`); the defaults are BTF's.
    """
    pts = border_points(xyz, border)
    if len(pts) < sample_size:
        raise ValueError(
            f"only {len(pts)} valid points in the {border}-pixel border of the point map; the background-plane "
            f"fit needs at least {sample_size} (is the object touching the image border?)"
        )
    plane, _ = fit_plane_ransac(pts, threshold=threshold, sample_size=sample_size, iterations=iterations, seed=seed)
    return plane


def remove_background_plane(
    xyz: np.ndarray,
    *,
    distance: float = BTF_PLANE_DISTANCE,
    border: int = BTF_BORDER,
    threshold: float = BTF_RANSAC_THRESHOLD,
    sample_size: int = BTF_RANSAC_SAMPLE,
    iterations: int = BTF_RANSAC_ITERATIONS,
    seed: int = 0,
) -> np.ndarray:
    """A copy of `xyz` with the points within `distance` of the background plane zeroed.

    Parameters
    ----------
    xyz
        H x W x 3 point map.
    distance
        Points closer than this to the plane are removed (BTF: 0.005).
    border, threshold, sample_size, iterations, seed
        The plane fit (:func:`fit_background_plane`).

    The defaults are BTF's (metres). BTF then keeps only the largest DBSCAN cluster
    (eps 0.006, 30 points) to drop stray points; that step is not done here - on an
    800 x 800 map a 6 mm ball holds thousands of points, too slow without a compiled
    library - so isolated specks off the plane remain.
    """
    plane = fit_background_plane(
        xyz, border=border, threshold=threshold, sample_size=sample_size, iterations=iterations, seed=seed
    )
    out = np.array(xyz, dtype=np.float32, copy=True)
    valid = valid_points(out)
    dist = np.abs(out.astype(np.float64) @ plane[:3] + plane[3])
    out[valid & (dist < distance)] = 0.0
    return out


@dataclass(frozen=True)
class PointMapSample(Sample):
    """An MVTec 3D-AD image: a `Sample` with its pixel-aligned point map.

    Parameters
    ----------
    (those of `Sample`, then:)
    xyz_path
        The ``xyz/<stem>.tiff`` file; None when the dataset copy has no point maps.
    remove_plane
        Whether :meth:`load_xyz` removes the background plane (BTF's preprocessing).
    xyz
        An in-memory H x W x 3 point map (arrays, tests), used instead of `xyz_path`.
    """

    xyz_path: str | None = None
    remove_plane: bool = False
    xyz: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def has_xyz(self) -> bool:
        return self.xyz_path is not None or self.xyz is not None

    def _rgb_shape(self) -> tuple[int, int]:
        if self.image is not None:
            h, w = self.image.shape[:2]
            return h, w
        from iadkit.data.io import image_shape

        return image_shape(self.path)

    def load_xyz(self) -> np.ndarray:
        """H x W x 3 float32 point map aligned with the image; (0, 0, 0) = no point."""
        if self.xyz is not None:
            xyz = _checked_array(self.xyz, self.path, self._rgb_shape())
            return remove_background_plane(xyz) if self.remove_plane else xyz
        if self.xyz_path is None:
            raise DatasetLayoutError(
                f"{self.path}: this sample has no point map (no xyz/ folder beside its rgb/ folder); "
                "3D methods need MVTec 3D-AD's xyz/*.tiff files"
            )
        xyz = read_xyz(self.xyz_path, expected_shape=self._rgb_shape())
        return remove_background_plane(xyz) if self.remove_plane else xyz

    def load_depth(self) -> np.ndarray:
        """H x W float32: the z coordinate (distance along the optical axis), 0 = no point."""
        return np.ascontiguousarray(self.load_xyz()[..., 2])


def _checked_array(xyz: np.ndarray, where: str, shape: tuple[int, int] | None) -> np.ndarray:
    arr = np.asarray(xyz)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype.kind != "f":
        raise ImageReadError(
            f"{where}: a point map is an H x W x 3 float array of (x, y, z), got {arr.dtype} {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise ImageReadError(f"{where}: the point map holds NaN or infinite coordinates; mark missing points (0, 0, 0)")
    if shape is not None and tuple(arr.shape[:2]) != tuple(shape):
        raise ImageReadError(
            f"{where}: point map is {arr.shape[1]}x{arr.shape[0]} (WxH) but its image is {shape[1]}x{shape[0]}; "
            "the two must be pixel-aligned"
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


def point_map_of(sample: Sample, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The point map of any sample, for a method that uses depth.

    Parameters
    ----------
    sample
        A `PointMapSample` (its `load_xyz`), or a plain sample whose image lies in an MVTec
        3D-AD ``rgb/`` folder with ``xyz/<stem>.tiff`` beside it (an image file given by
        path, e.g. to ``iadkit predict``).
    shape
        (H, W) of the decoded image, checked against the map.

    Raises DatasetLayoutError, naming the image, when no point map can be found.
    """
    if isinstance(sample, PointMapSample) and sample.has_xyz:
        xyz = sample.load_xyz()
        if shape is not None and tuple(xyz.shape[:2]) != tuple(shape):
            raise ImageReadError(
                f"{sample.path}: point map is {xyz.shape[1]}x{xyz.shape[0]} (WxH) but its image is "
                f"{shape[1]}x{shape[0]}; the two must be pixel-aligned"
            )
        return xyz
    p = Path(sample.path)
    if p.parent.name == "rgb":
        for ext in XYZ_EXTENSIONS:
            candidate = p.parent.parent / "xyz" / f"{p.stem}{ext}"
            if candidate.is_file():
                return read_xyz(candidate, expected_shape=shape)
    raise DatasetLayoutError(
        f"{sample.path}: this model uses depth, but the image has no point map; give MVTec 3D-AD samples "
        "(load_dataset on an MVTec 3D-AD folder), or image files in an rgb/ folder with xyz/<stem>.tiff beside it"
    )


__all__ = [
    "PointMapSample",
    "border_points",
    "fit_background_plane",
    "fit_plane_ransac",
    "point_map_of",
    "read_xyz",
    "remove_background_plane",
    "valid_points",
]
