"""Trainable networks for teacher–student methods.

- `StudentNetwork`: the backbone's own architecture up to the deepest tapped layer, randomly
  initialised (STFPM: "a student network with the identical architecture", trained from
  scratch to regress the pretrained teacher's pyramid).
- `OneClassBottleneck` and `ReverseDecoder`: RD4AD's trainable part. The paper's encoder is a
  WideResNet-50 whose three stages the decoder mirrors with ResNet blocks that upsample by
  transposed convolutions. These classes build the same structure for any encoder from the
  channels and strides of its tapped levels, so an EfficientNet-Lite0 pyramid (24@1/4, 40@1/8,
  112@1/16) gets a decoder whose stages output exactly those shapes.

Blocks are ResNet basic blocks (two 3x3 convolutions + shortcut), the block type of the
paper's ResNet-18 variant, because the narrow channels of mobile encoders leave no room for
the 4x bottleneck squeeze. Unlike a ResNet, outputs that are compared with an encoder
feature end without ReLU: EfficientNet stage outputs are signed (no activation after the
projection conv), and a non-negative prediction could not align with them in cosine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from iadkit.backbones import get_spec
from iadkit.backbones.weights import BackboneError
from iadkit.data.transforms import ImageSet
from iadkit.errors import IadkitError


class TrainingDivergedError(IadkitError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the method and the epoch."""


class StudentNetwork(nn.Module):
    """A randomly initialised copy of `backbone`'s layers up to the deepest of `layers`.

    `forward(x)` returns ``{layer: map}`` like a `FeatureExtractor`, so student and teacher
    outputs pair up by name. The initialisation is the architecture library's own (timm /
    torchvision), drawn under `seed` so that two students built alike are identical.
    """

    def __init__(self, backbone: str, layers: Sequence[str], *, seed: int = 0) -> None:
        super().__init__()
        spec = get_spec(backbone)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.builder.create(spec.arch)
        steps = spec.builder.stages(model)
        names = [n for n, _ in steps]
        unknown = [layer for layer in layers if layer not in names]
        if not layers or unknown:
            raise BackboneError(
                f"backbone {backbone!r}: invalid student layers {list(layers)}; choose among {', '.join(names)}"
            )
        deepest = max(names.index(layer) for layer in layers)
        self.body = nn.Sequential(*[m for _, m in steps[: deepest + 1]])
        self._step_names = tuple(names[: deepest + 1])
        self.layers = tuple(layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        taps: dict[str, torch.Tensor] = {}
        for name, module in zip(self._step_names, self.body):
            x = module(x)
            if name in self.layers:
                taps[name] = x
        return {name: taps[name] for name in self.layers}


# -- RD4AD -----------------------------------------------------------------------------------
def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)
    )


def _log2_ratio(big: int, small: int) -> int:
    ratio = big // small
    if big % small or ratio & (ratio - 1):
        raise ValueError(f"strides must differ by powers of two, got {small} and {big}")
    return int(math.log2(ratio))


class ResidualBlock(nn.Module):
    """ResNet basic block that keeps, halves (`stride=2`) or multiplies (`upsample=f`) the size.

    Downsampling uses a strided 3x3 conv; upsampling a transposed conv with kernel = stride = f,
    RD4AD's "deconvolution" in place of the strided conv; the shortcut does the same with a
    projection when shape or channels change. `final_relu=False` leaves the output signed.
    """

    def __init__(self, cin: int, cout: int, *, stride: int = 1, upsample: int = 1, final_relu: bool = True) -> None:
        super().__init__()
        if stride > 1 and upsample > 1:
            raise ValueError("a block either downsamples or upsamples")
        if upsample > 1:
            first: nn.Module = nn.ConvTranspose2d(cin, cout, upsample, stride=upsample, bias=False)
        else:
            first = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.conv1 = first
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module
        if upsample > 1:
            self.shortcut = nn.Sequential(
                nn.ConvTranspose2d(cin, cout, upsample, stride=upsample, bias=False), nn.BatchNorm2d(cout)
            )
        elif stride > 1 or cin != cout:
            self.shortcut = _conv_bn(cin, cout, kernel=1, stride=stride)
        else:
            self.shortcut = nn.Identity()
        self.final_relu = final_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return self.relu(out) if self.final_relu else out


