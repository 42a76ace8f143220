"""DRAEM's anomaly synthesis: thresholded, rotated Perlin-noise masks filled with a texture.

DRAEM (Zavrtanik, Kristan, Skočaj, "DRAEM - A discriminatively trained reconstruction embedding
for surface anomaly detection", ICCV 2021) shapes its synthetic anomalies with 2-D Perlin
noise: random gradient vectors on a coarse lattice, interpolated with the quintic fade
6t^5 - 15t^4 + 10t^3, rotated at random and thresholded. With a random lattice scale per
axis this gives irregular smooth-edged regions, from thin streaks to large blobs (about 5% of
the image on average at the default settings).

========================  ==================================  ===================================
paper                     reference code (VitjanZ/DRAEM)      ours
========================  ==================================  ===================================
Perlin noise              ``rand_perlin_2d_np``: one octave,  `perlin_noise`: the same lattice
                          lattice ``res = (rx, ry)`` cells,   noise (pixel i at lattice
                          value scaled by sqrt(2)             coordinate i * res / size, sqrt(2)
                                                              scale); sizes need not be multiples
                                                              of ``res``
random scale              ``2**randint(0, 6)`` per axis       ``scale_exponents=(0, 6)``: 2**k,
                          (1 to 32 cells)                     k uniform in [0, 6), per axis
(octaves)                 ``rand_perlin_2d_octaves``          `perlin_octaves`, ``octaves=1``
                          exists but is not used              by default as in the data loader
random rotation           imgaug ``Affine(rotate=(-90, 90))`` `rotate` by an angle uniform in
                          (bilinear, fill 0)                  ``rotation=(-90, 90)``, bilinear,
                                                              fill 0
threshold                 noise > 0.5                         ``threshold=0.5``
texture source            DTD, 3 of 10 imgaug augmentations   a `TextureSource` (default:
                                                              scikit-image's bundled images, see
                                                              `iadkit.components.textures`),
                                                              `augment_texture` (all ten, torch)
blend                     (1-b) T M + b I M + I (1-M),        the same, b uniform in
                          b = 0.8 * rand()                    ``opacity=(0, 0.8)``; pixels
                                                              outside M are copied bit for bit
no anomaly                with probability 0.5 the good       ``skip_probability=0.5``
                          image and an empty mask
========================  ==================================  ===================================

Everything draws from a `torch.Generator`, so a mask is a pure function of the generator's
state; nothing touches numpy's or Python's global random state.
"""

from __future__ import annotations

import math

import torch

from iadkit.components.synthesis import _check_image, rotate
from iadkit.components.textures import TextureSource, augment_texture

PERLIN_SCALE_EXPONENTS = (0, 6)  # scale 2**k cells per axis, k uniform in [0, 6): DRAEM's loader
PERLIN_THRESHOLD = 0.5
PERLIN_ROTATION = (-90.0, 90.0)  # degrees, DRAEM's imgaug Affine(rotate=(-90, 90))
DRAEM_OPACITY = (0.0, 0.8)  # beta, the weight of the good image inside the anomaly
DRAEM_SKIP_PROBABILITY = 0.5


