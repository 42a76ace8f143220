"""EfficientAD — a distilled patch description network, a hard-mined student and an autoencoder.

Paper: K. Batzner, L. Heckler, R. König, "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024 (arXiv:2303.14535). No official code; the reference
implementations are nelson1425/EfficientAD (which reproduces the paper's MVTec AD / LOCO
numbers and follows the paper's Algorithm 1) and anomalib 2.7.0 (``models/image/efficient_ad``).

Algorithm, as in the paper:

1. *Patch description network* (PDN, §3.1): four convolutions and two average poolings
   (EfficientAD-S; -M is wider with two extra 1x1 convolutions), a 33 x 33 receptive field,
   384 output channels at 1/4 of the input resolution. The **teacher** is a PDN distilled
   once from a pretrained network's patch features on general images (appendix: the
   features PatchCore uses, WideResNet-101 layer 2 + 3 at twice the input size, projected
   to 384 channels; each channel standardised; MSE; 60 000 iterations of 16 ImageNet images).
2. *Student-teacher branch* (§3.2), for structural anomalies: the teacher's output on the
   training images is standardised per channel; a **student** PDN with 768 channels
   regresses it with its first 384 channels, through the **hard feature loss**: of the
   squared differences (T - S)^2 of a batch, only those >= their 0.999 quantile are averaged.
   A **penalty** keeps the student from imitating the teacher off the training images: the
   mean of S(P)^2 on a general image P is added to the loss.
3. *Autoencoder branch* (§3.3), for logical anomalies: an autoencoder (6 strided
   convolutions to a 64-d bottleneck, 8 convolutions with bilinear upsampling back) learns
   to reconstruct the teacher's output on augmented training images (brightness, contrast
   or saturation scaled by U(0.8, 1.2)); the student's other 384 channels learn to predict
   the autoencoder's output. Being local, the student cannot predict what the global
   autoencoder makes of an image with a wrong arrangement of normal parts.
4. *Quantile-based map normalisation* (§3.4): the maps M_ST = mean_c (T - S_c)^2 and
   M_AE = mean_c (A - S'_c)^2 are computed on validation images; each is mapped linearly so
   that its 0.9 quantile q_a goes to 0 and its 0.995 quantile q_b to 0.1, and the anomaly
   map is their average; the image score is its maximum.
5. Training: Adam, lr 1e-4, weight decay 1e-5, batch 1, 70 000 iterations, the learning
   rate divided by 10 after 95 % of them.

Paper -> reference code -> ours:

==========================  ==========================  ===========================  ==============================
item                        paper                       nelson1425 / anomalib        ours
==========================  ==========================  ===========================  ==============================
distillation source         WRN-101 layer2+3, PatchCore  same (WRN-101 from          packaged EfficientNet-Lite0
network                     aggregation, 384 channels    torchvision / downloaded     ``blocks.2`` + ``blocks.4``
                                                         teacher weights)             (strides 8, 16: WRN's layer2/3
                                                                                      analogues), PatchCore's 3x3
                                                                                      "unfold" aggregation, pooled
                                                                                      to 1024 per layer, then 384
                                                                                      (`PatchEmbedding`, as the
                                                                                      reference's extractor)
distillation images         ImageNet, 512 px for the     same, grayscale p 0.1        `GeneralImages`: random
                            extractor, 256 px for PDN                                 resized crops of scikit-
                                                                                      image's 20 bundled photos +
                                                                                      synthetic fabric/metal/wood
                                                                                      textures; grayscale p 0.1;
                                                                                      extractor at 2x the PDN size
distillation size           60 000 it. x 16 images at    same                         ``distill_steps`` (3000) x
                            256 px (PDN)                                              ``distill_batch_size`` (8) at
                                                                                      ``distill_size`` (64 px):
                                                                                      fully convolutional, so the
                                                                                      weights serve any input size;
                                                                                      ``paper=True``: 60 000 x 16
                                                                                      at 256 px. Shipped for the
                                                                                      defaults, else done once and
                                                                                      cached on disk (see below)
distillation optimiser      Adam 1e-4, weight decay      same (constant lr)           Adam ``distill_lr`` 1e-3,
                            1e-5                                                      weight decay 1e-5, lr / 10
                                                                                      after 95 % of the steps (as
                                                                                      the training's): 20x fewer
                                                                                      steps than the paper need
                                                                                      larger ones (measured: MSE
                                                                                      after 160 steps 0.79 at
                                                                                      1e-4, 0.71 at 1e-3; 3e-3
                                                                                      diverges first);
                                                                                      ``paper=True``: 1e-4 (the
                                                                                      drop at 95 % stays)
distillation seed           one teacher for all          one released teacher         ``distill_seed`` (0), apart
                            experiments                                               from ``seed``: one teacher
                                                                                      serves every training seed
channel standardisation     mean/std of the features     10 000 images                256 images (fewer when the
of the distillation target                                                            distillation sees fewer)
PDN padding                 table 6: padded convs        training and test without    as the references; maps
                                                         padding (56 x 56 at 256 px), padded by 4 with zeros
                                                         maps padded by 4 (nelson:    before the normalisation
                                                         after normalising, i.e. at   (anomalib's order: no floor
                                                         q_a; anomalib: before)       at q_a under the scores)
penalty images              ImageNet                     ImageNet (anomalib:          `GeneralImages` photos only
                                                         Imagenette), 2x resize,      (no synthetic textures: they
                                                         centre crop, grayscale 0.3   are our benchmark's
                                                                                      categories), random resized
                                                                                      crop, grayscale 0.3;
                                                                                      ``penalty_folder``: any folder
                                                                                      of images (e.g. ImageNet)
hard loss / penalty /       p_hard 0.999; L_ST + L_AE    same                         same (`hard_feature_loss`)
total loss                  + L_STAE
AE augmentation             brightness / contrast /      ColorJitter(0.2) one of      same (torchvision's
                            saturation, U(0.8, 1.2)      three                        adjust_* functions)
autoencoder at other        256 px only (the encoder's   anomalib and nelson fail     below 256 px the encoder's
sizes                       last 8x8 conv needs it)      below 256 px                 last map is average-pooled to
                                                                                      8 x 8 (identity at 256 px);
                                                                                      the decoder's upsampling
                                                                                      steps are the reference's,
                                                                                      at least 1 pixel, and end at
                                                                                      the PDN's output size
optimiser / iterations      Adam 1e-4, wd 1e-5, batch    same                         same optimiser; ``steps``
                            1, 70 000, lr /10 at 95 %                                 1000 (CPU-sized),
                                                                                      ``paper=True``: 70 000
validation set (q_a, q_b)   LOCO's validation images;    10 % of the training images  10 % of the training images
                            quantiles 0.9 / 0.995        (random), 0.9 / 0.995        (seeded), 0.9 / 0.995
map / score                 0.5 M_ST + 0.5 M_AE,         same; bilinear to the        same; the model's
                            upsampled; score = max       image size                   Postprocess upsamples
                                                                                      (bilinear), no smoothing
==========================  ==========================  ===========================  ==============================

The teacher is the expensive part (the default's 3000 steps: about 35 minutes on one CPU
core), so the default configuration's teacher ships with iadkit: `PACKAGED_TEACHER`, float16
(its held-out distillation MSE equals the float32 one's to 4 decimals), licensed like the
Apache-2.0 EfficientNet-Lite0 weights it is distilled from, written by
``bench/efficientad_teacher.py``. Any other configuration distils once and caches the result
in ``$IADKIT_CACHE_DIR`` (default ``~/.cache/iadkit``) as
``efficientad-teacher-<key>.safetensors``, the key hashing everything that shapes it
(PDN size, channels, backbone weights sha256, layers, steps, batch, crop size, lr, seed).
Measured cost and quality on the 2-core development machine: see the README's EfficientAD
section. ``teacher_path`` loads a teacher distilled elsewhere instead (e.g. a
reference implementation's ``teacher_small.pth`` state dict, or our cache file). The
teacher's weights are stored in every model file, so a model never depends on the cache.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iadkit.components.distillation import TrainingDivergedError
from iadkit.components.tracing import adaptive_avg_pool
from iadkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageSet
from iadkit.errors import InvalidParameterError, ModelFileError
from iadkit.methods.base import Detector, register
from iadkit.methods.params import Interval, OneOf, at_least, param, positive
from iadkit.types import Prediction

log = logging.getLogger(__name__)

PDN_SIZES = ("S", "M")
MAP_PAD = 4  # the references pad the un-padded PDN's maps by 4 on each side
DISTILL_VERSION = 2  # bump when the distillation recipe changes (invalidates cached teachers)
DISTILL_NORM_IMAGES = 256
DISTILL_GRAYSCALE = 0.1
PENALTY_GRAYSCALE = 0.3
LR_DROP_AT = 0.95  # the learning rate is divided by 10 after this share of the steps (training and distillation)
AE_BOTTLENECK_GRID = 8  # the encoder's last convolution is 8 x 8 (a 256-px input's grid)


# -- networks --------------------------------------------------------------------------------------
class PatchDescriptionNetwork(nn.Module):
    """The PDN of EfficientAD-S (``size="S"``) or -M (``"M"``), paper tables 5 and 6.

    Parameters
    ----------
    size
        "S" or "M".
    out_channels
        Output channels (teacher 384, student 768).
    padding
        Padded convolutions (the paper's tables; used for distillation so that the output is
        exactly 1/4 of the input) or none (training and test, as the references).
    """

    def __init__(self, size: str, out_channels: int, *, padding: bool = False) -> None:
        super().__init__()
        if size not in PDN_SIZES:
            raise ValueError(f"PDN size must be one of {PDN_SIZES}, got {size!r}")
        p = 1 if padding else 0
        wide = size == "M"
        c1, c2 = (256, 512) if wide else (128, 256)
        self.size = size
        self.padding = bool(padding)
        self.conv1 = nn.Conv2d(3, c1, 4, padding=3 * p)
        self.conv2 = nn.Conv2d(c1, c2, 4, padding=3 * p)
        self.pool = nn.AvgPool2d(2, stride=2, padding=p)
        if wide:
            self.conv3 = nn.Conv2d(c2, c2, 1)
            self.conv4 = nn.Conv2d(c2, c2, 3, padding=p)
            self.conv5 = nn.Conv2d(c2, out_channels, 4)
            self.conv6 = nn.Conv2d(out_channels, out_channels, 1)
        else:
            self.conv3 = nn.Conv2d(c2, c2, 3, padding=p)
            self.conv4 = nn.Conv2d(c2, out_channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        if self.size == "M":
            x = F.relu(self.conv4(x))
            x = F.relu(self.conv5(x))
            return self.conv6(x)
        return self.conv4(x)

    def convs(self) -> list[nn.Conv2d]:
        """The convolutions in forward order (for loading other implementations' weights)."""
        names = ["conv1", "conv2", "conv3", "conv4"] + (["conv5", "conv6"] if self.size == "M" else [])
        return [getattr(self, n) for n in names]


def pdn_output_size(size: int, padding: bool = False) -> int:
    """Side of the PDN's output for an input side `size` (S and M alike)."""
    p = 1 if padding else 0
    s = size + 6 * p - 3
    s = (s + 2 * p - 2) // 2 + 1
    s = s + 6 * p - 3
    s = (s + 2 * p - 2) // 2 + 1
    s = s + 2 * p - 2
    return s - 3


class AutoEncoder(nn.Module):
    """EfficientAD's autoencoder: image -> 64-d code -> ``out_channels`` maps at the PDN's grid.

    The reference's layers (encoder: five 4x4 stride-2 convolutions 32-32-64-64-64 and an 8x8
    one; decoder: bilinear upsampling + 4x4 convolutions, dropout 0.2, then two 3x3). The
    reference is written for 256-px inputs; at other sizes the encoder's last map is average-
    pooled to 8 x 8 first and each decoder stage is at least 1 pixel (see the module table).
    """

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        widths = (3, 32, 32, 64, 64, 64)
        self.encoder = nn.ModuleList(nn.Conv2d(a, b, 4, stride=2, padding=1) for a, b in itertools.pairwise(widths))
        self.bottleneck = nn.Conv2d(64, 64, AE_BOTTLENECK_GRID)
        self.decoder = nn.ModuleList(nn.Conv2d(64, 64, 4, padding=2) for _ in range(6))
        self.dropout = nn.Dropout(0.2)
        self.deconv7 = nn.Conv2d(64, 64, 3, padding=1)
        self.deconv8 = nn.Conv2d(64, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        for conv in self.encoder:
            x = F.relu(conv(x))
        if tuple(x.shape[-2:]) != (AE_BOTTLENECK_GRID, AE_BOTTLENECK_GRID):
            x = adaptive_avg_pool(x, AE_BOTTLENECK_GRID)  # exportable to ONNX for any size
        x = self.bottleneck(x)
        # The reference's stages: H/64-1, H/32, H/16-1, H/8, H/4-1, H/2-1 (each conv adds 1).
        stages = [(64, -1), (32, 0), (16, -1), (8, 0), (4, -1), (2, -1)]
        for conv, (div, add) in zip(self.decoder, stages):
            size = (max(1, h // div + add), max(1, w // div + add))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = self.dropout(F.relu(conv(x)))
        x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        x = F.relu(self.deconv7(x))
        return self.deconv8(x)


# -- the losses and the map normalisation ----------------------------------------------------------
def hard_feature_loss(distance: torch.Tensor, quantile: float = 0.999) -> torch.Tensor:
    """EfficientAD's hard feature loss: the mean of the squared differences at or above their
    `quantile` (``torch.quantile``'s linear interpolation, over the whole batch tensor).

    Parameters
    ----------
    distance
        Element-wise squared differences (T - S)^2, any shape.
    quantile
        p_hard (paper: 0.999); 0 averages everything.
    """
    flat = distance.reshape(-1)
    if flat.numel() > 2**24:  # torch.quantile's limit; the references subsample the same way
        flat = flat[torch.randperm(flat.numel(), device=flat.device)[: 2**24]]
    d_hard = torch.quantile(flat.detach().float(), quantile)
    return distance[distance >= d_hard.to(distance.dtype)].mean()


def map_quantiles(maps: torch.Tensor, low: float = 0.9, high: float = 0.995) -> tuple[float, float]:
    """(q_a, q_b): the `low` and `high` quantiles of all values of validation maps (linear
    interpolation, as ``torch.quantile``/``numpy.quantile``)."""
    values = maps.detach().reshape(-1).double().cpu().numpy()
    return float(np.quantile(values, low)), float(np.quantile(values, high))


def normalize_map(m: torch.Tensor, q_a: float | torch.Tensor, q_b: float | torch.Tensor) -> torch.Tensor:
    """The linear map sending q_a to 0 and q_b to 0.1: ``0.1 (m - q_a) / (q_b - q_a)``."""
    return 0.1 * (m - q_a) / (q_b - q_a)


def augment_for_autoencoder(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One of brightness, contrast, saturation (chosen per image) scaled by U(0.8, 1.2);
    images in [0, 1], [B, 3, H, W] (the references' ColorJitter choice)."""
    import torchvision.transforms.functional as TF

    out = []
    for img in images:
        factor = 0.8 + 0.4 * float(torch.rand((), generator=generator))
        kind = int(torch.randint(3, (), generator=generator))
        fn = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)[kind]
        out.append(fn(img, factor))
    return torch.stack(out)


# -- the teacher: distillation and files -----------------------------------------------------------
def _normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def distillation_config(
    *,
    size: str = "S",
    out_channels: int = 384,
    backbone: str = "efficientnet_lite0",
    weights_path: str | os.PathLike[str] | None = None,
    layers: tuple[str, ...] | None = None,
    steps: int = 3000,
    batch_size: int = 8,
    crop: int = 64,
    seed: int = 0,
    lr: float = 1e-3,
) -> dict[str, Any]:
    """Everything that shapes a distilled teacher, as JSON (its hash names the cache file)."""
    from iadkit.backbones import FeatureExtractor, get_spec

    spec = get_spec(backbone)
    family_layers = {
        "efficientnet": ("blocks.2", "blocks.4"),
        "resnet": ("layer2", "layer3"),
        "mobilenet": ("features.6", "features.13"),
    }
    chosen = tuple(layers) if layers is not None else family_layers.get(spec.family)
    if chosen is None:
        raise InvalidParameterError(f"EfficientAD: no default distillation layers for backbone {backbone!r}")
    sha = FeatureExtractor(backbone, list(chosen), weights_path).weights_sha256
    return {
        "version": DISTILL_VERSION,
        "size": size,
        "out_channels": int(out_channels),
        "backbone": backbone,
        "sha256": sha,
        "layers": list(chosen),
        "steps": int(steps),
        "batch_size": int(batch_size),
        "crop": int(crop),
        "seed": int(seed),
        "lr": float(lr),
        "lr_drop_at": LR_DROP_AT,
        "weight_decay": 1e-5,
        "norm_images": min(DISTILL_NORM_IMAGES, int(steps) * int(batch_size)),
        "grayscale": DISTILL_GRAYSCALE,
        "source": "skimage-photos+procedural-textures",
    }


def teacher_cache_path(config: dict[str, Any]) -> Path:
    """Where the teacher distilled with `config` is cached."""
    from iadkit.components.features import cache_dir

    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"efficientad-teacher-{key}.safetensors"


class DistillationTarget:
    """What the teacher regresses: a pretrained backbone's PatchCore features of general images.

    ``draw(n, generator)`` gives ``n`` general images twice, at twice the crop size (for the
    backbone) and at the crop size (for the PDN); ``features(big)`` is the target, the
    backbone's patch features (3x3 "unfold" aggregation, 1024 per layer, pooled to
    ``out_channels``), standardised per channel with `mean` and `std`, measured on the first
    ``config["norm_images"]`` draws of the generator seeded with ``config["seed"]``.

    Parameters
    ----------
    config
        From `distillation_config`.
    weights_path
        The backbone's weight file (torchvision backbones).
    device
        Where the backbone runs.
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        weights_path: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        from iadkit.backbones import FeatureExtractor
        from iadkit.components.features import PatchEmbedding
        from iadkit.components.general_images import GeneralImages

        self.crop = int(config["crop"])
        if self.crop % 16:
            raise InvalidParameterError(f"EfficientAD: distill_size must be a multiple of 16 (pixels), got {self.crop}")
        self.layers = list(config["layers"])
        self.device = torch.device(device)
        self.fx = FeatureExtractor(config["backbone"], self.layers, weights_path).to(self.device)
        self.embed = PatchEmbedding(
            list(self.fx.channels.values()), patch_size=3, pretrain_dim=1024, target_dim=config["out_channels"]
        ).to(self.device)
        self.source = GeneralImages(textures=True)
        self.mean = torch.zeros(1, config["out_channels"], 1, 1, device=self.device)
        self.std = torch.ones_like(self.mean)
        g = torch.Generator().manual_seed(int(config["seed"]))
        n_norm, batch = int(config["norm_images"]), int(config["batch_size"])
        with torch.no_grad():  # channel statistics of the target (the references: two passes)
            total = torch.zeros(config["out_channels"], dtype=torch.float64, device=self.device)
            total_sq = torch.zeros_like(total)
            count = 0
            for start in range(0, n_norm, batch):
                t = self.raw_features(self.draw(min(batch, n_norm - start), g)[0]).double()
                total += t.sum(dim=(0, 2, 3))
                total_sq += (t * t).sum(dim=(0, 2, 3))
                count += t.shape[0] * t.shape[2] * t.shape[3]
            mean = total / count
            std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
        self.mean, self.std = mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)
        self.generator = g  # training draws continue the same stream

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` general images: (at twice the crop size, at the crop size), values in [0, 1]."""
        big = self.source.batch(n, 2 * self.crop, generator, grayscale=DISTILL_GRAYSCALE).to(self.device)
        small = F.interpolate(big, size=(self.crop, self.crop), mode="bilinear", antialias=True, align_corners=False)
        return big, small

    @torch.no_grad()
    def raw_features(self, big: torch.Tensor) -> torch.Tensor:
        feats = self.fx(_normalize(big, self.fx.mean, self.fx.std))
        return self.embed([feats[name] for name in self.layers])

    def features(self, big: torch.Tensor) -> torch.Tensor:
        """The standardised target of images at twice the crop size, [B, out_channels, h, w]."""
        return (self.raw_features(big) - self.mean) / self.std


#: The default teacher (EfficientAD-S, 384 channels, distilled from the packaged EfficientNet-
#: Lite0 with `distillation_config`'s defaults), shipped in float16 so that no user pays the
#: distillation; written by ``bench/efficientad_teacher.py``.
PACKAGED_TEACHER = Path(__file__).with_name("efficientad_teacher_s.safetensors")
PACKAGED_TEACHER_LICENCE = "Apache-2.0 (distilled from the EfficientNet-Lite0 weights, Apache-2.0)"


def packaged_teacher(config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The teacher shipped with iadkit (as float32), when it was distilled with `config`; else None."""
    if not PACKAGED_TEACHER.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(PACKAGED_TEACHER), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if json.loads(meta.get("config", "null")) != config:
        return None
    tensors, meta = read_teacher(PACKAGED_TEACHER)
    info = {**meta.get("info", {}), "packaged": True}
    return {k: v.float() for k, v in tensors.items()}, info


@torch.no_grad()
def held_out_distillation_mse(
    config: dict[str, Any], states: dict[str, dict[str, torch.Tensor]], *, n: int, seed: int
) -> dict[str, float]:
    """Distillation MSE of each teacher state on `n` general images drawn with `seed` (a stream
    no distillation step drew from); 1.0 = predicting the channel mean.

    The target is standardised with the first state's ``distill_target_mean`` / ``_std`` (kept
    by `distill_teacher`); an empty state stands for an undistilled PDN (seeded with 0).
    """
    target = DistillationTarget({**config, "norm_images": 1})  # statistics: the teacher's own, below
    first = next(iter(states.values()))
    target.mean = first["distill_target_mean"].float().view(1, -1, 1, 1)
    target.std = first["distill_target_std"].float().view(1, -1, 1, 1)
    big, small = target.draw(n, torch.Generator().manual_seed(seed))
    goal = target.features(big)
    x = _normalize(small, IMAGENET_MEAN, IMAGENET_STD)
    out = {}
    for name, state in states.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pdn = PatchDescriptionNetwork(config["size"], config["out_channels"], padding=True).eval()
        if state:
            load_teacher_weights(pdn, {k: v.float() for k, v in state.items()}, name)
        out[name] = float(torch.mean((pdn(x) - goal) ** 2))
    return out


def distill_teacher(
    config: dict[str, Any],
    *,
    weights_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Distil a PDN teacher as `config` (from `distillation_config`) says: (state dict, info).

    The target is `DistillationTarget`'s; the PDN (padded) sees the image at the crop size; the
    loss is the mean squared difference; Adam with ``config["lr"]``, divided by 10 after
    ``config["lr_drop_at"]`` of the steps, weight decay 1e-5. Besides the PDN's weights the
    state holds ``distill_target_mean`` / ``distill_target_std`` (the target's channel
    statistics, [out_channels]: what a check of the teacher against its target needs;
    `load_teacher_weights` skips them). ``info["loss_curve"]`` is [step, mean loss of the
    preceding window] at 20 points.
    """
    from iadkit.progress import step_bar

    t0 = time.perf_counter()
    device = torch.device(device)
    batch = int(config["batch_size"])
    target = DistillationTarget(config, weights_path=weights_path, device=device)
    g = target.generator

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config["seed"]))
        pdn = PatchDescriptionNetwork(config["size"], config["out_channels"], padding=True).to(device)
    pdn = pdn.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(pdn.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    drop_at = max(1, int(config["lr_drop_at"] * int(config["steps"])))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=drop_at, gamma=0.1)
    losses: list[float] = []
    with step_bar(int(config["steps"]), "efficientad: distilling the teacher", enabled=progress) as bar:
        for step in range(int(config["steps"])):
            big, small = target.draw(batch, g)
            goal = target.features(big)
            pred = pdn(_normalize(small, IMAGENET_MEAN, IMAGENET_STD).contiguous(memory_format=torch.channels_last))
            if pred.shape != goal.shape:  # only for a crop the two grids disagree on
                goal = F.interpolate(goal, size=pred.shape[-2:], mode="bilinear", align_corners=False)
            loss = torch.mean((pred - goal) ** 2)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"EfficientAD teacher distillation: the loss became {float(loss)} at step {step + 1}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.advance(loss=float(np.mean(losses[-50:])))
    state = {k: v.detach().cpu().contiguous() for k, v in pdn.state_dict().items()}
    state["distill_target_mean"] = target.mean.reshape(-1).cpu().contiguous()
    state["distill_target_std"] = target.std.reshape(-1).cpu().contiguous()
    window = max(1, len(losses) // 20)  # the loss curve: 20 points, each the mean of its window
    curve = [[end, float(np.mean(losses[end - window : end]))] for end in range(window, len(losses) + 1, window)]
    info = {
        "loss_curve": curve,
        "seconds": time.perf_counter() - t0,
        "loss_first": float(np.mean(losses[:10])) if losses else float("nan"),
        "loss_last": float(np.mean(losses[-50:])) if losses else float("nan"),
        "threads": torch.get_num_threads(),
    }
    return state, info


def save_teacher(
    path: str | os.PathLike[str], state: dict[str, torch.Tensor], config: dict[str, Any], info: dict[str, Any]
) -> Path:
    """Write a teacher as safetensors (atomically), its config and cost in the metadata."""
    from safetensors.torch import save

    from iadkit.files import atomic_write_bytes

    meta = {"config": json.dumps(config, sort_keys=True), "info": json.dumps(info, sort_keys=True)}
    return atomic_write_bytes(Path(path), save(state, metadata=meta))


def read_teacher(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A teacher file -> (tensors, metadata). Reads our safetensors files and the references'
    state dicts (``torch.load(weights_only=True)``: never executes code from the file)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidParameterError(f"EfficientAD: teacher_path {os.fspath(path)!r} is not a file")
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
                names = list(f.keys())
                tensors = {k: f.get_tensor(k) for k in names}
        except Exception as exc:
            raise ModelFileError(f"{p}: cannot read the teacher file ({exc})") from None
        return tensors, {k: json.loads(v) for k, v in meta.items() if k in ("config", "info")}
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(
            f"{p}: not a state dict that loads safely ({type(exc).__name__}); a file saved with torch.save(model) "
            "holds code: load it yourself and save model.state_dict() instead"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{p}: expected a state dict of tensors")
    return dict(obj), {}


def load_teacher_weights(pdn: PatchDescriptionNetwork, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Put a teacher's weights into `pdn`, whatever their key names: our names, anomalib's
    (``conv1.weight`` ...) or nelson1425's ``nn.Sequential`` (``0.weight``, ``3.weight`` ...)
    are matched in order, by shape."""
    convs = pdn.convs()
    # natural order of the names ("conv2" before "conv10", "3.weight" before "12.weight")
    keys = sorted(tensors, key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)])
    weights = [tensors[k] for k in keys if k.endswith("weight") and tensors[k].ndim == 4]
    biases = [tensors[k] for k in keys if k.endswith("bias") and tensors[k].ndim == 1]
    if len(weights) != len(convs) or len(biases) != len(convs):
        raise ModelFileError(
            f"{where}: {len(weights)} convolution weights, but a PDN-{pdn.size} has {len(convs)}: "
            "is it a teacher of the other size (model_size='S' or 'M')?"
        )
    for conv, w, b in zip(convs, weights, biases):
        assert conv.bias is not None  # every PDN convolution has one
        if tuple(w.shape) != tuple(conv.weight.shape) or tuple(b.shape) != tuple(conv.bias.shape):
            raise ModelFileError(
                f"{where}: a weight of shape {tuple(w.shape)} does not fit the PDN-{pdn.size} layer of shape "
                f"{tuple(conv.weight.shape)} (out_channels must match the teacher's)"
            )
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)


def cached_teacher(
    config: dict[str, Any],
    *,
    weights_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The teacher distilled with `config`: the packaged one (`PACKAGED_TEACHER`) when its
    configuration is `config`, else read from the cache, or distilled now and cached."""
    packaged = packaged_teacher(config)
    if packaged is not None:
        return packaged
    path = teacher_cache_path(config)
    if path.is_file():
        try:
            tensors, meta = read_teacher(path)
            if meta.get("config") == config:
                return tensors, meta.get("info", {})
        except (ModelFileError, InvalidParameterError, json.JSONDecodeError):
            pass  # a damaged cache entry: distil again
    log.info("EfficientAD: distilling a teacher (%d steps; cached afterwards in %s)", config["steps"], path)
    state, info = distill_teacher(config, weights_path=weights_path, device=device, progress=progress)
    try:
        save_teacher(path, state, config, info)
    except OSError as exc:  # an unwritable cache only costs the next fit the distillation
        log.warning("EfficientAD: could not cache the teacher in %s (%s)", path, exc)
    return state, info


# -- the detector ------------------------------------------------------------------------------------
@register
class EfficientAD(Detector):
    """Distilled PDN teacher, hard-mined student and autoencoder; quantile-normalised maps (Batzner et al. 2024)."""

    name = "efficientad"
    family = "teacher-student"
    paper = "Batzner et al., EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level Latencies, WACV 2024"
    map_sigma = 0.0  # the paper's maps are not smoothed
    smoke_params = {
        "out_channels": 32,
        "steps": 12,
        "distill_steps": 2,
        "distill_batch_size": 2,
        "distill_size": 64,
    }
    paper_params = {
        "steps": 70000,
        "distill_steps": 60000,
        "distill_batch_size": 16,
        "distill_size": 256,
        "distill_lr": 1e-4,
    }
    paper_image_size = 256

    model_size: str = param("S", "PDN size: 'S' (EfficientAD-S) or 'M' (EfficientAD-M).", check=OneOf(PDN_SIZES))
    out_channels: int = param(384, "Teacher channels (paper: 384); the student has twice as many.", check=at_least(1))
    steps: int = param(1000, "Training iterations (paper: 70000; CPU-sized default).", check=at_least(1))
    batch_size: int = param(1, "Training images per iteration (paper: 1).", check=at_least(1))
    lr: float = param(
        1e-4, "Adam learning rate (paper: 1e-4), divided by 10 after 95 % of the steps.", check=positive()
    )
    weight_decay: float = param(1e-5, "Adam weight decay (paper: 1e-5).", check=at_least(0))
    hard_quantile: float = param(
        0.999, "p_hard of the hard feature loss (paper: 0.999; 0: plain mean).", check=Interval(0, 1, closed="left")
    )
    penalty: bool = param(True, "Add the penalty on general images to the student's loss (paper: yes).")
    penalty_folder: str | os.PathLike[str] | None = param(
        None, "A folder of general images for the penalty (the paper's: ImageNet); None: scikit-image's bundled photos."
    )
    quantile_low: float = param(
        0.9, "q_a of the map normalisation (paper: 0.9).", check=Interval(0, 1, closed="neither")
    )
    quantile_high: float = param(
        0.995, "q_b of the map normalisation (paper: 0.995).", check=Interval(0, 1, closed="neither")
    )
    validation_fraction: float = param(
        0.1,
        "Share of the training images held out for the map quantiles (references: 10 %).",
        check=Interval(0, 1, closed="neither"),
    )
    teacher_path: str | os.PathLike[str] | None = param(
        None, "A distilled teacher file (ours, or a reference's PDN state dict); None: distil once and cache."
    )
    distill_backbone: str = param(
        "efficientnet_lite0", "Pretrained network the teacher is distilled from (paper: WideResNet-101)."
    )
    distill_weights_path: str | os.PathLike[str] | None = param(
        None, "Weight file of `distill_backbone` (torchvision backbones)."
    )
    distill_steps: int = param(
        3000, "Teacher distillation iterations (paper: 60000; CPU-sized default).", check=at_least(1)
    )
    distill_lr: float = param(
        1e-3,
        "Adam learning rate of the distillation, divided by 10 after 95 % of the steps (paper: 1e-4, constant, "
        "over 60000 iterations; 1e-3 fits our 3000).",
        check=positive(),
    )
    distill_seed: int = param(
        0,
        "Seed of the teacher's distillation (one teacher serves every training seed, as in the paper).",
        check=at_least(0),
    )
    distill_batch_size: int = param(8, "Images per distillation iteration (paper: 16).", check=at_least(1))
    distill_size: int = param(
        64, "PDN crop size of the distillation in pixels, a multiple of 16 (paper: 256).", check=at_least(16)
    )

    def _check_params(self) -> None:
        from iadkit.backbones import backbone_names

        if self.quantile_low >= self.quantile_high:
            raise InvalidParameterError(
                f"EfficientAD: quantile_low={self.quantile_low} must be below quantile_high={self.quantile_high}"
            )
        if self.distill_size % 16:
            raise InvalidParameterError(f"EfficientAD: distill_size={self.distill_size} is not a multiple of 16")
        if self.distill_backbone not in backbone_names():
            raise InvalidParameterError(
                f"EfficientAD: unknown distill_backbone {self.distill_backbone!r}; choose one of {', '.join(backbone_names())}"
            )
        for name in ("teacher_path", "distill_weights_path"):
            value = getattr(self, name)
            if value is not None and not os.path.isfile(value):
                raise InvalidParameterError(f"EfficientAD: {name} {os.fspath(value)!r} is not a file")
        if self.penalty_folder is not None and not os.path.isdir(self.penalty_folder):
            raise InvalidParameterError(
                f"EfficientAD: penalty_folder {os.fspath(self.penalty_folder)!r} is not a folder"
            )

    # -- networks -----------------------------------------------------------------------------------
    def _build(self) -> None:
        c = self.out_channels
        self.teacher_ = PatchDescriptionNetwork(self.model_size, c)
        self.student_ = PatchDescriptionNetwork(self.model_size, 2 * c)
        self.autoencoder_ = AutoEncoder(c)
        for net in (self.teacher_, self.student_):
            net.to(memory_format=torch.channels_last)
        self.teacher_.requires_grad_(False)
        self.register_buffer("teacher_mean_", torch.zeros(1, c, 1, 1))
        self.register_buffer("teacher_std_", torch.ones(1, c, 1, 1))
        # q_a, q_b of the student-teacher map, then of the autoencoder map
        self.register_buffer("quantiles_", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.fit_info_: dict[str, Any] = {}

    def _after_load(self) -> None:
        # Loaded tensors arrive in the default layout; the PDNs run channels-last (oneDNN's
        # faster path on CPU), as they did when fitted, so the scores are the same bit for bit.
        for net in (self.teacher_, self.student_):
            net.to(memory_format=torch.channels_last)

    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's output, standardised per channel (training-image statistics)."""
        with torch.no_grad():
            t = self.teacher_(images.contiguous(memory_format=torch.channels_last))
        return ((t - self.teacher_mean_) / self.teacher_std_).contiguous()

    def branch_maps(self, images: torch.Tensor, *, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(M_ST, M_AE), [B, h, w] at the PDN's grid; quantile-normalised unless `normalize` is False."""
        c = self.out_channels
        t = self.teacher_features(images)
        s = self.student_(images.contiguous(memory_format=torch.channels_last))
        a = self.autoencoder_(images, tuple(t.shape[-2:]))
        map_st = ((t - s[:, :c]) ** 2).mean(1)
        map_ae = ((a - s[:, c:]) ** 2).mean(1)
        if normalize:
            q = self.quantiles_
            map_st, map_ae = normalize_map(map_st, q[0], q[1]), normalize_map(map_ae, q[2], q[3])
        return map_st, map_ae

    def _predict(self, images: torch.Tensor) -> Prediction:
        # Padded before the normalisation (anomalib's order): the border takes the value of a
        # zero distance, below any real one, and puts no floor under the image scores.
        map_st, map_ae = (F.pad(m, (MAP_PAD,) * 4) for m in self.branch_maps(images, normalize=False))
        q = self.quantiles_
        combined = 0.5 * normalize_map(map_st, q[0], q[1]) + 0.5 * normalize_map(map_ae, q[2], q[3])
        return Prediction(scores=None, maps=combined)

    # -- fit -------------------------------------------------------------------------------------------
    def teacher_config(self) -> dict[str, Any]:
        """The `distillation_config` of this detector's teacher (what names its cache file)."""
        return distillation_config(
            size=self.model_size,
            out_channels=self.out_channels,
            backbone=self.distill_backbone,
            weights_path=self.distill_weights_path,
            steps=self.distill_steps,
            batch_size=self.distill_batch_size,
            crop=self.distill_size,
            seed=self.distill_seed,
            lr=self.distill_lr,
        )

    def _teacher_state(self, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
        # Distilling (or only building the backbone to hash its weights) draws from the global
        # random generator; kept out of the seeded stream of training, whose result then does
        # not depend on whether the teacher came from the cache.
        with torch.random.fork_rng(devices=self._rng_devices()):
            return self._teacher_state_unseeded(progress)

    def _teacher_state_unseeded(self, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
        if self.teacher_path is not None:
            tensors, meta = read_teacher(self.teacher_path)
            return tensors, meta.get("info", {}), os.fspath(self.teacher_path)
        config = self.teacher_config()
        tensors, info = cached_teacher(
            config, weights_path=self.distill_weights_path, device=self.device, progress=progress
        )
        return tensors, info, str(PACKAGED_TEACHER if info.get("packaged") else teacher_cache_path(config))

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        t0 = time.perf_counter()
        h, w = train.preprocess.output_size
        if pdn_output_size(min(h, w)) < 1:
            raise InvalidParameterError(
                f"EfficientAD needs inputs of at least 33 px (its patch description network sees 33 x 33 patches); "
                f"this model's are {h} x {w}: use a larger image_size (the paper's: 256)"
            )
        tensors, teacher_info, teacher_source = self._teacher_state(progress)
        load_teacher_weights(self.teacher_, tensors, teacher_source)
        self.teacher_.eval()
        n = len(train)
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(n, generator=g).tolist()
        n_val = max(1, round(self.validation_fraction * n)) if n > 1 else 0
        val_idx, train_idx = order[:n_val], order[n_val:] or order  # one image: it serves both
        if not val_idx:
            val_idx = train_idx

        # Channel statistics of the teacher on the (un-augmented) training images.
        with torch.no_grad():
            total = torch.zeros(self.out_channels, dtype=torch.float64, device=self.device)
            total_sq = torch.zeros_like(total)
            count = 0
            for start in range(0, len(train_idx), 8):
                x = torch.stack([train.image(i) for i in train_idx[start : start + 8]]).to(self.device)
                t = self.teacher_(x.contiguous(memory_format=torch.channels_last)).double()
                total += t.sum(dim=(0, 2, 3))
                total_sq += (t * t).sum(dim=(0, 2, 3))
                count += t.shape[0] * t.shape[2] * t.shape[3]
            mean = total / count
            std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
            self.teacher_mean_ = mean.float().view(1, -1, 1, 1).to(self.device)
            self.teacher_std_ = std.float().view(1, -1, 1, 1).to(self.device)

        losses = self._train(train, train_idx, g, progress)
        self._set_quantiles(train, val_idx)
        self.fit_info_ = {
            "teacher": teacher_source,
            "teacher_info": teacher_info,
            "n_train": len(train_idx),
            "n_validation": len(val_idx),
            "loss_first": float(np.mean(losses[:10])),
            "loss_last": float(np.mean(losses[-50:])),
            "seconds": time.perf_counter() - t0,
        }

    def _train(self, train: ImageSet, train_idx: list[int], g: torch.Generator, progress: bool) -> list[float]:
        from iadkit.components.general_images import GeneralImages
        from iadkit.progress import step_bar

        c = self.out_channels
        penalty_source = GeneralImages(folder=self.penalty_folder) if self.penalty else None
        params = list(self.student_.parameters()) + list(self.autoencoder_.parameters())
        optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=max(1, int(LR_DROP_AT * self.steps)), gamma=0.1
        )
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        # The teacher's output on an un-augmented training image never changes: computed once
        # per image (while it fits in 512 MB), not on every visit.
        teacher_cache: dict[int, torch.Tensor] = {}
        cache_budget = 512 * 2**20
        queue: list[int] = []
        losses: list[float] = []
        self.student_.train()
        self.autoencoder_.train()
        with step_bar(self.steps, "efficientad", enabled=progress) as bar:
            for step in range(self.steps):
                idx = []
                for _ in range(self.batch_size):
                    if not queue:
                        queue = [train_idx[i] for i in torch.randperm(len(train_idx), generator=g).tolist()]
                    idx.append(queue.pop())
                x = torch.stack([train.image(i) for i in idx]).to(self.device)
                t_st = []
                for i, xi in zip(idx, x):
                    t_i = teacher_cache.get(i)
                    if t_i is None:
                        t_i = self.teacher_features(xi[None])[0]
                        if (len(teacher_cache) + 1) * t_i.numel() * 4 <= cache_budget:
                            teacher_cache[i] = t_i
                    t_st.append(t_i)
                target_st = torch.stack(t_st)
                x_ae = (augment_for_autoencoder((x * std + mean).clamp(0, 1), g) - mean) / std
                parts = [x, x_ae]
                if penalty_source is not None:
                    pen = penalty_source.batch(
                        len(idx), (int(x.shape[-2]), int(x.shape[-1])), g, grayscale=PENALTY_GRAYSCALE
                    ).to(self.device)
                    parts.append((pen - mean) / std)
                # One student pass over the three kinds of images (the same numbers as three).
                out = self.student_(torch.cat(parts).contiguous(memory_format=torch.channels_last))
                b = len(idx)
                s_st, s_ae = out[:b, :c], out[b : 2 * b, c:]
                loss_st = hard_feature_loss((target_st - s_st) ** 2, self.hard_quantile)
                if penalty_source is not None:
                    loss_st = loss_st + torch.mean(out[2 * b :, :c] ** 2)
                a = self.autoencoder_(x_ae, tuple(target_st.shape[-2:]))
                t_ae = self.teacher_features(x_ae)
                loss_ae = torch.mean((t_ae - a) ** 2)
                loss_stae = torch.mean((a - s_ae) ** 2)
                loss = loss_st + loss_ae + loss_stae
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        f"efficientad: the training loss became {float(loss.detach())} at step {step + 1}; lower the learning rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                bar.advance(loss=float(np.mean(losses[-50:])))
        self.student_.eval()
        self.autoencoder_.eval()
        return losses

    @torch.no_grad()
    def _set_quantiles(self, train: ImageSet, val_idx: list[int]) -> None:
        maps_st, maps_ae = [], []
        for start in range(0, len(val_idx), 8):
            x = torch.stack([train.image(i) for i in val_idx[start : start + 8]]).to(self.device)
            m_st, m_ae = self.branch_maps(x, normalize=False)
            maps_st.append(m_st.cpu())
            maps_ae.append(m_ae.cpu())
        qa_st, qb_st = map_quantiles(torch.cat(maps_st), self.quantile_low, self.quantile_high)
        qa_ae, qb_ae = map_quantiles(torch.cat(maps_ae), self.quantile_low, self.quantile_high)
        # A branch whose validation maps are constant has no scale: keep a unit range.
        qb_st = qb_st if qb_st > qa_st else qa_st + 1.0
        qb_ae = qb_ae if qb_ae > qa_ae else qa_ae + 1.0
        self.quantiles_ = torch.tensor([qa_st, qb_st, qa_ae, qb_ae], dtype=torch.float32, device=self.device)


__all__ = [
    "PACKAGED_TEACHER",
    "AutoEncoder",
    "DistillationTarget",
    "EfficientAD",
    "PatchDescriptionNetwork",
    "augment_for_autoencoder",
    "cached_teacher",
    "distill_teacher",
    "distillation_config",
    "hard_feature_loss",
    "held_out_distillation_mse",
    "load_teacher_weights",
    "map_quantiles",
    "normalize_map",
    "packaged_teacher",
    "pdn_output_size",
    "read_teacher",
    "save_teacher",
    "teacher_cache_path",
]
