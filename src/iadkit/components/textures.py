"""Texture sources for anomaly synthesis, and DRAEM's random texture augmentation.

DRAEM fills its Perlin-shaped anomalies with images from an external texture data set: the
paper uses the Describable Textures Dataset (DTD, Cimpoi et al. 2014, 5640 images of 47
texture classes), which the reference code globs as ``<dtd>/images/*/*.jpg``, resizes to the
training size and distorts with three random augmentations. DTD is a 600 MB download, so it
cannot be our default. Three sources work offline:

- `SkimageTextures` (**our default**): images bundled inside the scikit-image wheel, read
  straight from its ``skimage/data`` folder (never through ``skimage.data.*()`` fetchers,
  which may download). The default set `SKIMAGE_TEXTURES` mixes real textures (brick, grass,
  gravel) with texture-rich photographs (moon surface, coins, fur, coffee, tissue, stars, ...).
  Images that scikit-image fetches on demand (e.g. ``rough_wall``) are not used.
- `ProceduralTextures`: the synthetic data set's woven fabric, brushed metal and wood
  renderers (`iadkit.data.synth_scenes`), at random phase and orientation.
- `FolderTextures`: every image under a folder, recursively, e.g. a DTD copy
  (``FolderTextures("dtd/images")``), which restores the paper's setting.

A source's ``sample(size, generator)`` returns a float32 [3, H, W] image in [0, 1], a pure
function of the generator state.

`augment_texture` applies DRAEM's texture distortion: 3 distinct augmentations drawn from a
list of 10 (the reference's imgaug list), in the drawn order. All ten are implemented in
torch; where imgaug/PIL semantics are approximated, the function's docstring says how.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from iadkit.components.synthesis import _hsv_to_rgb, _rgb_to_hsv, rotate
from iadkit.errors import IadkitError

# Bundled with scikit-image (in the wheel's skimage/data folder; checked offline on 0.26).
SKIMAGE_TEXTURES: tuple[str, ...] = (
    "brick.png",
    "grass.png",
    "gravel.png",
    "moon.png",
    "coins.png",
    "text.png",
    "page.png",
    "camera.png",
    "cell.png",
    "clock_motion.png",
    "coffee.png",
    "chelsea.png",
    "astronaut.png",
    "ihc.png",
    "retina.jpg",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "chessboard_RGB.png",
    "color.png",
)
PROCEDURAL_TEXTURES: tuple[str, ...] = ("fabric", "metal", "wood")


class TextureSourceError(IadkitError, ValueError):
    """A texture source cannot deliver images; the message says what is missing and what to do."""


def _to_chw_unit(arr: np.ndarray) -> torch.Tensor:
    """HxW or HxWxC (C in 1, 3, 4) uint8/uint16/float array -> float32 [3, H, W] in [0, 1]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = arr[:, :, :3]  # drop alpha
    if arr.dtype == np.uint8:
        t = torch.from_numpy(arr.astype(np.float32) / 255.0)
    elif arr.dtype == np.uint16:
        t = torch.from_numpy(arr.astype(np.float32) / 65535.0)
    else:
        t = torch.from_numpy(np.clip(arr.astype(np.float32), 0.0, 1.0))
    t = t.permute(2, 0, 1)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t.contiguous()


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize [3, h, w] to `size` (bilinear, antialiased), as DRAEM resizes each texture image."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None], size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].clamp(0.0, 1.0)


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise ValueError(f"texture size must be (H, W) with positive entries, got {tuple(size)}")
    return int(size[0]), int(size[1])


