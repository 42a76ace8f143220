"""Heatmap overlays: exact blending, fixed colour range, ground-truth contours, atomic files."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from iadkit.viz import normalize_map, overlay, save_overlay, side_by_side


def grey(h: int = 20, w: int = 24, v: float = 0.5) -> np.ndarray:
    return np.full((h, w, 3), v, np.float32)


def test_map_at_low_end_leaves_the_photo_untouched():
    img = np.random.default_rng(0).random((20, 24, 3)).astype(np.float32)
    out = overlay(img, np.full((20, 24), -3.0), (0.0, 1.0))  # below lo: clipped to 0
    assert out.dtype == np.uint8 and out.shape == (20, 24, 3)
    np.testing.assert_array_equal(out, np.round(img * 255).astype(np.uint8))


def test_blend_weight_is_alpha_times_normalised_score():
    amap = np.zeros((20, 24), np.float32)
    amap[:, 12:] = 10.0  # right half at the top of the range (and beyond: clipped)
    amap[:, 6] = 2.5  # a column at a quarter of the range [0, 10]
    out = overlay(grey(), amap, (0.0, 10.0), alpha=0.6, cmap="jet").astype(int)
    top = np.array(colormaps["jet"](1.0)[:3])
    expected_top = np.round(255 * (0.4 * 0.5 + 0.6 * top)).astype(int)
    np.testing.assert_array_equal(out[5, 20], expected_top)
    quarter = np.array(colormaps["jet"](0.25)[:3])
    expected_q = np.round(255 * ((1 - 0.15) * 0.5 + 0.15 * quarter)).astype(int)
    assert np.abs(out[5, 6] - expected_q).max() <= 1
    np.testing.assert_array_equal(out[5, 0], [128, 128, 128])


def test_colour_range_is_fixed_not_stretched_per_image():
    """A good image whose map stays below `hi` must not be painted at full strength."""
    amap = np.linspace(0, 1, 20 * 24, dtype=np.float32).reshape(20, 24)
    weak = overlay(grey(), amap, (0.0, 100.0))
    strong = overlay(grey(), amap * 100, (0.0, 100.0))
    assert np.abs(weak.astype(int) - 128).max() <= 2
    assert np.abs(strong.astype(int) - 128).max() > 60


def test_mask_contour_is_drawn_on_the_boundary_only():
    mask = np.zeros((20, 24), bool)
    mask[6:14, 8:18] = True
    out = overlay(grey(), np.zeros((20, 24)), (0.0, 1.0), mask=mask)
    # The white line runs along the region's border; the inside and far outside stay grey.
    assert (out[6, 8:18] == 255).all() and (out[13, 8:18] == 255).all()
    assert (out[6:14, 8] == 255).all() and (out[6:14, 17] == 255).all()
    np.testing.assert_array_equal(out[10, 12], [128, 128, 128])
    np.testing.assert_array_equal(out[0, 0], [128, 128, 128])
    # The black halo around the white line keeps it visible on bright backgrounds.
    assert (out[4, 12] == 0).all() or (out[5, 12] == 0).all()


def test_map_and_mask_are_resized_to_the_image():
    amap = np.zeros((5, 6), np.float32)
    amap[:, 3:] = 1.0
    mask = np.zeros((5, 6), bool)
    out = overlay(grey(20, 24), amap, (0.0, 1.0), mask=mask)
    assert out.shape == (20, 24, 3)
    assert np.abs(out[10, 23].astype(int) - 128).max() > 60 and (out[10, 0] == 128).all()


def test_grayscale_and_uint8_inputs():
    g8 = np.full((10, 10), 200, np.uint8)
    out = overlay(g8, np.zeros((10, 10)), (0, 1))
    assert (out == 200).all()


def test_invalid_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="lo < hi"):
        overlay(grey(), np.zeros((20, 24)), (1.0, 1.0))
    with pytest.raises(ValueError, match="HxW"):
        overlay(grey(), np.zeros((2, 20, 24)), (0.0, 1.0))
    with pytest.raises(ValueError, match="HxWx3"):
        overlay(np.zeros((4, 4, 2)), np.zeros((4, 4)), (0.0, 1.0))


def test_normalize_map_handles_nan_and_inf():
    a = normalize_map(np.array([[np.nan, np.inf, -np.inf, 5.0]]), (0.0, 10.0))
    np.testing.assert_allclose(a, [[0.0, 1.0, 0.0, 0.5]])


def test_save_overlay_writes_the_same_pixels(tmp_path):
    amap = np.random.default_rng(1).random((20, 24)).astype(np.float32)
    mask = amap > 0.9
    path = save_overlay(tmp_path / "sub" / "o.png", grey(), amap, (0.0, 1.0), mask)
    assert path.exists() and not list(path.parent.glob(".*.tmp"))
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), overlay(grey(), amap, (0.0, 1.0), mask))


def test_side_by_side_puts_outlined_photo_left_of_overlay():
    mask = np.zeros((20, 24), bool)
    mask[5:10, 5:10] = True
    over = overlay(grey(), np.ones((20, 24)), (0.0, 1.0), mask)
    both = side_by_side(grey(), over, mask, gap=4)
    assert both.shape == (20, 24 + 4 + 24, 3)
    np.testing.assert_array_equal(both[:, 28:], over)
    assert (both[5, 5] == 255).all() and (both[15, 20] == 128).all()