def _fade(t: torch.Tensor) -> torch.Tensor:
    """Perlin's quintic fade 6t^5 - 15t^4 + 10t^3: zero first and second derivatives at 0 and 1."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    size: tuple[int, int],
    scale: tuple[int, int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One octave of 2-D gradient (Perlin) noise, float32 [H, W], values in [-1, 1].

    A lattice of ``scale[0] x scale[1]`` cells spans the image; every lattice corner gets a
    random unit gradient (angle uniform in [0, 2pi)). Pixel (i, j) sits at lattice coordinate
    ``(i * scale[0] / H, j * scale[1] / W)``, as in DRAEM's ``rand_perlin_2d_np``; its value is
    the fade-weighted blend of the four corner gradients dotted with the offsets to them,
    times sqrt(2) so that the range is [-1, 1]. The noise is exactly 0 on lattice points.

    Parameters
    ----------
    size
        Output (H, W).
    scale
        Lattice cells along (H, W), each >= 1.
    generator
        Source of the gradient angles.
    device
        Where the noise is computed; the angles are drawn on the CPU so that a seed gives
        the same noise on every device.
    """
    h, w = int(size[0]), int(size[1])
    ry, rx = int(scale[0]), int(scale[1])
    if h < 1 or w < 1 or ry < 1 or rx < 1:
        raise ValueError(f"perlin_noise needs a positive size and scale, got size {size} and scale {scale}")
    angles = 2.0 * math.pi * torch.rand(ry + 1, rx + 1, generator=generator, dtype=torch.float64)
    angles = angles.to(device)
    gy, gx = torch.cos(angles), torch.sin(angles)  # gradient components along rows, columns
    # Lattice coordinates in float64 so that the cell index floor() is exact at lattice points.
    py = torch.arange(h, dtype=torch.float64, device=angles.device) * ry / h
    px = torch.arange(w, dtype=torch.float64, device=angles.device) * rx / w
    iy, ix = py.floor().long(), px.floor().long()
    fy, fx = (py - iy)[:, None], (px - ix)[None, :]
    iy, ix = iy[:, None], ix[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        return gy[iy + dy, ix + dx] * (fy - dy) + gx[iy + dy, ix + dx] * (fx - dx)

    ty, tx = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(1, 0), ty)  # DRAEM blends along rows first
    bottom = torch.lerp(corner(0, 1), corner(1, 1), ty)
    return (math.sqrt(2.0) * torch.lerp(top, bottom, tx)).float()


