"""MVTec 3D-AD point maps: reading xyz TIFFs with the RGB images, plane removal, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from iadkit.data import load_dataset
from iadkit.data.point_maps import (
    PointMapSample,
    fit_background_plane,
    fit_plane_ransac,
    read_xyz,
    remove_background_plane,
    valid_points,
)
from iadkit.errors import DatasetLayoutError, ImageReadError

H = W = 40
PITCH = 0.001  # 1 mm per pixel, metres as in MVTec 3D-AD


def scene(seed: int, *, tilt=(0.05, -0.03), object_height: float = 0.01) -> np.ndarray:
    """A tilted background plane (z ~ 0.3 m) with a 10 x 10 px box standing 10 mm on it, 0.2 mm
    depth noise and a few missing points."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    x, y = (x - W / 2) * PITCH, (y - H / 2) * PITCH
    z = 0.3 + tilt[0] * x + tilt[1] * y + rng.normal(0, 0.0002, (H, W))
    z[15:25, 15:25] -= object_height  # towards the camera
    xyz = np.stack([x, y, z], axis=-1).astype(np.float32)
    xyz[rng.random((H, W)) < 0.02] = 0.0
    return xyz


def write_3d(root: Path, *, with_xyz: bool = True) -> Path:
    cat = root / "cookie"
    rgb = np.full((H, W, 3), 90, np.uint8)
    folders = {"train/good": 2, "validation/good": 1, "test/good": 1, "test/dent": 1}
    for folder, n in folders.items():
        for i in range(n):
            d = cat / folder
            (d / "rgb").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(d / "rgb" / f"{i:03d}.png")
            if with_xyz:
                (d / "xyz").mkdir(exist_ok=True)
                tifffile.imwrite(d / "xyz" / f"{i:03d}.tiff", scene(i), photometric="rgb")
            if folder == "test/dent":
                (d / "gt").mkdir(exist_ok=True)
                m = np.zeros((H, W), np.uint8)
                m[18:22, 18:22] = 255
                Image.fromarray(m).save(d / "gt" / f"{i:03d}.png")
    return cat


def test_loader_attaches_point_maps(tmp_path: Path) -> None:
    write_3d(tmp_path)
    split = load_dataset(tmp_path)
    assert split.layout == "mvtec3d"
    everything = split.train + split.validation + split.test
    assert all(isinstance(s, PointMapSample) and s.has_xyz for s in everything)
    assert split.counts() == {"train": {"good": 2}, "validation": {"good": 1}, "test": {"good": 1, "dent": 1}}
    dent = split.test_anomalous[0]
    assert dent.xyz_path.endswith("test/dent/xyz/000.tiff") and dent.mask_path.endswith("test/dent/gt/000.png")
    xyz = dent.load_xyz()
    assert xyz.shape == (H, W, 3) and xyz.dtype == np.float32
    np.testing.assert_array_equal(xyz, scene(0))
    np.testing.assert_array_equal(dent.load_depth(), scene(0)[..., 2])
    # xyz=False ignores the point maps; a relabelled sample keeps its point map.
    assert not any(s.has_xyz for s in load_dataset(tmp_path, xyz=False).train)
    assert dent.with_label(0).xyz_path == dent.xyz_path


def test_plane_removal_keeps_the_object_only(tmp_path: Path) -> None:
    write_3d(tmp_path)
    sample = load_dataset(tmp_path, remove_plane=True).train[0]
    assert sample.remove_plane
    cleaned = sample.load_xyz()
    kept = valid_points(cleaned)
    box = np.zeros((H, W), bool)
    box[15:25, 15:25] = True
    original_valid = valid_points(scene(0))
    assert not (kept & ~box).any()  # every background point is gone
    assert (kept == (box & original_valid)).all()  # every object point stays, unchanged
    np.testing.assert_array_equal(cleaned[kept], scene(0)[kept])


