"""iadkit.data.io.read_image_bytes: an upload decodes to exactly what read_image gives for the file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from iadkit.data.io import read_image, read_image_bytes
from iadkit.errors import ImageReadError

RNG = np.random.default_rng(1)


def _write_all(folder: Path) -> list[Path]:
    rgb = RNG.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    gray16 = RNG.integers(256, 65536, (6, 5), dtype=np.uint16)
    rgb16 = RNG.integers(256, 65536, (4, 6, 3), dtype=np.uint16)
    rgba = RNG.integers(0, 256, (5, 5, 4), dtype=np.uint8)
    files = {
        "rgb.png": lambda p: Image.fromarray(rgb).save(p),
        "gray16.png": lambda p: Image.fromarray(gray16).save(p),
        "rgb16.png": lambda p: cv2.imwrite(str(p), rgb16[:, :, ::-1]),  # Pillow cannot write 16-bit RGB
        "rgba.png": lambda p: Image.fromarray(rgba).save(p),
        "q.jpg": lambda p: Image.fromarray(rgb).save(p, quality=90),
        "b.bmp": lambda p: Image.fromarray(rgb).save(p),
        "planar.tif": lambda p: tifffile.imwrite(
            p, np.moveaxis(rgb16, -1, 0), photometric="rgb", planarconfig="separate"
        ),
        "f.tif": lambda p: tifffile.imwrite(p, np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)),
    }
    paths = []
    for name, write in files.items():
        write(folder / name)
        paths.append(folder / name)
    return paths


def test_bytes_decode_equals_file_decode(tmp_path: Path) -> None:
    for path in _write_all(tmp_path):
        from_file = read_image(path)
        from_bytes = read_image_bytes(path.read_bytes(), path.name)
        assert from_bytes.dtype == from_file.dtype, path.name
        np.testing.assert_array_equal(from_bytes, from_file, err_msg=path.name)
    assert read_image_bytes((tmp_path / "rgb16.png").read_bytes(), "x.png").dtype == np.uint16  # not cut to 8 bits


def test_bytes_errors_name_the_upload(tmp_path: Path) -> None:
    Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    with pytest.raises(ImageReadError, match=r"^part-7\.png: .*truncated"):
        read_image_bytes(data[: len(data) // 2], "part-7.png")
    with pytest.raises(ImageReadError, match=r"^empty\.png: file is empty"):
        read_image_bytes(b"", "empty.png")
    with pytest.raises(ImageReadError, match=r"^notes\.png: not an image"):
        read_image_bytes(b"hello, this is text", "notes.png")
    with pytest.raises(ImageReadError, match=r"^big\.png: image is 32x32 = 1,024 pixels, above the limit"):
        read_image_bytes(data, "big.png", max_pixels=1000)
