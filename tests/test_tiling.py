"""Tiling of high-resolution parts (iadkit.tiling): the geometry, the stitching, and a 2048 x 2048
part whose 4-pixel defect a whole-image resize erases and tiles find."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

import iadkit.runtime as runtime
from iadkit.data.pixels import PixelPreprocess
from iadkit.errors import InvalidParameterError
from iadkit.model import Model
from iadkit.tiling import Tiling, blend_window, predict_tiled, resolve_tiling, stitch
from iadkit.types import GOOD, Sample

pytestmark = pytest.mark.filterwarnings("ignore::iadkit.errors.CalibrationWarning")  # tiny calibration sets on purpose


# -- geometry and stitching ---------------------------------------------------------------------
def test_boxes_cover_the_image_and_end_at_its_edges():
    t = Tiling(256, 0.25)
    assert t.stride == 192
    boxes = t.boxes((2048, 1000))
    tops = sorted({b[0] for b in boxes})
    lefts = sorted({b[1] for b in boxes})
    assert tops == [*range(0, 1792, 192), 1792] and lefts == [0, 192, 384, 576, 744]
    assert all(b[2] - b[0] == 256 and b[3] - b[1] == 256 for b in boxes)
    covered = np.zeros((2048, 1000), int)
    for top, left, bottom, right in boxes:
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1
    # a side not longer than a tile is one tile spanning it; a small image is one tile: itself
    assert Tiling(64).boxes((40, 300))[0] == (0, 0, 40, 64) and {b[2] for b in Tiling(64).boxes((40, 300))} == {40}
    assert Tiling(64).boxes((50, 60)) == [(0, 0, 50, 60)] and not Tiling(64).applies((64, 64))
    assert Tiling(64, 0).boxes((128, 128)) == [(0, 0, 64, 64), (0, 64, 64, 128), (64, 0, 128, 64), (64, 64, 128, 128)]


def test_stitching_is_a_normalised_window_average():
    t = Tiling(32, 0.5)
    shape = (80, 70)
    boxes = t.boxes(shape)
    const = stitch([np.full((32, 32), 3.0, np.float32) for _ in boxes], boxes, shape)
    np.testing.assert_allclose(const, 3.0, rtol=1e-6)  # weights are normalised
    # a smooth field cut into tiles comes back as it was (every tile carries the same values)
    yy, xx = np.mgrid[0:80, 0:70].astype(np.float32)
    field = np.sin(yy / 9) + np.cos(xx / 7)
    np.testing.assert_allclose(stitch([field[a:c, b:d] for a, b, c, d in boxes], boxes, shape), field, atol=1e-5)
    # where tiles overlap, the value is the window-weighted mean of the tiles' values
    maps = [np.full((32, 32), float(i), np.float32) for i in range(len(boxes))]
    out = stitch(maps, boxes, shape)
    y, x = 20, 20  # inside tiles 0, 1, (row 2) ...
    inside = [(i, b) for i, b in enumerate(boxes) if b[0] <= y < b[2] and b[1] <= x < b[3]]
    w = [blend_window(32, 32)[y - b[0], x - b[1]] for _, b in inside]
    assert len(inside) == 4
    np.testing.assert_allclose(out[y, x], sum(wi * i for wi, (i, _) in zip(w, inside)) / sum(w), rtol=1e-6)
    win = blend_window(32, 32)
    assert win.min() > 0 and win.max() <= 1 and win[16, 16] > 0.99 and np.allclose(win, win.T)


def test_predict_tiled_score_is_the_max_over_tiles():
    image = np.zeros((100, 100, 3), np.uint8)
    seen = []

    def score(tiles):
        seen.extend(t.shape for t in tiles)
        n = len(seen)
        return np.arange(n - len(tiles), n, dtype=np.float32), np.stack(
            [np.full((16, 16), 1.0, np.float32)] * len(tiles)
        )

    s, m = predict_tiled(image, Tiling(40, 0.25), score, batch_size=3)
    assert len(seen) == 9 and all(shape == (40, 40, 3) for shape in seen)
    assert s == 8.0 and m.shape == (100, 100)
    np.testing.assert_allclose(m, 1.0, rtol=1e-6)  # 16-px maps resized back to 40-px tiles


def test_tiling_options_are_checked_and_resolved():
    for bad in (0, 8, 2.5, True, "256"):
        with pytest.raises(InvalidParameterError, match="tile must be"):
            Tiling(bad)  # type: ignore[arg-type]
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(InvalidParameterError, match="overlap"):
            Tiling(64, bad)
    stored = Tiling(128, 0.5)
    assert resolve_tiling(stored, None, None) is stored
    assert resolve_tiling(stored, 0, None) is None
    assert resolve_tiling(stored, 64, None) == Tiling(64, 0.5)
    assert resolve_tiling(None, 64, None) == Tiling(64, 0.25)
    assert resolve_tiling(None, None, 0.5) is None
    assert Tiling.from_dict(Tiling(96, 0.1).to_dict()) == Tiling(96, 0.1)
    model = Model.create("patchcore", image_size=64, crop_size=48)
    with pytest.raises(InvalidParameterError, match="without a centre crop"):
        model.predict([np.zeros((200, 200, 3), np.uint8)], tile=64)


# -- a high-resolution part -----------------------------------------------------------------------
N = 2048
DEFECT = (1300, 700, 4)  # top, left, side: a 4 x 4 px dark spot


def _part(seed: int, size: int = N) -> np.ndarray:
    """A grey surface with mottling (8-px grain) and fine noise, as float in [0, 1]."""
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)).astype(np.float32), 6)
    return 0.5 + 0.12 * base / np.abs(base).max() + rng.normal(0, 0.01, (size, size)).astype(np.float32)


def _u8(img: np.ndarray) -> np.ndarray:
    return np.repeat(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)[:, :, None], 3, axis=2)


@pytest.fixture(scope="module")
def parts():
    twin = _part(10)
    defect = twin.copy()
    top, left, side = DEFECT
    defect[top : top + side, left : left + side] = 0.05
    good = [_u8(_part(s, 1024)) for s in range(4)]  # training parts need not be as large
    return good, _u8(twin), _u8(defect)


@pytest.mark.slow
def test_tiles_find_a_defect_that_the_whole_image_resize_erases(parts, tmp_path):
    good, twin, defect = parts
    # the 4-px spot (contrast 0.45) is erased by a 2048 -> 128 resize: the resized images differ by < 0.03
    whole_view = PixelPreprocess(image_size=(128, 128))
    assert np.abs(whole_view(defect) - whole_view(twin)).max() < 0.03

    torch.manual_seed(0)
    whole = Model.create("patchcore", image_size=128, coreset_ratio=0.1)
    whole.fit(
        [Sample(path=f"g{i}", label=GOOD, image=g) for i, g in enumerate(good)], calibration_fraction=0, progress=False
    )
    w_twin, w_defect = whole.predict([twin, defect]).scores
    assert abs(w_defect - w_twin) < 0.002 * w_twin  # the whole-image model does not see it

    tiled = Model.create("patchcore", image_size=128, coreset_ratio=0.05)
    tiled.fit(
        [Sample(path="g0", label=GOOD, image=good[0]), Sample(path="g1", label=GOOD, image=good[1])],
        calibration=[Sample(path="g2", label=GOOD, image=good[2]), Sample(path="g3", label=GOOD, image=good[3])],
        tile=256,
        overlap=0.25,
        progress=False,
    )
    assert tiled.tiling == Tiling(256, 0.25) and tiled.info["n_train_tiles"] == 2 * 25
    result = tiled.predict([twin, defect])
    t_twin, t_defect = result.scores
    assert t_defect > 1.2 * t_twin and t_defect > tiled.threshold.value  # the tiles find it
    assert bool(result.verdicts[1])
    amap = result.maps[1]
    assert isinstance(result.maps, list) and amap.shape == (N, N) and amap.dtype == np.float32
    peak = np.unravel_index(np.argmax(amap), amap.shape)
    top, left, side = DEFECT
    assert abs(peak[0] - (top + side / 2)) <= 8 and abs(peak[1] - (left + side / 2)) <= 8  # the map peaks at it
    print(
        f"whole: twin {w_twin:.4f} defect {w_defect:.4f}; tiled: twin {t_twin:.3f} defect {t_defect:.3f} "
        f"threshold {tiled.threshold.value:.3f}; map peak {peak}"
    )
    # the stitched map is continuous across tile seams: no jump larger than inside a tile
    assert np.abs(np.diff(result.maps[0], axis=0)).max() < 0.5 * (t_twin - float(np.median(result.maps[0])))

    # the tiling travels with the model file and the export, and the runtime tiles alike
    reloaded = Model.load(tiled.save(tmp_path / "tiled.iad"))
    assert reloaded.tiling == tiled.tiling
    exported = runtime.load(tiled.export_onnx(tmp_path / "tiled.onnx"), threads=1)
    assert exported.tiling == tiled.tiling
    got = exported.predict([defect])
    np.testing.assert_allclose(got.scores, [t_defect], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.maps[0], amap, rtol=1e-4, atol=1e-4)
    # tile=0 turns it off: one resized image, a map at the input size
    untiled = tiled.predict([defect], tile=0)
    assert untiled.maps.shape == (1, 128, 128)
    import iadkit

    with pytest.raises(InvalidParameterError, match="evaluate does not tile yet"):
        iadkit.evaluate(tiled, [Sample(path="d", label=1, image=defect)])


def test_cli_fit_and_predict_with_tiles(tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    import _dummy  # noqa: F401  (registers test_pixel_zscore)
    from iadkit.cli import app
    from test_cli_model import make_tree

    data = make_tree(tmp_path / "data", size=48)
    model_file = tmp_path / "plate.iad"
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "fit",
            "-m",
            "test_pixel_zscore",
            "-d",
            str(data),
            "-c",
            "plate",
            "-o",
            str(model_file),
            "--image-size",
            "24",
            "--calibration-fraction",
            "0.25",
            "--target-fpr",
            "0",
            "--tile",
            "24",
            "--overlap",
            "0.25",
        ],
    )
    assert r.exit_code == 0, r.output
    model = Model.load(model_file)
    assert model.tiling == Tiling(24, 0.25) and model.info["n_train_tiles"] == 9 * 9  # 9 images x 3 x 3 tiles
    out = tmp_path / "preds"
    r = runner.invoke(app, ["predict", str(model_file), str(data / "plate/test"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "predictions.json").read_text())
    good = [row["score"] for row in rows if row["path"].split("/")[-2] == "good"]
    spot = [row["score"] for row in rows if row["path"].split("/")[-2] == "spot"]
    assert len(rows) == 8 and min(spot) > max(good)  # every spot image above every good one
    assert Image.open(sorted((out / "overlays").glob("*.png"))[0]).size == (48, 48)  # full resolution
    r = runner.invoke(
        app, ["predict", str(model_file), str(data / "plate/test"), "--out", str(tmp_path / "p2"), "--tile", "0"]
    )
    assert r.exit_code == 0, r.output
    assert Image.open(sorted((tmp_path / "p2" / "overlays").glob("*.png"))[0]).size == (24, 24)  # one resized image
    bad = runner.invoke(
        app,
        [
            "fit",
            "-m",
            "test_pixel_zscore",
            "-d",
            str(data),
            "-c",
            "plate",
            "-o",
            str(tmp_path / "x.iad"),
            "--overlap",
            "0.5",
        ],
    )
    assert bad.exit_code != 0 and "--overlap needs --tile" in str(bad.exception)