class TextureSource(ABC):
    """Where anomaly textures come from: ``sample(size, generator)`` -> [3, H, W] in [0, 1]."""

    @abstractmethod
    def sample(self, size: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
        """One random texture image.

        Parameters
        ----------
        size
            Output (H, W).
        generator
            Source of randomness: the same state gives the same texture.
        """


class _ImageListTextures(TextureSource):
    """A texture source drawing uniformly from a fixed list of image files (decoded lazily)."""

    def __init__(self, paths: Sequence[Path], reader: Callable[[Path], np.ndarray], cache: bool) -> None:
        self.paths = list(paths)
        self.cache = cache
        self._reader = reader
        self._resized: dict[tuple[int, tuple[int, int]], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> torch.Tensor:
        """The image file `index` decoded at its own size, float32 [3, h, w] in [0, 1]."""
        return _to_chw_unit(self._reader(self.paths[index]))

    def sample(self, size: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
        size = _check_size(size)
        index = int(torch.randint(len(self.paths), (), generator=generator))
        if not self.cache:
            return _resize(self.image(index), size)
        # Training draws at one size: keep each file resized to it (decoding and antialiased
        # resizing of a large photo cost ~50 ms, a cached copy nothing).
        key = (index, size)
        if key not in self._resized:
            self._resized[key] = _resize(self.image(index), size)
        return self._resized[key].clone()


def skimage_data_dir() -> Path:
    """The folder of images bundled in the installed scikit-image (no network involved)."""
    return Path(str(resources.files("skimage") / "data"))


class SkimageTextures(_ImageListTextures):
    """Images bundled with scikit-image, each resized to the requested size (our default source).

    Parameters
    ----------
    names
        File names inside ``skimage/data``; default `SKIMAGE_TEXTURES`. Every name must be
        present: a missing one raises `TextureSourceError` (no download is attempted).
    cache
        Keep every image resized to each requested size in memory (the default set at
        256 x 256: 16 MB).
    """

    def __init__(self, names: Sequence[str] = SKIMAGE_TEXTURES, *, cache: bool = True) -> None:
        folder = skimage_data_dir()
        if not names:
            raise TextureSourceError("SkimageTextures needs at least one image name")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise TextureSourceError(
                f"scikit-image images not bundled in {folder}: {', '.join(missing)}. "
                "Use names from SKIMAGE_TEXTURES, or ProceduralTextures / FolderTextures instead."
            )
        self.names = tuple(names)
        super().__init__([folder / n for n in names], _read_pillow, cache)


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)


class FolderTextures(_ImageListTextures):
    """Every image file under a folder (recursively), e.g. DTD's ``images`` folder, the paper's source.

    Parameters
    ----------
    root
        Folder to search; files are sorted by path so a seed picks the same file everywhere.
    cache
        Keep every image resized to each requested size in memory (off by default: DTD's
        5640 images at 256 x 256 take 4.4 GB).
    """

    def __init__(self, root: str | os.PathLike[str], *, cache: bool = False) -> None:
        from iadkit.data.io import IMAGE_EXTENSIONS, read_image

        self.root = Path(root)
        if not self.root.is_dir():
            raise TextureSourceError(f"texture folder {self.root} does not exist; give a folder of images (e.g. DTD)")
        paths = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise TextureSourceError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}; "
                "point FolderTextures at a folder of textures"
            )
        super().__init__(paths, read_image, cache)


class ProceduralTextures(TextureSource):
    """The synthetic data set's texture renderers (fabric, brushed metal, wood).

    Each draw picks a kind, samples its random layout with a numpy generator seeded from the
    torch generator, renders a square of side max(H, W) and crops it. Grayscale kinds (metal)
    are repeated over 3 channels.

    Parameters
    ----------
    kinds
        Any of `PROCEDURAL_TEXTURES`.
    """

    def __init__(self, kinds: Sequence[str] = PROCEDURAL_TEXTURES) -> None:
        from iadkit.data.synth_scenes import SCENES

        unknown = [k for k in kinds if k not in PROCEDURAL_TEXTURES]
        if unknown or not kinds:
            raise TextureSourceError(
                f"unknown procedural textures {unknown or list(kinds)}; choose from {', '.join(PROCEDURAL_TEXTURES)}"
            )
        self.kinds = tuple(kinds)
        self._scenes = {k: SCENES[k] for k in self.kinds}

    def sample(self, size: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
        h, w = _check_size(size)
        kind = self.kinds[int(torch.randint(len(self.kinds), (), generator=generator))]
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        scene = self._scenes[kind]
        side = max(h, w)
        rendered = scene.render(scene.sample(np.random.default_rng(seed), side), side)
        return _to_chw_unit(rendered.image)[:, :h, :w].contiguous()


def default_texture_source() -> TextureSource:
    """Our default anomaly texture source: `SkimageTextures` with `SKIMAGE_TEXTURES` (offline)."""
    return SkimageTextures()


# -- DRAEM's texture augmentations ---------------------------------------------------------------
def _u(lo: float, hi: float, g: torch.Generator | None) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64))


