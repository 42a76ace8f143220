"""Feature registration (RegAD): spatial transformers, affine helpers, the Siamese heads, and the
augmentation of a few-shot support set.

RegAD (Huang et al., "Registration based Few-Shot Anomaly Detection", ECCV 2022) learns, on
*other* categories, to register feature maps of two images of the same kind so that they can
be compared position by position:

- `SpatialTransformer`: after a backbone stage, a small network predicts the parameters of an
  affine transform of that stage's feature map (conv3x3-BN-ReLU-maxpool twice, then two
  linear layers; the last one starts at zero weights with the identity as bias, so training
  starts from "no transform") and warps the map with it (bilinear, reflection padding).
  `TRANSFORM_PARAMS` lists the modes of the authors' code; RegAD uses ``rotation_scale``
  (angle a, scales sx, sy: ``[[sx cos a, -sin a, 0], [sin a, sy cos a, 0]]``).
- `warp` / `invert_affine`: apply a batch of 2x3 affine matrices to feature maps, and invert
  them (the code maps the registered maps back into the image's frame with the inverses of
  every transform applied so far, before it fits its Gaussian).
- `SiameseEncoder`, `SiamesePredictor`, `negative_cosine`: the SimSiam-style objective of
  RegAD's registration training: ``L = -cos(p1, sg(z2)) / 2 - cos(p2, sg(z1)) / 2`` per
  position, averaged, where z = encoder(features), p = predictor(z) and sg stops gradients.
- `support_augmentations`: the fixed test-time expansion of the support set in RegAD's code:
  each shot, plus rotations by +-pi/16, +-pi/8, +-3pi/16, +-pi/4, translations by (+-0.2,
  +-0.2) and (+-0.1, +-0.1) (affine-grid units: fractions of the half-size), a horizontal flip,
  a greyscale copy and rotations by 90, 180, 270 degrees — 22 images per shot.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from iadkit.components.tracing import adaptive_avg_pool

TRANSFORM_PARAMS: dict[str, int] = {
    "affine": 6,
    "translation": 2,
    "rotation": 1,
    "scale": 2,
    "shear": 2,
    "rotation_scale": 3,
    "translation_scale": 4,
    "rotation_translation": 3,
    "rotation_translation_scale": 5,
}
_IDENTITY: dict[str, list[float]] = {
    "affine": [1, 0, 0, 0, 1, 0],
    "translation": [0, 0],
    "rotation": [0],
    "scale": [1, 1],
    "shear": [0, 0],
    "rotation_scale": [0, 1, 1],
    "translation_scale": [0, 0, 1, 1],
    "rotation_translation": [0, 0, 0],
    "rotation_translation_scale": [0, 0, 0, 1, 1],
}


def affine_from_params(params: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, n] transform parameters of `mode` -> [B, 2, 3] affine matrices (the code's layout)."""
    if mode not in TRANSFORM_PARAMS:
        raise ValueError(f"unknown transform mode {mode!r}; choose one of {', '.join(TRANSFORM_PARAMS)}")
    b = params.shape[0]
    if mode == "affine":
        return params.view(b, 2, 3)
    zero, one = params.new_zeros(b), params.new_ones(b)
    a00, a01, a02, a10, a11, a12 = one, zero, zero, zero, one, zero
    p = params.unbind(1)
    if mode == "translation":
        a02, a12 = p[0], p[1]
    elif mode == "rotation":
        a00, a01, a10, a11 = p[0].cos(), -p[0].sin(), p[0].sin(), p[0].cos()
    elif mode == "scale":
        a00, a11 = p[0], p[1]
    elif mode == "shear":
        a01, a10 = p[0], p[1]
    elif mode == "rotation_scale":
        a00, a01, a10, a11 = p[0].cos() * p[1], -p[0].sin(), p[0].sin(), p[0].cos() * p[2]
    elif mode == "translation_scale":
        a02, a12, a00, a11 = p[0], p[1], p[2], p[3]
    elif mode == "rotation_translation":
        a00, a01, a10, a11, a02, a12 = p[0].cos(), -p[0].sin(), p[0].sin(), p[0].cos(), p[1], p[2]
    elif mode == "rotation_translation_scale":
        a00, a01, a10, a11 = p[0].cos() * p[3], -p[0].sin(), p[0].sin(), p[0].cos() * p[4]
        a02, a12 = p[1], p[2]
    return torch.stack([torch.stack([a00, a01, a02], 1), torch.stack([a10, a11, a12], 1)], 1)


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, [B, C, height, width], align_corners=False)`` as a matrix product:
    pixel centres at (2j + 1) / width - 1, mapped by theta. Written out because ONNX has no
    affine-grid operator before opset 20 (we export at 18)."""
    xs = (torch.arange(width, dtype=theta.dtype, device=theta.device) * 2 + 1) / width - 1
    ys = (torch.arange(height, dtype=theta.dtype, device=theta.device) * 2 + 1) / height - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([gx, gy, torch.ones_like(gx)], -1).reshape(1, height * width, 3)
    return (base @ theta.transpose(1, 2)).reshape(theta.shape[0], height, width, 2)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Sample [B, C, H, W] at ``theta`` [B, 2, 3] (affine_grid units, align_corners=False), bilinear,
    reflection padding — the code's STN warp."""
    grid = affine_grid(theta.to(x.dtype), int(x.shape[-2]), int(x.shape[-1]))
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """Inverses of [B, 2, 3] affine matrices (as 3x3 with last row 0 0 1), [B, 2, 3].

    In closed form (A^-1 = adj(A) / det A, t' = -A^-1 t) rather than ``torch.linalg.inv``,
    which ONNX cannot export."""
    a, b, tx = theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2]
    c, d, ty = theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2]
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    row0 = torch.stack([ia, ib, -(ia * tx + ib * ty)], -1)
    row1 = torch.stack([ic, id_, -(ic * tx + id_ * ty)], -1)
    return torch.stack([row0, row1], 1)


