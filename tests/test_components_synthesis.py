"""DRAEM's anomaly synthesis: Perlin noise (formula), masks, texture sources (offline), the ten
texture augmentations (against PIL where PIL defines them) and the blend (exactly where the mask is)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from iadkit.components import textures as T
from iadkit.components.perlin import perlin_anomaly, perlin_mask, perlin_noise, perlin_octaves
from iadkit.components.synthesis import rotate
from iadkit.components.textures import (
    FolderTextures,
    ProceduralTextures,
    SkimageTextures,
    TextureSource,
    TextureSourceError,
    augment_texture,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class ConstantTexture(TextureSource):
    def __init__(self, value: float) -> None:
        self.value = value

    def sample(self, size, generator=None):
        return torch.full((3, *size), self.value)


# -- Perlin noise --------------------------------------------------------------------------------
def test_perlin_noise_matches_the_formula_at_a_cell_centre() -> None:
    # 1x1 lattice on a 4x4 image: pixel (2, 2) is at lattice coordinate (0.5, 0.5), the fade
    # weights are 0.5, so the value is sqrt(2)/4 * sum of the four corner ramps.
    noise = perlin_noise((4, 4), (1, 1), generator=_gen(5))
    angles = 2 * math.pi * torch.rand(2, 2, generator=_gen(5), dtype=torch.float64)
    gy, gx = torch.cos(angles), torch.sin(angles)
    ramps = [
        gy[0, 0] * 0.5 + gx[0, 0] * 0.5,
        gy[1, 0] * -0.5 + gx[1, 0] * 0.5,
        gy[0, 1] * 0.5 + gx[0, 1] * -0.5,
        gy[1, 1] * -0.5 + gx[1, 1] * -0.5,
    ]
    assert noise[2, 2].item() == pytest.approx(math.sqrt(2) / 4 * float(sum(ramps)), abs=1e-6)
    # pixel (1, 0): coordinate (0.25, 0): the x-fade is 0, so only the left corners count
    t = 0.25**3 * (0.25 * (0.25 * 6 - 15) + 10)
    left = (1 - t) * (gy[0, 0] * 0.25) + t * (gy[1, 0] * -0.75)
    assert noise[1, 0].item() == pytest.approx(math.sqrt(2) * float(left), abs=1e-6)


def test_perlin_noise_is_zero_on_lattice_points_bounded_and_any_size() -> None:
    noise = perlin_noise((64, 48), (4, 8), generator=_gen(0))
    assert noise.shape == (64, 48) and noise.dtype == torch.float32
    assert torch.all(noise[::16, ::6] == 0)  # lattice points (every 64/4 rows, 48/8 columns)
    assert noise.abs().max() <= 1.0
    assert noise.std() > 0.1
    # sizes that are not multiples of the lattice work too (the reference needs multiples)
    odd = perlin_noise((37, 23), (32, 4), generator=_gen(0))
    assert odd.shape == (37, 23) and torch.isfinite(odd).all() and odd.abs().max() <= 1.0
    # more lattice cells: a rougher field (larger neighbour differences)
    rough = perlin_noise((64, 64), (16, 16), generator=_gen(1)).diff(dim=1).abs().mean()
    smooth = perlin_noise((64, 64), (2, 2), generator=_gen(1)).diff(dim=1).abs().mean()
    assert rough > 3 * smooth


def test_perlin_octaves_add_halved_finer_octaves() -> None:
    g1, g2 = _gen(3), _gen(3)
    fractal = perlin_octaves((32, 32), (2, 2), octaves=3, persistence=0.5, generator=g1)
    parts = [perlin_noise((32, 32), (2 * 2**k, 2 * 2**k), generator=g2) * 0.5**k for k in range(3)]
    assert torch.allclose(fractal, sum(parts), atol=1e-6)


def test_rotate_by_right_angles_is_exact() -> None:
    x = torch.rand(2, 5, 5)
    assert torch.allclose(rotate(x, 90), torch.rot90(x, -1, (-2, -1)), atol=1e-6)
    y = torch.rand(4, 6)
    assert torch.allclose(rotate(y, 180), y.flip(0).flip(1), atol=1e-6)
    # corners of a rotated image come from outside: fill value
    assert rotate(torch.ones(9, 9), 45, fill=0.25)[0, 0].item() == pytest.approx(0.25)


def test_perlin_mask_is_deterministic_and_covers_a_few_percent() -> None:
    a = perlin_mask((64, 64), generator=_gen(7))
    b = perlin_mask((64, 64), generator=_gen(7))
    assert a.dtype == torch.bool and torch.equal(a, b)
    g = _gen(0)
    cover = torch.tensor([perlin_mask((64, 64), generator=g).float().mean().item() for _ in range(100)])
    # DRAEM's settings (threshold 0.5, scales 1-32, rotation): blobs of a few % of the image
    assert 0.02 < cover.mean() < 0.10
    assert (cover > 0).float().mean() > 0.8
    # a lower threshold gives larger masks
    g = _gen(0)
    low = torch.tensor([perlin_mask((64, 64), threshold=0.2, generator=g).float().mean().item() for _ in range(100)])
    assert low.mean() > 2 * cover.mean()


# -- texture sources -----------------------------------------------------------------------------
def test_skimage_textures_are_bundled_and_load_offline() -> None:
    source = SkimageTextures()
    assert len(source) == len(T.SKIMAGE_TEXTURES)
    for index in range(len(source)):  # every default image decodes from the wheel
        image = source.image(index)
        assert image.shape[0] == 3 and image.dtype == torch.float32
        assert image.min() >= 0.0 and image.max() <= 1.0 and image.std() > 0.02
    tex = source.sample((40, 56), _gen(0))
    assert tex.shape == (3, 40, 56)
    assert torch.equal(tex, source.sample((40, 56), _gen(0)))
    tex.zero_()  # the cached copy is not handed out
    assert torch.equal(source.sample((40, 56), _gen(0)), SkimageTextures(cache=False).sample((40, 56), _gen(0)))
    assert isinstance(T.default_texture_source(), SkimageTextures)
    with pytest.raises(TextureSourceError, match="rough_wall"):
        SkimageTextures(["brick.png", "rough_wall.png"])  # fetched on demand by skimage: refused


def test_procedural_textures_render_the_synthetic_scenes() -> None:
    source = ProceduralTextures()
    tex = source.sample((24, 40), _gen(1))
    assert tex.shape == (3, 24, 40) and tex.min() >= 0 and tex.max() <= 1 and tex.std() > 0.01
    assert torch.equal(tex, source.sample((24, 40), _gen(1)))
    metal = ProceduralTextures(["metal"]).sample((16, 16), _gen(0))
    assert torch.equal(metal[0], metal[1]) and torch.equal(metal[0], metal[2])  # grayscale kind
    with pytest.raises(TextureSourceError, match="fabric"):
        ProceduralTextures(["velvet"])


def test_folder_textures_read_images_recursively(tmp_path) -> None:
    with pytest.raises(TextureSourceError, match="no images"):
        FolderTextures(tmp_path)
    with pytest.raises(TextureSourceError, match="does not exist"):
        FolderTextures(tmp_path / "missing")
    (tmp_path / "banded").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "banded" / "a.png")
    Image.fromarray(np.full((10, 10), 200, np.uint8)).save(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    source = FolderTextures(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in source.paths] == ["b.jpg", "banded/a.png"]  # sorted
    seen = {round(source.sample((8, 8), _gen(s)).mean().item(), 2) for s in range(20)}
    assert len(seen) == 2  # both files are drawn


# -- texture augmentations -------------------------------------------------------------------------
def _uint8_image(seed: int, shape=(3, 17, 23)) -> torch.Tensor:
    g = _gen(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 255.0


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(np.round(x.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def _from_pil(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0).permute(2, 0, 1)


def test_equalize_and_posterize_and_solarize_match_pil() -> None:
    x = _uint8_image(0) ** 2  # skewed histogram
    x = torch.round(x * 255) / 255
    assert torch.allclose(T.equalize(x, None), _from_pil(ImageOps.equalize(_pil(x))), atol=1e-6)
    g = _gen(4)
    bits = int(torch.randint(1, 9, (), generator=_gen(4)))
    assert torch.allclose(T.posterize(x, g), _from_pil(ImageOps.posterize(_pil(x), bits)), atol=1e-6)
    solarized = T.solarize(x, _gen(0), p=1.0, threshold=(100, 100))
    assert torch.allclose(solarized, _from_pil(ImageOps.solarize(_pil(x), 100)), atol=1e-6)
    assert torch.equal(T.solarize(x, _gen(0), p=0.0), x)
    assert torch.equal(T.invert(x, None), 1 - x)


def test_sharpness_matches_pil_up_to_rounding() -> None:
    x = _uint8_image(1)
    factor = float(2.0 * torch.rand((), generator=_gen(2), dtype=torch.float64))
    expected = _from_pil(ImageEnhance.Sharpness(_pil(x)).enhance(factor))
    assert (T.enhance_sharpness(x, _gen(2)) - expected).abs().max() <= 1.5 / 255


def test_gamma_brightness_hue_autocontrast_and_rotation_behave_as_documented() -> None:
    x = _uint8_image(2).clamp(0.02, 0.98)
    gam = T.gamma_contrast(x, _gen(0))
    gammas = [torch.log(gam[c]).sum() / torch.log(x[c]).sum() for c in range(3)]
    assert all(0.5 <= float(gm) <= 2.0 for gm in gammas) and len({round(float(gm), 4) for gm in gammas}) == 3
    bright = T.multiply_and_add_brightness(torch.full((3, 4, 4), 0.5), _gen(0))
    assert torch.allclose(bright[0], bright[1]) and 0.5 * 0.8 - 30 / 255 <= bright.min() <= 0.5 * 1.2 + 30 / 255
    hue = T.add_hue_and_saturation(x, _gen(0))
    assert hue.shape == x.shape and not torch.allclose(hue, x) and hue.min() >= 0 and hue.max() <= 1
    low_contrast = 0.4 + 0.2 * x
    stretched = T.autocontrast(low_contrast, _gen(0), cutoff=(0, 0))
    assert torch.allclose(stretched.amin(dim=(1, 2)), torch.zeros(3)) and torch.allclose(
        stretched.amax(dim=(1, 2)), torch.ones(3)
    )
    assert torch.equal(T.autocontrast(torch.full((3, 4, 4), 0.3), _gen(0)), torch.full((3, 4, 4), 0.3))
    turned = T.affine_rotate(x, _gen(0))
    assert turned.shape == x.shape and not torch.allclose(turned, x)


def test_augment_texture_draws_distinct_augmentations_deterministically() -> None:
    x = SkimageTextures(["coffee.png"]).sample((32, 32), _gen(0))
    a = augment_texture(x, generator=_gen(9))
    assert torch.equal(a, augment_texture(x, generator=_gen(9)))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(augment_texture(x, count=0, generator=_gen(9)), x)
    # three distinct functions, in the drawn order
    order = torch.randperm(10, generator=_gen(9))[:3].tolist()
    g = _gen(9)
    torch.randperm(10, generator=g)
    y = x
    for index in order:
        y = T.TEXTURE_AUGMENTATIONS[index](y, g)
    assert torch.equal(a, y.clamp(0, 1)) and len(set(order)) == 3
    with pytest.raises(ValueError, match="count"):
        augment_texture(x, count=11)


# -- the blend ------------------------------------------------------------------------------------
def test_anomaly_changes_the_image_exactly_inside_the_mask() -> None:
    image = torch.full((3, 48, 64), 0.6)
    g = _gen(0)
    masks = 0
    for _ in range(10):
        out, mask = perlin_anomaly(image, ConstantTexture(0.1), skip_probability=0.0, augmentations=0, generator=g)
        changed = (out != image).any(0)
        assert torch.equal(changed, mask)  # opacity < 0.8 and texture != image: every mask pixel moves
        assert torch.equal(out[:, ~mask], image[:, ~mask])  # outside: bit-identical
        if mask.any():
            masks += 1
            # inside: (1 - b) * 0.1 + b * 0.6 with one b in [0, 0.8)
            values = out[:, mask].unique()
            assert values.numel() == 1
            beta = (values.item() - 0.1) / 0.5
            assert -1e-6 <= beta < 0.8
    assert masks >= 8


def test_anomaly_with_real_textures_and_the_skip_probability() -> None:
    image = ProceduralTextures(["wood"]).sample((64, 64), _gen(5))
    source = SkimageTextures()
    g = _gen(1)
    skipped = 0
    for _ in range(40):
        out, mask = perlin_anomaly(image, source, generator=g)
        assert out.shape == image.shape and mask.shape == (64, 64) and mask.dtype == torch.bool
        changed = (out != image).any(0)
        assert not (changed & ~mask).any()
        if mask.any():
            assert changed[mask].float().mean() > 0.95  # textures rarely equal the image exactly
        if torch.equal(out, image):
            skipped += 1
    assert 10 <= skipped <= 32  # DRAEM: half of the draws keep the good image (plus empty masks)
    a = perlin_anomaly(image, source, generator=_gen(3))
    b = perlin_anomaly(image, source, generator=_gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="3, H, W"):
        perlin_anomaly(image[0], source)