def _luma(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]


def gamma_contrast(x: torch.Tensor, g: torch.Generator | None, gamma: tuple[float, float] = (0.5, 2.0)) -> torch.Tensor:
    """imgaug ``GammaContrast((0.5, 2.0), per_channel=True)``: x**gamma, one gamma per channel."""
    gammas = torch.tensor([_u(*gamma, g) for _ in range(x.shape[0])], dtype=x.dtype, device=x.device)
    return x.clamp(0, 1) ** gammas[:, None, None]


def multiply_and_add_brightness(
    x: torch.Tensor,
    g: torch.Generator | None,
    mul: tuple[float, float] = (0.8, 1.2),
    add: tuple[float, float] = (-30, 30),
) -> torch.Tensor:
    """imgaug ``MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30))``: the brightness channel
    Y (of YCrCb, one of imgaug's random colour spaces) becomes Y*mul + add/255, chroma kept."""
    y = _luma(x)
    new_y = y * _u(*mul, g) + _u(*add, g) / 255.0
    return (x + (new_y - y)[None]).clamp(0, 1)


def enhance_sharpness(
    x: torch.Tensor, g: torch.Generator | None, factor: tuple[float, float] = (0.0, 2.0)
) -> torch.Tensor:
    """imgaug ``pillike.EnhanceSharpness()`` (factor in (0, 2)): PIL's blend between the image
    smoothed by the 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]]/13 (border pixels kept) and the image."""
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(x.shape[0], 1, 3, 3)
    smooth = x.clone()
    smooth[:, 1:-1, 1:-1] = F.conv2d(x[None], kernel, groups=x.shape[0])[0]
    return torch.lerp(smooth, x, _u(*factor, g)).clamp(0, 1)


def add_hue_and_saturation(
    x: torch.Tensor, g: torch.Generator | None, value: tuple[float, float] = (-50, 50)
) -> torch.Tensor:
    """imgaug ``AddToHueAndSaturation((-50, 50), per_channel=True)``: independent adds to hue
    and saturation in imgaug's 8-bit units (255 = a full hue turn / full saturation)."""
    hsv = _rgb_to_hsv(x)
    hue = (hsv[0] + _u(*value, g) / 255.0) % 1.0
    sat = (hsv[1] + _u(*value, g) / 255.0).clamp(0, 1)
    return _hsv_to_rgb(torch.stack([hue, sat, hsv[2]])).clamp(0, 1)


def solarize(
    x: torch.Tensor, g: torch.Generator | None, p: float = 0.5, threshold: tuple[float, float] = (32, 128)
) -> torch.Tensor:
    """imgaug ``Solarize(0.5, threshold=(32, 128))``: with probability p, invert the values at or
    above a threshold drawn uniformly from (32, 128)/255."""
    apply = float(torch.rand((), generator=g)) < p
    t = _u(*threshold, g) / 255.0
    return torch.where(x >= t, 1.0 - x, x) if apply else x


def posterize(x: torch.Tensor, g: torch.Generator | None, bits: tuple[int, int] = (1, 8)) -> torch.Tensor:
    """imgaug ``Posterize()`` (nb_bits 1..8): keep the top `bits` bits of each 8-bit value."""
    n = int(torch.randint(bits[0], bits[1] + 1, (), generator=g))
    levels = torch.round(x.clamp(0, 1) * 255.0).to(torch.int64)
    kept = levels & (0xFF & ~((1 << (8 - n)) - 1))
    return kept.to(x.dtype) / 255.0


