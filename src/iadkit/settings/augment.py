"""IM-IAD's few-shot augmentation: every shot becomes n + 1 variants of itself.

With few good images, IM-IAD (``augmentation/domain_gen.py``, enabled by ``-fda``, with
``-fnd n`` variants and ``-fat`` types) expands each shot into ``n + 1`` images. Variant i of
a shot applies, for each chosen type, the i-th step of a fixed schedule:

==============  ===========================================================================
type            variant i (i = 0 .. n; variant 0 is the shot itself)
==============  ===========================================================================
rotation        rotate by i * 360 / (n + 1) degrees, clockwise, about the centre
scale           zoom by linspace(1, 0.5, n + 1)[i] about the centre
translate       shift by up to linspace(0, 0.5, n + 1)[i] of the width / height
flip            i = 1: horizontal, 2: vertical, 3: both, >= 4: each with probability 0.5
color_jitter    brightness and contrast factors [1, linspace(0.5, 1.5, n)][i]
perspective     random corner displacement of scale linspace(0, 0.5, n + 1)[i]
==============  ===========================================================================

Applied in the reference's order: perspective, colour, flip, translate, scale, rotation. The
geometric operations are torchvision's own (``affine`` with nearest-neighbour sampling and
zero fill, ``perspective`` bilinear), as in the reference.

paper -> reference code -> ours
-------------------------------
- rotation, scale: IM-IAD (fixed angles / factors) -> ``RandomAffine((d, d))``,
  ``RandomAffine(0, scale=(s, s))`` -> the same calls, ``torchvision.transforms.functional.affine``.
- translate, perspective, flip at i >= 4: random in the reference (torchvision's parameter
  draws from the global RNG) -> the same draws (``RandomAffine.get_params``,
  ``RandomPerspective.get_params``) under a generator seeded by (seed, shot path, variant),
  so a cell is reproducible and every method sees the same images.
- color_jitter: the reference passes the schedule value ``b`` to ``ColorJitter(brightness=b,
  contrast=b)``, which draws a factor in [max(0, 1 - b), 1 + b] in a random order of
  operations, so even variant 0 is jittered (b = 1: factor in [0, 2]) -> ours applies the
  schedule value itself as the factor (brightness, then contrast), which is what the
  schedule describes ("colour jitter 0.5 -> 1.5") and keeps variant 0 the original shot.
- the reference inserts each variant's transforms into one shared list, so they pile up over
  the variants and the shots (variant i of the second shot also applies all of the first
  shot's) -> ours applies to each variant only its own step, the documented intent.
- the reference augments after resizing to the model input; ours augments the decoded image
  before the model's preprocessing. Translation and perspective are fractions of the size and
  rotation is about the centre, so a square image gets the same geometry (up to resampling);
  a non-square one is rotated on its own canvas.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from iadkit.types import Sample

AUGMENTATIONS = ("rotation", "scale", "translate", "flip", "color_jitter", "perspective")
DEFAULT_AUGMENTATIONS = ("rotation",)  # IM-IAD's example run: -fda -fnd 4 -fat rotation
DEFAULT_N_AUGMENT = 4


@dataclass(frozen=True)
class VariantStep:
    """The schedule values of one variant (what `augment_image` applies)."""

    angle: float
    scale: float
    translate: float  # the largest shift, as a fraction of width / height
    flips: tuple[str, ...]  # "h", "v", or "h?" / "v?" for a coin flip
    brightness: float
    contrast: float
    perspective: float


def variant_schedule(n_augment: int) -> list[VariantStep]:
    """The n + 1 steps of IM-IAD's schedule (variant 0 changes nothing)."""
    n = int(n_augment)
    degrees = np.linspace(0, 360, n + 1, endpoint=False)
    scales = np.linspace(1, 0.5, n + 1)
    translates = np.linspace(0, 0.5, n + 1)
    jitter = np.concatenate(([1.0], np.linspace(0.5, 1.5, n)))
    perspectives = np.linspace(0, 0.5, n + 1)
    flip_table = [("h",), ("v",), ("h", "v"), ("h?", "v?")]
    return [
        VariantStep(
            angle=float(degrees[i]),
            scale=float(scales[i]),
            translate=float(translates[i]),
            flips=() if i == 0 else flip_table[min(i - 1, 3)],
            brightness=float(jitter[i]),
            contrast=float(jitter[i]),
            perspective=float(perspectives[i]),
        )
        for i in range(n + 1)
    ]