class BinAveragePool(nn.Module):
    """``nn.AdaptiveAvgPool2d(size)`` that exports to ONNX (`tracing.adaptive_avg_pool`): the
    localisation features follow a grid sampling, after which the exporter cannot see their
    size."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adaptive_avg_pool(x, self.size)


class SpatialTransformer(nn.Module):
    """Predicts and applies an affine transform of a feature map; `forward` -> (warped, theta).

    Parameters
    ----------
    channels
        Channels of the feature map.
    mode
        Which transform parameters are predicted (`TRANSFORM_PARAMS`; RegAD: "rotation_scale").
    pool
        The localisation features are pooled to pool x pool before the linear layers. The code
        has no pooling and fixes the linear input to its 224-px sizes (14, 7 and 4 after two
        max-pools); adaptive pooling to 4 x 4 (the third stage's size) makes any input size work.
    """

    def __init__(self, channels: int, mode: str = "rotation_scale", pool: int = 4) -> None:
        super().__init__()
        if mode not in TRANSFORM_PARAMS:
            raise ValueError(f"unknown transform mode {mode!r}; choose one of {', '.join(TRANSFORM_PARAMS)}")
        self.mode = mode
        self.localization = nn.Sequential(
            nn.Conv2d(channels, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(64, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            BinAveragePool(pool),
        )
        last = nn.Linear(1024, TRANSFORM_PARAMS[mode])
        self.fc = nn.Sequential(nn.Linear(16 * pool * pool, 1024), nn.ReLU(), last)
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.tensor(_IDENTITY[mode], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = affine_from_params(self.fc(self.localization(x).flatten(1)), self.mode)
        return warp(x, theta), theta


class SiameseEncoder(nn.Module):
    """RegAD's encoder: three 1x1 convolutions (C -> C), BN + ReLU after the first two."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SiamesePredictor(nn.Module):
    """RegAD's predictor: 1x1 conv-BN-ReLU, then a 1x1 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``-cos(p, sg(z))`` over channels, averaged over batch and positions (the code's CosLoss)."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


ROTATIONS = tuple(s * math.pi / 16 for s in (-4, -3, -2, -1, 1, 2, 3, 4))
TRANSLATIONS = ((0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2), (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))
AUGMENTATIONS_PER_SHOT = 1 + len(ROTATIONS) + len(TRANSLATIONS) + 1 + 1 + 3


def _rotation(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0]])


def support_augmentations(pixels: torch.Tensor) -> torch.Tensor:
    """RegAD's support expansion of unnormalised images [k, 3, H, W] in [0, 1] -> [22 k, 3, H, W].

    Order: originals, 8 small rotations, 8 translations, horizontal flip, greyscale (ITU-R 601
    weights, 3 channels), rotations by 90/180/270 degrees; each group holds the k shots. The
    code shuffles them, which a Gaussian fit does not see. Rotations and translations sample
    with reflection padding, as the code (kornia's rotate for the right angles).
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"support images must be [k, 3, H, W], got {tuple(pixels.shape)}")
    k = pixels.shape[0]

    def affine(theta: torch.Tensor) -> torch.Tensor:
        return warp(pixels, theta.to(pixels)[None].expand(k, 2, 3))

    parts = [pixels]
    parts += [affine(_rotation(a)) for a in ROTATIONS]
    parts += [affine(torch.tensor([[1.0, 0.0, a], [0.0, 1.0, b]])) for a, b in TRANSLATIONS]
    parts.append(pixels.flip(-1))
    grey = 0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2]
    parts.append(grey[:, None].expand(-1, 3, -1, -1))
    parts += [affine(_rotation(q * math.pi / 2)) for q in (1, 2, 3)]
    return torch.cat(parts)


__all__ = [
    "AUGMENTATIONS_PER_SHOT",
    "TRANSFORM_PARAMS",
    "SiameseEncoder",
    "SiamesePredictor",
    "SpatialTransformer",
    "affine_from_params",
    "invert_affine",
    "negative_cosine",
    "support_augmentations",
    "warp",
]
