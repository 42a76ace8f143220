"""FPFH descriptors: hand-computed pair features, a plain-loop reference, invariances, Open3D."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from iadkit.components.point_features import (
    FPFH_DIM,
    estimate_normals,
    fpfh,
    fpfh_map,
    neighbours,
    pair_features,
)


def ref_pair(p1, n1, p2, n2):
    """Open3D's ComputePairFeatures written out for one pair (with our 1e-9 tie rule)."""
    d = p2 - p1
    length = np.linalg.norm(d)
    if length == 0:
        return np.zeros(3)
    a1, a2 = n1 @ d / length, n2 @ d / length
    if math.acos(min(abs(a1), 1.0)) > math.acos(min(abs(a2), 1.0)) + 1e-9:
        n1, n2, d, f2 = n2, n1, -d, -a2
    else:
        f2 = a1
    v = np.cross(d, n1)
    if np.linalg.norm(v) == 0:
        return np.zeros(3)
    v = v / np.linalg.norm(v)
    w = np.cross(n1, v)
    return np.array([math.atan2(w @ n2, n1 @ n2), v @ n2, f2])


def ref_fpfh(points, normals, table, power=2.0):
    """SPFH then FPFH with plain loops over a neighbour table (self and absent entries skipped)."""
    n = len(points)
    nbrs = [[j for j in row if j < n and j != i] for i, row in enumerate(table)]
    spfh = np.zeros((n, FPFH_DIM))
    for i in range(n):
        for j in nbrs[i]:
            f = ref_pair(points[i], normals[i], points[j], normals[j])
            bins = (
                math.floor(11 * (f[0] + math.pi) / (2 * math.pi)),
                math.floor(11 * (f[1] + 1) / 2),
                math.floor(11 * (f[2] + 1) / 2),
            )
            for block, b in enumerate(bins):
                spfh[i, 11 * block + min(max(b, 0), 10)] += 100 / len(nbrs[i])
    out = np.zeros((n, FPFH_DIM))
    for i in range(n):
        if not nbrs[i]:
            continue
        acc = np.zeros(FPFH_DIM)
        for j in nbrs[i]:
            dist = np.linalg.norm(points[i] - points[j])
            if dist > 0:
                acc += spfh[j] / dist**power
        sums = acc.reshape(3, 11).sum(1)
        acc = (acc.reshape(3, 11) * np.where(sums > 0, 100 / np.where(sums > 0, sums, 1), 0)[:, None]).ravel()
        out[i] = acc + spfh[i]
    return out


def bumpy_map(h: int = 28, w: int = 28) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] / w - 0.5
    z = 0.3 + 0.02 * np.sin(6 * x) * np.cos(4 * y) + 0.01 * np.exp(-((x - 0.1) ** 2 + (y + 0.1) ** 2) / 0.005)
    xyz = np.stack([x * 0.1, y * 0.1, z], axis=-1)
    xyz[3, 4] = 0.0  # missing points
    xyz[10, 10] = 0.0
    return xyz


SMALL = dict(normal_radius=0.012, normal_max_nn=30, feature_radius=0.02, feature_max_nn=60)


def test_pair_features_hand_computed():
    # Two points of a sphere of radius 2 whose normals differ by theta: (theta, 0, -sin(theta / 2)).
    theta = 0.7
    p1, p2 = np.array([0.0, 0.0, 2.0]), np.array([2 * math.sin(theta), 0.0, 2 * math.cos(theta)])
    expected = [theta, 0.0, -math.sin(theta / 2)]
    np.testing.assert_allclose(pair_features(p1, p1 / 2, p2, p2 / 2), expected, atol=1e-12)
    np.testing.assert_allclose(pair_features(p2, p2 / 2, p1, p1 / 2), expected, atol=1e-12)
    # Two points of a plane: every feature 0.
    n = np.array([0.0, 0.6, 0.8])
    np.testing.assert_allclose(pair_features(np.zeros(3), n, np.array([1.0, 0.8, -0.6]), n), [0, 0, 0], atol=1e-12)
    # Coincident points, or a neighbour straight along the normal: zeros by definition.
    assert not pair_features(np.zeros(3), n, np.zeros(3), n).any()
    assert not pair_features(np.zeros(3), n, 2 * n, n).any()
    # The source is the point whose normal is closer to perpendicular to the line: a swap.
    p, q = np.zeros(3), np.array([1.0, 0.0, 0.0])
    na, nb = np.array([0.0, 0.0, 1.0]), np.array([0.6, 0.0, 0.8])
    np.testing.assert_allclose(pair_features(p, na, q, nb), ref_pair(p, na, q, nb), atol=1e-12)
    np.testing.assert_allclose(pair_features(q, nb, p, na), pair_features(p, na, q, nb), atol=1e-12)
    # Batched inputs give the per-pair results.
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(2, 50, 3))
    nrm = rng.normal(size=(2, 50, 3))
    nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
    batch = pair_features(pts[0], nrm[0], pts[1], nrm[1])
    for i in range(50):
        np.testing.assert_allclose(batch[i], ref_pair(pts[0, i], nrm[0, i], pts[1, i], nrm[1, i]), atol=1e-12)