def check_augmentations(augmentations: str | Sequence[str]) -> tuple[str, ...]:
    """``"rotation+flip"`` or ``["rotation", "flip"]`` -> ("rotation", "flip"); unknown names refused."""
    from iadkit.settings import SettingError

    names = augmentations.split("+") if isinstance(augmentations, str) else list(augmentations)
    names = [str(n).strip() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown or not names:
        raise SettingError(
            f"setting 'few_shot': augmentations must name at least one of {', '.join(AUGMENTATIONS)} "
            f"(joined with '+' on the command line), got {augmentations!r}"
        )
    return tuple(dict.fromkeys(names))


def variant_seed(seed: int, key: str, variant: int) -> int:
    """The seed of one variant's random draws: (seed, the shot's path, variant index)."""
    return int(np.random.SeedSequence([int(seed) % 2**63, zlib.crc32(key.encode()), int(variant)]).generate_state(1)[0])


def augment_image(image: np.ndarray, step: VariantStep, augmentations: Sequence[str], *, seed: int) -> np.ndarray:
    """Apply one variant's step to an HxW or HxWxC image; same shape and dtype back.

    Parameters
    ----------
    image : ndarray
        uint8, uint16, or float in [0, 1].
    step : VariantStep
        The variant's schedule values (`variant_schedule`).
    augmentations : sequence of str
        Which types to apply (a subset of `AUGMENTATIONS`).
    seed : int
        Seed of the random parts (translation, perspective, coin-flip flips).
    """
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    x, restore = _to_unit_chw(image)
    c, h, w = x.shape
    fill = [0.0] * c
    chosen = set(augmentations)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if "perspective" in chosen and step.perspective > 0:
            start, end = T.RandomPerspective.get_params(w, h, step.perspective)
            x = TF.perspective(x, start, end, interpolation=T.InterpolationMode.BILINEAR, fill=fill)
        if "color_jitter" in chosen:
            x = TF.adjust_contrast(TF.adjust_brightness(x, step.brightness), step.contrast)
        if "flip" in chosen:
            for f in step.flips:
                if f.endswith("?") and not bool(torch.rand(1).item() < 0.5):
                    continue
                x = TF.hflip(x) if f.startswith("h") else TF.vflip(x)
        if "translate" in chosen and step.translate > 0:
            _, (tx, ty), _, _ = T.RandomAffine.get_params(
                [0.0, 0.0], [step.translate, step.translate], None, None, [w, h]
            )
            x = TF.affine(x, 0.0, [tx, ty], 1.0, [0.0, 0.0], interpolation=T.InterpolationMode.NEAREST, fill=fill)
        if "scale" in chosen and step.scale != 1.0:
            x = TF.affine(x, 0.0, [0, 0], step.scale, [0.0, 0.0], interpolation=T.InterpolationMode.NEAREST, fill=fill)
        if "rotation" in chosen and step.angle != 0.0:
            x = TF.affine(x, step.angle, [0, 0], 1.0, [0.0, 0.0], interpolation=T.InterpolationMode.NEAREST, fill=fill)
    return restore(x)


def fewshot_variants(
    image: np.ndarray, n_augment: int, augmentations: Sequence[str], *, seed: int = 0, key: str = ""
) -> list[np.ndarray]:
    """All n + 1 variants of one image (variant 0 is the image itself)."""
    return [
        image if i == 0 else augment_image(image, step, augmentations, seed=variant_seed(seed, key, i))
        for i, step in enumerate(variant_schedule(n_augment))
    ]


@dataclass(frozen=True)
class AugmentedSample(Sample):
    """A few-shot variant of another sample, computed when it is loaded (never stored).

    `path` is the source's path plus ``#fewshot-aug<i>of<n+1>``, a stable identifier.
    """

    source: Sample | None = None
    variant: int = 0
    n_augment: int = DEFAULT_N_AUGMENT
    augmentations: tuple[str, ...] = DEFAULT_AUGMENTATIONS
    seed: int = 0

    def load_image(self) -> np.ndarray:
        if self.source is None:
            raise ValueError(f"{self.path}: an augmented sample needs its source sample")
        step = variant_schedule(self.n_augment)[self.variant]
        return augment_image(
            self.source.load_image(),
            step,
            self.augmentations,
            seed=variant_seed(self.seed, self.source.path, self.variant),
        )


def augmented_samples(sample: Sample, n_augment: int, augmentations: Sequence[str], seed: int) -> list[Sample]:
    """The shot itself followed by its n augmented variants (lazy `AugmentedSample`s)."""
    out: list[Sample] = [sample]
    for i in range(1, n_augment + 1):
        out.append(
            AugmentedSample(
                path=f"{sample.path}#fewshot-aug{i}of{n_augment + 1}",
                label=sample.label,
                category=sample.category,
                defect_type=sample.defect_type,
                source=sample,
                variant=i,
                n_augment=n_augment,
                augmentations=tuple(augmentations),
                seed=seed,
            )
        )
    return out


def _to_unit_chw(image: np.ndarray) -> tuple[torch.Tensor, Any]:
    """HxW(xC) uint8/uint16/float array -> CxHxW float32 in [0, 1], and the way back."""
    arr = np.asarray(image)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {arr.shape}")
    dtype = arr.dtype
    if dtype == np.uint8:
        scale = 255.0
    elif dtype == np.uint16:
        scale = 65535.0
    elif np.issubdtype(dtype, np.floating):
        scale = 1.0
    else:
        raise ValueError(f"unsupported image dtype {dtype}; use uint8, uint16 or float in [0, 1]")
    x = torch.from_numpy(arr.astype(np.float32) / scale).permute(2, 0, 1).contiguous()

    def restore(t: torch.Tensor) -> np.ndarray:
        out = t.permute(1, 2, 0).numpy()
        if scale != 1.0:
            out = np.clip(np.rint(out * scale), 0, scale).astype(dtype)
        else:
            out = out.astype(dtype)
        return out[:, :, 0] if squeeze else out

    return x, restore
