"""General images offline: the stand-in for ImageNet where a method needs "any natural image".

EfficientAD uses ImageNet twice: to distil its patch description network (the teacher
regresses a pretrained network's features on ImageNet images) and, during training, as the
"penalty" images on which the student's output is pushed towards zero. ImageNet cannot be
downloaded here, so `GeneralImages` draws from what is on disk:

- **photos**: the photographs bundled in the scikit-image wheel (`SKIMAGE_TEXTURES`: brick,
  grass, gravel, moon, coins, text, a page, the cameraman, cells, a clock, coffee, a cat, an
  astronaut, tissue, a retina, a rocket, the Hubble deep field, a motorcycle, a chessboard,
  a colour chart), read from the installed package, never fetched;
- **textures** (optional): the synthetic data set's fabric, brushed-metal and wood renderers
  (`ProceduralTextures`), at random layouts.

Twenty photographs are few, so every draw is a random resized crop (ImageNet training's
augmentation: a window of 10-100 % of the photo's area, aspect ratio 3/4-4/3, resized to the
requested size, antialiased; photographs are first brought to at most 512 px), flipped left-right with probability 1/2 and turned to grayscale
with a given probability (EfficientAD: 0.1 for distillation, 0.3 for the penalty).
A draw is a pure function of the torch generator's state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from iadkit.components.textures import SKIMAGE_TEXTURES, FolderTextures, ProceduralTextures, SkimageTextures

# Photographs are kept with their longer side at most this (a crop of a larger one would be
# downscaled anyway, and antialiased resizing from 1000 px costs ~0.1 s per draw).
MAX_SIDE = 512
# ITU-R 601 luma, the weights torchvision's rgb_to_grayscale uses.
_LUMA = (0.2989, 0.587, 0.114)


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> the same shape with three equal luma channels."""
    w = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(3, 1, 1)
    luma = (images * w).sum(dim=-3, keepdim=True)
    return luma.expand_as(images).contiguous()


class GeneralImages:
    """Random general images for distillation and penalties, offline (see the module docstring).

    Parameters
    ----------
    photos
        Names of scikit-image's bundled photographs to draw from (`SKIMAGE_TEXTURES`).
    textures
        Also draw the synthetic fabric / metal / wood renderers (one draw in four).
    min_area
        Smallest crop, as a fraction of the photograph's area.
    folder
        Draw from every image under this folder instead of the photographs (e.g. ImageNet's
        ``train`` folder, the paper's source); images are decoded on each draw.
    """

    def __init__(
        self,
        photos: Sequence[str] = SKIMAGE_TEXTURES,
        *,
        textures: bool = False,
        min_area: float = 0.1,
        folder: str | os.PathLike[str] | None = None,
    ) -> None:
        if not 0.0 < min_area <= 1.0:
            raise ValueError(f"min_area must be in (0, 1], got {min_area}")
        self._photos: SkimageTextures | FolderTextures = (
            FolderTextures(os.fspath(folder)) if folder is not None else SkimageTextures(photos, cache=False)
        )
        self._keep_decoded = folder is None  # 20 photos fit in memory; a folder may not
        self._decoded: dict[int, torch.Tensor] = {}
        self._textures = ProceduralTextures() if textures else None
        self.min_area = float(min_area)

    def __len__(self) -> int:
        return len(self._photos)

    def _photo(self, index: int) -> torch.Tensor:
        if not self._keep_decoded:
            return self._photos.image(index)
        if index not in self._decoded:  # each photo decoded once, its longer side at most MAX_SIDE
            photo = self._photos.image(index)
            scale = MAX_SIDE / max(photo.shape[-2:])
            if scale < 1:
                size = (max(1, round(photo.shape[-2] * scale)), max(1, round(photo.shape[-1] * scale)))
                photo = F.interpolate(photo[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
            self._decoded[index] = photo.clamp(0.0, 1.0)
        return self._decoded[index]

    def _crop(self, photo: torch.Tensor, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
        _, h, w = photo.shape
        area = h * w * (self.min_area + (1.0 - self.min_area) * float(torch.rand((), generator=g)))
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(torch.rand((), generator=g)))
        ch = max(1, min(h, round(math.sqrt(area / ratio))))
        cw = max(1, min(w, round(math.sqrt(area * ratio))))
        top = int(torch.randint(0, h - ch + 1, (), generator=g))
        left = int(torch.randint(0, w - cw + 1, (), generator=g))
        crop = photo[:, top : top + ch, left : left + cw]
        out = F.interpolate(crop[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        return out.clamp(0.0, 1.0)

    def sample(
        self, size: int | tuple[int, int], generator: torch.Generator, *, grayscale: float = 0.0
    ) -> torch.Tensor:
        """One image, float32 [3, H, W] in [0, 1].

        Parameters
        ----------
        size
            Output (H, W) or a side.
        generator
            The source of every random choice.
        grayscale
            Probability of turning the image to grayscale.
        """
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if self._textures is not None and float(torch.rand((), generator=generator)) < 0.25:
            image = self._textures.sample(hw, generator)
        else:
            index = int(torch.randint(len(self._photos), (), generator=generator))
            image = self._crop(self._photo(index), hw, generator)
        if float(torch.rand((), generator=generator)) < 0.5:
            image = image.flip(-1)
        if grayscale > 0 and float(torch.rand((), generator=generator)) < grayscale:
            image = to_grayscale(image)
        return image

    def batch(
        self, n: int, size: int | tuple[int, int], generator: torch.Generator, *, grayscale: float = 0.0
    ) -> torch.Tensor:
        """`n` images stacked: [n, 3, H, W] in [0, 1]."""
        return torch.stack([self.sample(size, generator, grayscale=grayscale) for _ in range(n)])


__all__ = ["GeneralImages", "to_grayscale"]