def test_ransac_recovers_the_plane_despite_outliers() -> None:
    rng = np.random.default_rng(1)
    n = np.array([0.1, -0.2, 1.0])
    n /= np.linalg.norm(n)
    d = -0.3
    pts = rng.uniform(-0.05, 0.05, (600, 3))
    pts -= np.outer(pts @ n + d, n)  # onto the plane
    pts += rng.normal(0, 0.0005, (600, 1)) * n
    off = rng.uniform(0.01, 0.05, 600)
    # Classic 3-point candidates find the plane among 30 % outliers; BTF's 50-point candidates
    # are least-squares fits that need an outlier-free draw, so they only suit few outliers
    # (a background border): 2 % here.
    for sample_size, fraction in ((3, 0.3), (50, 0.02)):
        outliers = rng.random(600) < fraction
        noisy = pts + np.outer(off * outliers, n)
        plane, inliers = fit_plane_ransac(noisy, threshold=0.002, sample_size=sample_size, iterations=200, seed=0)
        sign = np.sign(plane[:3] @ n)
        np.testing.assert_allclose(sign * plane[:3], n, atol=2e-3)
        assert sign * plane[3] == pytest.approx(d, abs=2e-4)
        assert (inliers == ~outliers).mean() > 0.99
    same, _ = fit_plane_ransac(noisy, threshold=0.002, iterations=50, seed=3)
    again, _ = fit_plane_ransac(noisy, threshold=0.002, iterations=50, seed=3)
    np.testing.assert_array_equal(same, again)  # seeded: deterministic
    xyz = scene(0)
    plane = fit_background_plane(xyz)
    assert abs(plane[:3] @ np.array([0.05, -0.03, -1.0]) / np.linalg.norm([0.05, -0.03, -1.0])) > 0.9999
    tiny = np.zeros((12, 12, 3), np.float32)
    with pytest.raises(ValueError, match="border"):
        remove_background_plane(tiny)


def test_missing_and_malformed_point_maps(tmp_path: Path) -> None:
    cat = write_3d(tmp_path)
    (cat / "train" / "good" / "xyz" / "001.tiff").unlink()
    with pytest.raises(DatasetLayoutError, match=r"have no point map <stem>.tiff here \(001.png\)"):
        load_dataset(tmp_path)
    assert len(load_dataset(tmp_path, xyz=False).train) == 2  # RGB only still loads

    good = cat / "test" / "good" / "xyz" / "000.tiff"
    tifffile.imwrite(good, np.zeros((H, W), np.float32))
    tifffile.imwrite(cat / "train" / "good" / "xyz" / "001.tiff", scene(1)[:20], photometric="rgb")
    split = load_dataset(tmp_path)
    with pytest.raises(
        ImageReadError, match=r"000.tiff: a point map must be an H x W x 3 array .* got shape \(40, 40\)"
    ):
        split.test_good[0].load_xyz()
    with pytest.raises(ImageReadError, match=r"point map is 40x20 .* but its RGB image is 40x40"):
        split.train[1].load_xyz()
    tifffile.imwrite(good, np.zeros((H, W, 3), np.uint16), photometric="rgb")
    with pytest.raises(ImageReadError, match="float coordinates"):
        read_xyz(good)
    good.write_bytes(b"not a tiff")
    with pytest.raises(ImageReadError, match="cannot read the point map"):
        read_xyz(good)
    with pytest.raises(ImageReadError, match="not found"):
        read_xyz(tmp_path / "nope.tiff")
    nan = scene(0)
    nan[3, 4] = np.nan
    tifffile.imwrite(good, nan, photometric="rgb")
    assert not valid_points(read_xyz(good))[3, 4]


def test_option_errors(tmp_path: Path) -> None:
    write_3d(tmp_path / "rgb_only", with_xyz=False)
    assert not load_dataset(tmp_path / "rgb_only").train[0].has_xyz
    with pytest.raises(DatasetLayoutError, match="missing folder of point maps"):
        load_dataset(tmp_path / "rgb_only", xyz=True)
    with pytest.raises(DatasetLayoutError, match="needed by remove_plane=True"):
        load_dataset(tmp_path / "rgb_only", remove_plane=True)
    with pytest.raises(DatasetLayoutError, match="has no point map"):
        load_dataset(tmp_path / "rgb_only").train[0].load_xyz()
    mvtec = tmp_path / "flat" / "bottle"
    for folder in ("train/good", "test/good"):
        (mvtec / folder).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(mvtec / folder / "000.png")
    with pytest.raises(DatasetLayoutError, match="MVTec 3D-AD point maps only"):
        load_dataset(tmp_path / "flat", remove_plane=True)
