"""The numpy twin of Preprocess (iadkit.data.pixels): the same pixels as torch, without torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iadkit.data.pixels import PixelPreprocess, resize_bilinear_antialias, to_unit_float
from iadkit.data.transforms import Preprocess


@pytest.mark.parametrize(
    "shape, size",
    [
        ((300, 217), (64, 64)),  # shrink, uneven ratios
        ((64, 64), (96, 96)),  # enlarge
        ((50, 80), (224, 224)),
        ((97, 131), (64, 100)),
        ((64, 64), (64, 32)),  # one axis only
        ((7, 5), (64, 64)),
        ((256, 256), (255, 257)),  # almost the same size
        ((1, 9), (4, 3)),
    ],
)
def test_resize_equals_torch_antialiased_bilinear(shape, size):
    x = np.random.default_rng(sum(shape)).random((*shape, 3), dtype=np.float32)
    expected = (
        F.interpolate(
            torch.from_numpy(x).permute(2, 0, 1)[None], size=size, mode="bilinear", antialias=True, align_corners=False
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    got = resize_bilinear_antialias(x, size)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_resize_constant_image_stays_constant_and_averages_when_shrinking():
    np.testing.assert_allclose(resize_bilinear_antialias(np.full((37, 23), 0.25, np.float32), (5, 9)), 0.25, atol=1e-7)
    # halving: each output pixel is a normalised triangle over 4 inputs -> weights 1/8, 3/8, 3/8, 1/8
    row = np.arange(8, dtype=np.float32)[None, :]
    out = resize_bilinear_antialias(row, (1, 4))
    np.testing.assert_allclose(out[0, 1], (1 * 1 + 3 * 2 + 3 * 3 + 1 * 4) / 8, atol=1e-6)


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8),
        np.random.default_rng(2).integers(0, 65536, (70, 90, 1), dtype=np.uint16),  # 16-bit grayscale
        np.random.default_rng(3).integers(0, 256, (70, 90), dtype=np.uint8),  # HxW grayscale
        np.random.default_rng(4).integers(0, 256, (70, 90, 4), dtype=np.uint8),  # RGBA: alpha dropped
        np.random.default_rng(5).random((70, 90, 3)).astype(np.float64),
    ],
)
@pytest.mark.parametrize("crop", [None, (48, 40)])
def test_pixel_preprocess_equals_preprocess(image, crop):
    pp = Preprocess(image_size=(56, 64), crop_size=crop)
    twin = PixelPreprocess.from_dict(pp.to_dict())
    assert twin.output_size == pp.output_size
    expected = pp.geometry(pp.to_unit_float(image)).numpy()
    np.testing.assert_allclose(twin(image), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(twin.view(image), pp.view(image), rtol=0, atol=1e-6)


def test_unit_float_keeps_16_bit_precision_and_refuses_other_types():
    a = np.array([[[1], [65534]]], dtype=np.uint16)
    out = to_unit_float(a)
    assert (
        out.shape == (1, 2, 3) and out[0, 0, 0] == np.float32(1 / 65535) and out[0, 1, 2] == np.float32(65534 / 65535)
    )
    with pytest.raises(ValueError, match="unsupported image dtype int32"):
        to_unit_float(np.zeros((4, 4, 3), np.int32))
    with pytest.raises(ValueError, match="C in 1, 3 or 4"):
        to_unit_float(np.zeros((4, 4, 2), np.uint8))


def test_image_reading_and_pixels_do_not_import_torch():
    code = (
        "import sys, iadkit.data.io, iadkit.data.pixels, iadkit.results, iadkit.viz, iadkit.tiling, iadkit.runtime, iadkit.export; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