def invert(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """imgaug ``Invert()``: 1 - x (always applied, imgaug's default p=1)."""
    return 1.0 - x


def autocontrast(x: torch.Tensor, g: torch.Generator | None, cutoff: tuple[float, float] = (0, 20)) -> torch.Tensor:
    """imgaug ``pillike.Autocontrast()`` (cutoff 0-20 %): per channel, map the `cutoff` % quantile
    to 0 and the (100 - cutoff) % quantile to 1, clipping; a flat channel is left unchanged.
    (PIL cuts whole histogram bins; quantiles are the continuous version of the same rule.)"""
    c = int(torch.randint(int(cutoff[0]), int(cutoff[1]) + 1, (), generator=g)) / 100.0
    flat = x.reshape(x.shape[0], -1)
    lo = torch.quantile(flat, c, dim=1)[:, None, None]
    hi = torch.quantile(flat, 1.0 - c, dim=1)[:, None, None]
    span = hi - lo
    stretched = ((x - lo) / span.clamp_min(1e-12)).clamp(0, 1)
    return torch.where(span > 1e-6, stretched, x)


def equalize(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """imgaug ``pillike.Equalize()``: PIL's per-channel histogram equalisation on 256 levels."""
    levels = torch.round(x.clamp(0, 1) * 255.0).to(torch.int64)
    out = torch.empty_like(x)
    for ch in range(x.shape[0]):
        v = levels[ch].flatten()
        hist = torch.bincount(v, minlength=256)
        nonzero = hist[hist > 0]
        step = int((nonzero.sum() - nonzero[-1]) // 255)  # PIL: leave out the last used level
        if step == 0:  # one level only (or too few pixels): PIL returns the channel unchanged
            out[ch] = x[ch]
            continue
        lut = (torch.cumsum(hist, 0) - hist + step // 2) // step  # PIL's lookup table
        out[ch] = lut.clamp(max=255)[levels[ch]].to(x.dtype) / 255.0
    return out


def affine_rotate(x: torch.Tensor, g: torch.Generator | None, degrees: tuple[float, float] = (-45, 45)) -> torch.Tensor:
    """imgaug ``Affine(rotate=(-45, 45))``: rotate about the centre, bilinear, black outside."""
    return rotate(x, _u(*degrees, g))


# DRAEM's list, in the reference's order.
TEXTURE_AUGMENTATIONS: tuple[Callable[[torch.Tensor, torch.Generator | None], torch.Tensor], ...] = (
    gamma_contrast,
    multiply_and_add_brightness,
    enhance_sharpness,
    add_hue_and_saturation,
    solarize,
    posterize,
    invert,
    autocontrast,
    equalize,
    affine_rotate,
)


def augment_texture(texture: torch.Tensor, *, count: int = 3, generator: torch.Generator | None = None) -> torch.Tensor:
    """DRAEM's texture distortion: `count` distinct augmentations of `TEXTURE_AUGMENTATIONS`,
    drawn without replacement and applied in the drawn order. [3, H, W] in [0, 1] -> same.

    Parameters
    ----------
    texture
        [3, H, W] float image in [0, 1].
    count
        How many augmentations (DRAEM: 3 of its 10).
    generator
        Source of randomness.
    """
    if texture.ndim != 3 or texture.shape[0] != 3:
        raise ValueError(f"expected a texture [3, H, W] in [0, 1], got shape {tuple(texture.shape)}")
    if not 0 <= count <= len(TEXTURE_AUGMENTATIONS):
        raise ValueError(f"count must be in [0, {len(TEXTURE_AUGMENTATIONS)}], got {count}")
    order = torch.randperm(len(TEXTURE_AUGMENTATIONS), generator=generator)[:count].tolist()
    x = texture
    for index in order:
        x = TEXTURE_AUGMENTATIONS[index](x, generator)
    return x.clamp(0, 1)


__all__ = [
    "PROCEDURAL_TEXTURES",
    "SKIMAGE_TEXTURES",
    "TEXTURE_AUGMENTATIONS",
    "FolderTextures",
    "ProceduralTextures",
    "SkimageTextures",
    "TextureSource",
    "TextureSourceError",
    "add_hue_and_saturation",
    "affine_rotate",
    "augment_texture",
    "autocontrast",
    "default_texture_source",
    "enhance_sharpness",
    "equalize",
    "gamma_contrast",
    "invert",
    "multiply_and_add_brightness",
    "posterize",
    "skimage_data_dir",
    "solarize",
]