@pytest.mark.parametrize("power", [2.0, 1.0])
def test_fpfh_equals_the_plain_loop_reference(power, monkeypatch):
    import iadkit.components.point_features as pf

    monkeypatch.setattr(pf, "_CHUNK", 7)  # several vectorised blocks
    rng = np.random.default_rng(1)
    pts = rng.uniform(-1, 1, (60, 3))
    pts[5] = pts[4]  # a duplicate point: distance 0, skipped in the weighting
    normals = rng.normal(size=(60, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    got = fpfh(pts, normals, radius=0.8, max_nn=12, distance_power=power)
    table, _ = neighbours(pts, 0.8, 12)
    np.testing.assert_allclose(got, ref_fpfh(pts, normals, table, power), atol=1e-9)
    with_neighbours = (table != np.arange(60)[:, None]) & (table < 60)
    blocks = got.reshape(60, 3, 11).sum(axis=2)
    np.testing.assert_allclose(blocks[with_neighbours.any(1)], 200.0)  # own SPFH (100) + neighbours' (100)
    assert not got[~with_neighbours.any(1)].any()


def test_a_plane_has_one_descriptor_everywhere():
    """All pair features of a plane are 0: bin 5 of each block, 100 (SPFH) + 100 (neighbours)."""
    h, w = 16, 20
    y, x = np.mgrid[0:h, 0:w] * 0.002
    tilted = np.stack([x, y, 0.3 + 0.2 * x - 0.1 * y], axis=-1)
    tilted[7, 9] = 0.0
    feats = fpfh_map(tilted, normal_radius=0.006, normal_max_nn=30, feature_radius=0.01, feature_max_nn=40)
    expected = np.zeros(FPFH_DIM, np.float32)
    expected[[5, 16, 27]] = 200.0
    valid = np.ones((h, w), bool)
    valid[7, 9] = False
    np.testing.assert_allclose(feats[valid], np.broadcast_to(expected, (valid.sum(), FPFH_DIM)), atol=1e-3)
    assert not feats[7, 9].any()  # missing point: zeros


def test_rotation_about_the_camera_leaves_fpfh_unchanged():
    xyz = bumpy_map()
    rot = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()
    base = fpfh_map(xyz, **SMALL)
    rotated = fpfh_map(xyz @ rot.T, **SMALL)  # missing points stay (0, 0, 0)
    assert base.shape == (28, 28, FPFH_DIM) and base.dtype == np.float32
    np.testing.assert_allclose(rotated, base, atol=1e-3)
    # Non-trivial: the descriptor varies over the bumpy surface.
    assert np.abs(base[5, 5] - base[20, 14]).sum() > 20


def test_normals_on_a_sphere_point_to_the_camera():
    rng = np.random.default_rng(2)
    centre, radius = np.array([0.0, 0.0, 1.0]), 0.3
    directions = rng.normal(size=(800, 3))
    directions[:, 2] = -np.abs(directions[:, 2])  # the cap that faces the camera at the origin
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    pts = centre + radius * directions
    normals = estimate_normals(pts, radius=0.08, max_nn=30)
    assert np.median(np.einsum("ij,ij->i", normals, directions)) > 0.999  # outward = towards the camera
    assert (np.einsum("ij,ij->i", normals, -pts) >= 0).all()
    lonely = estimate_normals(np.array([[0.0, 0.0, 1.0], [5.0, 0.0, 1.0]]), radius=0.1, max_nn=30)
    np.testing.assert_allclose(lonely, [[0, 0, -1], [0, 0, -1]])  # (0, 0, 1), flipped to face the camera


def test_errors():
    with pytest.raises(ValueError, match="H x W x 3"):
        fpfh_map(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="N x 3"):
        estimate_normals(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        estimate_normals(np.array([[0.0, np.nan, 1.0]]))
    with pytest.raises(ValueError, match="radius"):
        fpfh(np.zeros((3, 3)), np.ones((3, 3)), radius=0.0)
    assert not fpfh_map(np.zeros((3, 3, 3))).any()


def _open3d():
    try:
        import open3d
    except Exception:  # not installed (it is not a dependency), or a partial install
        pytest.skip("open3d is not installed; the comparison with it is optional")
    return open3d


def test_same_numbers_as_open3d():
    o3d = _open3d()
    rng = np.random.default_rng(0)
    pts = rng.uniform(-1, 1, (1500, 3))
    normals = rng.normal(size=(1500, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    cloud.normals = o3d.utility.Vector3dVector(normals)
    for radius, max_nn in ((0.2, 100), (0.5, 30)):
        ours = fpfh(pts, normals, radius=radius, max_nn=max_nn)
        param = o3d.geometry.KDTreeSearchParamHybrid(radius=radius, max_nn=max_nn)
        theirs = np.asarray(o3d.pipelines.registration.compute_fpfh_feature(cloud, param).data).T
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    # Normals agree up to Open3D's arbitrary sign (on scattered points: on a grid, which of
    # several equidistant neighbours make the max_nn cut differs between the two).
    xy = rng.uniform(-1, 1, (1500, 2))
    surface = np.c_[xy, 5 + 0.3 * np.sin(2 * xy[:, 0]) * np.cos(3 * xy[:, 1])]
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(surface))
    cloud.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=0.3, max_nn=30))
    ours = estimate_normals(surface, radius=0.3, max_nn=30)
    assert np.abs(np.einsum("ij,ij->i", ours, np.asarray(cloud.normals))).min() > 1 - 1e-6