class OneClassBottleneck(nn.Module):
    """RD4AD's OCBE: multi-scale feature fusion (MFF) then one-class embedding (OCE).

    MFF brings every level to the deepest one's resolution with strided 3x3 conv + BN + ReLU
    (one per halving, widening like the encoder: the paper's 256→512→1024 and 512→1024 for
    WideResNet-50) and
    concatenates them with the deepest level. OCE is one more residual stage, stride 2, that
    compresses the fusion into the compact embedding the decoder starts from (the paper:
    ResNet stage-4 blocks, 3072 → 2048 channels at 1/32).
    """

    def __init__(
        self, channels: Sequence[int], strides: Sequence[int], *, embed_channels: int | None = None, blocks: int = 1
    ) -> None:
        super().__init__()
        channels, strides = list(channels), list(strides)
        if len(channels) != len(strides) or not channels:
            raise ValueError("channels and strides must list the same encoder levels")
        if sorted(strides) != strides:
            raise ValueError(f"encoder levels must go shallow to deep, got strides {strides}")
        deep_c, deep_s = channels[-1], strides[-1]
        # Each halving step widens to the encoder's own width at the new stride, as the
        # paper's 256 -> 512 -> 1024; the last step always lands on the deepest level's width.
        width_at = {s: c for c, s in zip(channels, strides)}
        self.fuse = nn.ModuleList()
        for c, s in zip(channels[:-1], strides[:-1]):
            steps: list[nn.Module] = []
            cin = c
            n_steps = max(1, _log2_ratio(deep_s, s))
            for i in range(n_steps):
                stride = 2 if s < deep_s else 1
                s = s * stride
                cout = deep_c if i == n_steps - 1 else width_at.get(s, deep_c)
                steps += [_conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True)]
                cin = cout
            self.fuse.append(nn.Sequential(*steps))
        fused = deep_c * len(channels)
        self.embed_channels = int(embed_channels or 2 * deep_c)
        oce: list[nn.Module] = [ResidualBlock(fused, self.embed_channels, stride=2)]
        oce += [ResidualBlock(self.embed_channels, self.embed_channels) for _ in range(blocks - 1)]
        self.oce = nn.Sequential(*oce)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        fused = [f(x) for f, x in zip(self.fuse, feats[:-1])] + [feats[-1]]
        return self.oce(torch.cat(fused, dim=1))


class ReverseDecoder(nn.Module):
    """RD4AD's student decoder: the encoder's stages in reverse, from the embedding up.

    Stage k upsamples (transposed conv) to encoder level k's resolution and channels, then
    refines with more blocks: `blocks` per stage, an int or one count per stage from the
    deepest (the official WideResNet-50 decoder has 3, 4, 6; its ResNet-18 decoder 2, 2, 2).
    Returns predictions shallow-to-deep, aligned with the encoder levels they restore.
    """

    def __init__(
        self,
        channels: Sequence[int],
        strides: Sequence[int],
        *,
        embed_channels: int,
        blocks: int | Sequence[int] = 1,
    ) -> None:
        super().__init__()
        channels, strides = list(channels), list(strides)
        per_stage = [int(blocks)] * len(channels) if isinstance(blocks, int) else [int(b) for b in blocks]
        if len(per_stage) != len(channels) or min(per_stage) < 1:
            raise ValueError(f"decoder blocks: one count >= 1 per encoder level ({len(channels)}), got {blocks}")
        self.stages = nn.ModuleList()
        cin, s_in = embed_channels, strides[-1] * 2
        for c, s, blocks in zip(reversed(channels), reversed(strides), per_stage):
            factor = s_in // s
            if s_in % s:
                raise ValueError(f"strides must divide each other, got {s} and {s_in}")
            last = blocks == 1
            stage: list[nn.Module] = [
                ResidualBlock(cin, c, upsample=factor, final_relu=not last)
                if factor > 1
                else ResidualBlock(cin, c, final_relu=not last)
            ]
            for i in range(blocks - 1):
                stage.append(ResidualBlock(c, c, final_relu=i < blocks - 2))
            self.stages.append(nn.Sequential(*stage))
            cin, s_in = c, s

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        x = z
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs[::-1]


# -- training --------------------------------------------------------------------------------
def train_epochs(
    train: ImageSet,
    step: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    description: str = "train",
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> list[float]:
    """`feature_cache.train_on_indices` over images: `step(images)` gets each shuffled batch of
    preprocessed training images on `device` (the loop of methods that must see the pixels
    every epoch). Returns the mean loss of each epoch."""
    from iadkit.components.feature_cache import train_on_indices

    def on_indices(idx: np.ndarray) -> torch.Tensor:
        return step(torch.stack([train.image(int(i)) for i in idx]).to(device))

    return train_on_indices(
        len(train),
        on_indices,
        optimizer,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        description=description,
        progress=progress,
    )


__all__ = [
    "OneClassBottleneck",
    "ResidualBlock",
    "ReverseDecoder",
    "StudentNetwork",
    "TrainingDivergedError",
    "train_epochs",
]
