"""iadkit.data.io: exact decoding of 8/16-bit, 1/3/4-channel images and strict failures."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

from iadkit.data.io import image_shape, probe_image, read_image, read_mask, write_image_atomic
from iadkit.errors import IadkitError, ImageReadError

RNG = np.random.default_rng(0)


def _u8(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def _u16(*shape: int) -> np.ndarray:
    return RNG.integers(256, 65536, size=shape, dtype=np.uint16)  # > 255: would not survive 8 bits


# -- decoding ---------------------------------------------------------------------------
def test_gray_png_stays_one_channel(tmp_path: Path) -> None:
    a = _u8(7, 9)
    Image.fromarray(a).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (7, 9, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, 0], a)


def test_rgb_and_rgba_png(tmp_path: Path) -> None:
    rgb = _u8(5, 6, 3)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)
    alpha = np.full((5, 6, 1), 255, np.uint8)
    alpha[0, 0] = 0  # fully transparent pixel: its colour is still kept (alpha dropped, not composited)
    alpha[1, 1] = 100
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA").save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png")
    assert out.shape == (5, 6, 3)
    np.testing.assert_array_equal(out, rgb)


def test_la_becomes_l_and_palette_becomes_rgb_and_1bit(tmp_path: Path) -> None:
    gray = _u8(4, 5)
    la = np.stack([gray, np.full_like(gray, 7)], axis=2)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    assert out.shape == (4, 5, 1)
    np.testing.assert_array_equal(out[:, :, 0], gray)

    idx = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * (256 * 3 - 9))
    pal.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    colours = np.array([[10, 20, 30], [200, 100, 50], [0, 255, 0]], np.uint8)
    np.testing.assert_array_equal(out, colours[idx])

    bits = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1")
    bits.save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_image(tmp_path / "b.png")[:, :, 0], [[0, 255], [255, 0]])


def test_16bit_png_gray_and_rgb_keep_precision(tmp_path: Path) -> None:
    g = _u16(6, 8)
    Image.fromarray(g).save(tmp_path / "g16.png")  # Pillow mode I;16
    out = read_image(tmp_path / "g16.png")
    assert out.dtype == np.uint16 and out.shape == (6, 8, 1)
    np.testing.assert_array_equal(out[:, :, 0], g)

    rgb = _u16(6, 8, 3)
    assert cv2.imwrite(str(tmp_path / "rgb16.png"), rgb[:, :, ::-1])  # OpenCV writes BGR
    out = read_image(tmp_path / "rgb16.png")
    assert out.dtype == np.uint16 and out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out, rgb)


def test_tiff_16bit_planar_float_int_and_miniswhite(tmp_path: Path) -> None:
    rgb = _u16(5, 7, 3)
    tifffile.imwrite(tmp_path / "c.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "c.tif"), rgb)
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(rgb, 2, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "p.tif"), rgb)

    f = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    tifffile.imwrite(tmp_path / "f.tif", f)
    out = read_image(tmp_path / "f.tif")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out[:, :, 0], [[0, 32768], [65535, 16384]])  # round(x * 65535)

    tifffile.imwrite(tmp_path / "i.tif", np.array([[0, 4095], [70, 65535]], np.int32))
    out = read_image(tmp_path / "i.tif")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out[:, :, 0], [[0, 4095], [70, 65535]])

    tifffile.imwrite(tmp_path / "w.tif", np.array([[0, 255]], np.uint8), photometric="miniswhite")
    np.testing.assert_array_equal(read_image(tmp_path / "w.tif")[:, :, 0], [[255, 0]])


@pytest.mark.parametrize(
    ("array", "needle"),
    [
        (np.array([[0.0, 1.5]], np.float32), "[0, 1]"),
        (np.array([[0.0, np.nan]], np.float32), "NaN"),
        (np.array([[-1, 5]], np.int32), "outside 0..65535"),
        (np.zeros((4, 4, 6), np.uint8), "6 channels"),
    ],
)
def test_tiff_rejections(tmp_path: Path, array: np.ndarray, needle: str) -> None:
    path = tmp_path / "bad.tif"
    tifffile.imwrite(
        path, array, **({"photometric": "minisblack", "planarconfig": "contig"} if array.ndim == 3 else {})
    )
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_jpeg_gray_and_exif_orientation(tmp_path: Path) -> None:
    g = np.zeros((20, 40), np.uint8)
    g[:, 20:] = 255  # stored: left half dark, right half bright
    im = Image.fromarray(g)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    im.save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    out = read_image(tmp_path / "o.jpg")
    assert out.shape == (40, 20, 1)  # displayed upright: sides swapped
    assert image_shape(tmp_path / "o.jpg") == (40, 20)
    # rotating clockwise puts the stored left (dark) columns on top
    assert out[:18].mean() < 20 and out[22:].mean() > 235

    Image.fromarray(g).save(tmp_path / "g.jpg")
    assert read_image(tmp_path / "g.jpg").shape == (20, 40, 1)


def test_bmp_and_probe(tmp_path: Path) -> None:
    rgb = _u8(3, 4, 3)
    Image.fromarray(rgb).save(tmp_path / "x.bmp")
    np.testing.assert_array_equal(read_image(tmp_path / "x.bmp"), rgb)
    info = probe_image(tmp_path / "x.bmp")
    assert (info.height, info.width, info.channels, info.dtype, info.format) == (3, 4, 3, "uint8", "BMP")
    tifffile.imwrite(tmp_path / "g.tif", _u16(9, 11))
    info = probe_image(tmp_path / "g.tif")
    assert (info.shape, info.channels, info.dtype) == ((9, 11), 1, "uint16")


# -- failures ---------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_truncated_files_fail(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"t{suffix}"
    arr = _u8(64, 64, 3)
    if suffix == ".tif":
        tifffile.imwrite(path, arr, photometric="rgb")
    else:
        Image.fromarray(arr).save(path)
    _truncate(path)
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        read_image(path)


def test_truncated_fails_even_if_pillow_is_told_to_allow_it(tmp_path: Path) -> None:
    path = tmp_path / "t.png"
    Image.fromarray(_u8(64, 64)).save(path)
    _truncate(path)
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(ImageReadError):
            read_image(path)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_missing_empty_and_non_image(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        read_image(tmp_path / "zero.png")
    (tmp_path / "text.png").write_text("this is not a PNG")
    with pytest.raises(ImageReadError, match="not an image"):
        read_image(tmp_path / "text.png")
    with pytest.raises(ImageReadError, match="folder"):
        read_image(tmp_path)
    err = ImageReadError("x")
    assert isinstance(err, IadkitError) and isinstance(err, ValueError)


def test_decompression_bomb_guard(tmp_path: Path) -> None:
    Image.fromarray(_u8(20, 30)).save(tmp_path / "big.png")
    tifffile.imwrite(tmp_path / "big.tif", _u8(20, 30))
    for name in ("big.png", "big.tif"):
        with pytest.raises(ImageReadError, match="600 pixels, above the limit of 599"):
            read_image(tmp_path / name, max_pixels=599)
        assert read_image(tmp_path / name, max_pixels=600).shape == (20, 30, 1)
    # 16-bit RGB PNGs take the OpenCV path: guarded from the header too
    cv2.imwrite(str(tmp_path / "big16.png"), _u16(20, 30, 3))
    with pytest.raises(ImageReadError, match="above the limit"):
        read_image(tmp_path / "big16.png", max_pixels=100)


# -- masks ------------------------------------------------------------------------------
def test_mask_value_conventions(tmp_path: Path) -> None:
    truth = np.zeros((4, 6), bool)
    truth[1:3, 2:5] = True
    Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "m255.png")
    Image.fromarray(truth.astype(np.uint8)).save(tmp_path / "m1.png")
    Image.fromarray(truth.astype(np.uint16) * 65535).save(tmp_path / "m65535.png")
    tifffile.imwrite(tmp_path / "mb.tif", truth, photometric="minisblack")
    Image.fromarray(np.repeat(truth[:, :, None].astype(np.uint8) * 255, 3, axis=2)).save(tmp_path / "mrgb.png")
    Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "m.bmp")
    for name in ("m255.png", "m1.png", "m65535.png", "mb.tif", "mrgb.png", "m.bmp"):
        m = read_mask(tmp_path / name, expected_shape=(4, 6))
        assert m.dtype == np.bool_
        np.testing.assert_array_equal(m, truth, err_msg=name)
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "empty.png")
    assert not read_mask(tmp_path / "empty.png").any()
    # tifffile stores bool arrays as 1-bit MINISWHITE (bit 1 = black): decoded as viewers and Pillow show it
    tifffile.imwrite(tmp_path / "fax.tif", truth)
    pillow_view = np.asarray(Image.open(tmp_path / "fax.tif").convert("L"))
    np.testing.assert_array_equal(read_image(tmp_path / "fax.tif")[:, :, 0], pillow_view)
    np.testing.assert_array_equal(read_mask(tmp_path / "fax.tif"), ~truth)


def test_mask_rejections(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 128, 255]], np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(ImageReadError, match="not binary: it holds 3 distinct values"):
        read_mask(tmp_path / "grey.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "m.jpg")
    with pytest.raises(ImageReadError, match="lossless"):
        read_mask(tmp_path / "m.jpg")
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "red.png")
    with pytest.raises(ImageReadError, match="colour mask"):
        read_mask(tmp_path / "red.png")
    assert read_mask(tmp_path / "red.png", nonzero=True).sum() == 1

    Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ImageReadError) as err:
        read_mask(tmp_path / "small.png", expected_shape=(8, 12), image_path="img/003.png")
    msg = str(err.value)
    assert "small.png" in msg and "6x4" in msg and "12x8" in msg and "img/003.png" in msg


def test_instance_label_mask_with_nonzero(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 1], [2, 0, 3]], np.uint8)
    Image.fromarray(labels).save(tmp_path / "inst.png")
    with pytest.raises(ImageReadError):
        read_mask(tmp_path / "inst.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "inst.png", nonzero=True), labels > 0)


# -- image_shape and writing ------------------------------------------------------------
def test_image_shape_matches_decode(tmp_path: Path) -> None:
    Image.fromarray(_u8(5, 9, 3)).save(tmp_path / "a.png")
    Image.fromarray(_u16(6, 10)).save(tmp_path / "b.png")
    tifffile.imwrite(tmp_path / "c.tif", np.moveaxis(_u16(7, 11, 3), 2, 0), photometric="rgb", planarconfig="separate")
    Image.fromarray(_u8(8, 12)).save(tmp_path / "d.jpg")
    for name in ("a.png", "b.png", "c.tif", "d.jpg"):
        assert image_shape(tmp_path / name) == read_image(tmp_path / name).shape[:2], name


@pytest.mark.parametrize(
    ("name", "array"),
    [
        ("g8.png", _u8(5, 7)),
        ("rgb8.png", _u8(5, 7, 3)),
        ("g16.png", _u16(5, 7)),
        ("rgb16.png", _u16(5, 7, 3)),
        ("rgb16.tif", _u16(5, 7, 3)),
        ("g8.bmp", _u8(5, 7)),
    ],
)
def test_write_image_atomic_round_trip(tmp_path: Path, name: str, array: np.ndarray) -> None:
    path = write_image_atomic(tmp_path / "sub" / name, array)
    out = read_image(path)
    expected = array if array.ndim == 3 else array[:, :, None]
    assert out.dtype == array.dtype
    np.testing.assert_array_equal(out, expected)
    assert sorted(os.listdir(tmp_path / "sub")) == [name]  # no temp file left behind


def test_write_image_atomic_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.png"
    old = _u8(3, 3)
    write_image_atomic(path, old)
    write_image_atomic(tmp_path / "mask.png", np.eye(3, dtype=bool))
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.png"), np.eye(3, dtype=bool))

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        write_image_atomic(path, _u8(3, 3))
    monkeypatch.undo()
    np.testing.assert_array_equal(read_image(path)[:, :, 0], old)
    assert sorted(os.listdir(tmp_path)) == ["mask.png", "x.png"]
    with pytest.raises(ValueError, match="8-bit"):
        write_image_atomic(tmp_path / "y.jpg", _u16(3, 3))