def perlin_octaves(
    size: tuple[int, int],
    scale: tuple[int, int],
    *,
    octaves: int = 1,
    persistence: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Fractal (multi-octave) Perlin noise: sum over octaves k of ``persistence**k`` times
    `perlin_noise` at ``2**k * scale``, as DRAEM's ``rand_perlin_2d_octaves``. [H, W] float32.

    Parameters
    ----------
    size
        Output (H, W).
    scale
        Lattice cells along (H, W) of the first octave.
    octaves
        Number of octaves (1: plain `perlin_noise`, what DRAEM's training loader uses).
    persistence
        Amplitude ratio between successive octaves.
    generator
        Source of randomness.
    device
        Where the noise is computed.
    """
    if octaves < 1:
        raise ValueError(f"octaves must be >= 1, got {octaves}")
    noise = torch.zeros(int(size[0]), int(size[1]), device=device)
    for k in range(octaves):
        cells = (scale[0] * 2**k, scale[1] * 2**k)
        noise = noise + persistence**k * perlin_noise(size, cells, generator=generator, device=device)
    return noise


def perlin_mask(
    size: tuple[int, int],
    *,
    scale_exponents: tuple[int, int] = PERLIN_SCALE_EXPONENTS,
    threshold: float = PERLIN_THRESHOLD,
    rotation: tuple[float, float] = PERLIN_ROTATION,
    octaves: int = 1,
    persistence: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """DRAEM's anomaly shape: rotated Perlin noise above a threshold, bool [H, W].

    The mask may be empty (DRAEM then labels the sample as normal); callers that need a
    non-empty mask draw again.

    Parameters
    ----------
    size
        Output (H, W).
    scale_exponents
        [lo, hi): the lattice has ``2**k`` cells per axis, k drawn uniformly from
        ``range(lo, hi)`` independently for rows and columns. DRAEM: (0, 6), i.e. 1 to 32.
    threshold
        Pixels whose rotated noise exceeds it are in the mask. DRAEM: 0.5.
    rotation
        Range of the uniform rotation angle in degrees. DRAEM: (-90, 90).
    octaves, persistence
        Passed to `perlin_octaves` (DRAEM: one octave).
    generator
        Source of randomness.
    device
        Where the mask is computed.
    """
    lo, hi = int(scale_exponents[0]), int(scale_exponents[1])
    if not 0 <= lo < hi:
        raise ValueError(f"scale_exponents must satisfy 0 <= lo < hi, got {scale_exponents}")
    ky = int(torch.randint(lo, hi, (), generator=generator))
    kx = int(torch.randint(lo, hi, (), generator=generator))
    noise = perlin_octaves(
        size, (2**ky, 2**kx), octaves=octaves, persistence=persistence, generator=generator, device=device
    )
    angle = float(rotation[0] + (rotation[1] - rotation[0]) * torch.rand((), generator=generator, dtype=torch.float64))
    return rotate(noise, angle) > threshold


def perlin_anomaly(
    image: torch.Tensor,
    textures: TextureSource,
    *,
    skip_probability: float = DRAEM_SKIP_PROBABILITY,
    opacity: tuple[float, float] = DRAEM_OPACITY,
    augmentations: int = 3,
    scale_exponents: tuple[int, int] = PERLIN_SCALE_EXPONENTS,
    threshold: float = PERLIN_THRESHOLD,
    rotation: tuple[float, float] = PERLIN_ROTATION,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM's simulated anomaly: a Perlin-shaped region of `image` replaced by a texture.

    ``out = (1 - b) * texture + b * image`` inside the mask and ``out = image`` (bit for bit)
    outside it, with the opacity b drawn uniformly from `opacity` and the texture drawn from
    `textures` and distorted by `augment_texture`. With probability `skip_probability` the
    image comes back unchanged with an empty mask (DRAEM's "no anomaly" half of the batches).
    The mask can also be empty when the thresholded noise is (about 5% of draws at the
    defaults); the sample is then normal, as in the reference.

    DRAEM's loader also rotates the good image itself with probability 0.3 before this step;
    that is a training augmentation of the method, not part of the synthesis.

    Parameters
    ----------
    image
        Good image [3, H, W], float in [0, 1].
    textures
        Where the anomaly's appearance comes from.
    skip_probability
        Probability of returning the image unchanged (DRAEM: 0.5).
    opacity
        Range of b, the weight of the original image inside the anomaly (DRAEM: [0, 0.8)).
    augmentations
        How many of DRAEM's texture augmentations to apply (DRAEM: 3).
    scale_exponents, threshold, rotation
        Shape of the mask, see `perlin_mask`.
    generator
        Source of randomness: the same generator state gives the same result.

    Returns
    -------
    tuple
        (augmented image [3, H, W] of `image`'s dtype and device, mask bool [H, W]).
    """
    _check_image(image)
    if not 0.0 <= skip_probability <= 1.0:
        raise ValueError(f"skip_probability must be in [0, 1], got {skip_probability}")
    if not 0.0 <= opacity[0] <= opacity[1] <= 1.0:
        raise ValueError(f"opacity must be a range inside [0, 1], got {opacity}")
    size = (image.shape[1], image.shape[2])
    if float(torch.rand((), generator=generator)) < skip_probability:
        return image.clone(), torch.zeros(size, dtype=torch.bool, device=image.device)
    mask = perlin_mask(
        size,
        scale_exponents=scale_exponents,
        threshold=threshold,
        rotation=rotation,
        generator=generator,
        device=image.device,
    )
    texture = augment_texture(textures.sample(size, generator), count=augmentations, generator=generator)
    texture = texture.to(device=image.device, dtype=image.dtype)
    beta = float(opacity[0] + (opacity[1] - opacity[0]) * torch.rand((), generator=generator, dtype=torch.float64))
    blended = (1.0 - beta) * texture + beta * image
    return torch.where(mask[None], blended, image), mask


__all__ = [
    "DRAEM_OPACITY",
    "DRAEM_SKIP_PROBABILITY",
    "PERLIN_ROTATION",
    "PERLIN_SCALE_EXPONENTS",
    "PERLIN_THRESHOLD",
    "perlin_anomaly",
    "perlin_mask",
    "perlin_noise",
    "perlin_octaves",
]
