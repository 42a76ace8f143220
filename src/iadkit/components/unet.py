"""Encoder-decoder networks: DRAEM's two sub-networks and a generic U-Net for diffusion models.

**DRAEM** (Zavrtanik et al., ICCV 2021) chains two fully convolutional networks:

- `ReconstructiveSubNetwork`: an encoder-decoder *without* skip connections (a skip would let
  the anomaly through) that maps an image with a synthetic anomaly back to the good image.
- `DiscriminativeSubNetwork`: a U-Net with skip connections on the 6-channel concatenation
  [reconstruction, input]; its 2-channel output, after softmax, is the anomaly map.

==================================  ==========================================  ============================
paper                               reference code (VitjanZ/DRAEM model_unet)   ours
==================================  ==========================================  ============================
reconstructive encoder-decoder      5 blocks of (conv3x3-BN-ReLU) x2, 4 max-     same; ``base_width=128``
                                    pools; widths b, 2b, 4b, 8b, 8b (b = 128);   default, smaller for CPU
                                    decoder: 4 x (bilinear up x2 + conv-BN-      configurations
                                    ReLU, then 2 conv-BN-ReLU), final conv3x3,
                                    no output activation
discriminative U-Net                6 blocks, 5 max-pools, widths b, 2b, 4b,     same; ``base_width=64``
                                    8b, 8b, 8b (b = 64); decoder concatenates
                                    each upsampled map with the encoder block
                                    of the same size; in 6, out 2 channels
initialisation                      conv weights N(0, 0.02), BN weights          `init_draem_weights`
                                    N(1, 0.02), BN biases 0 (training script)    (optionally seeded)
==================================  ==========================================  ============================

Parameter names follow the reference (``encoder.block1.0.weight``,
``decoder_segment.up_b.1.weight`` ...), so a state dict saved by the reference code loads into
these classes. At the paper's widths the reconstructive network has 69,048,579 parameters and
the discriminative network (6 -> 2 channels) 28,374,146: 97,422,725 together (the tests recount
them by hand from the architecture). Inputs must have a height and width divisible by 16
(reconstructive) or 32 (discriminative); anything else would make the skip connections or the
output size mismatch, so it raises `InputSizeError`.

**Generic U-Net** (`UNet`): the ADM / guided-diffusion layout that DDAD uses (Dhariwal & Nichol
2021): residual blocks with GroupNorm and SiLU, an optional per-sample embedding (a diffusion
timestep) added inside every residual block, optional self-attention at chosen levels, strided
convolution down, nearest-neighbour up + conv, skip connections from every encoder stage. Widths,
depth and attention are parameters so that the same code runs at the paper's size or CPU-sized.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from iadkit.errors import IadkitError


class InputSizeError(IadkitError, ValueError):
    """An image size the network cannot process; the message says which sizes it accepts."""


def check_divisible(x: torch.Tensor, factor: int, network: str) -> None:
    """Raise `InputSizeError` unless the last two dims of `x` are multiples of `factor`.

    Parameters
    ----------
    x
        Input batch [..., H, W].
    factor
        Required divisor (2 ** number of down-samplings).
    network
        Name used in the message.
    """
    h, w = x.shape[-2], x.shape[-1]
    if h % factor or w % factor:
        ok_h, ok_w = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
        raise InputSizeError(
            f"{network} needs a height and width divisible by {factor} (it halves the resolution "
            f"{int(math.log2(factor))} times); got {h}x{w}. Resize the images, e.g. to {ok_h}x{ok_w}."
        )


# -- DRAEM ---------------------------------------------------------------------------------------
def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _double_conv(cin: int, cout: int, mid: int | None = None) -> nn.Sequential:
    """(conv3x3-BN-ReLU) x2: cin -> mid -> cout (mid defaults to cout)."""
    mid = cout if mid is None else mid
    return nn.Sequential(*_conv_bn_relu(cin, mid), *_conv_bn_relu(mid, cout))


def _up_conv(cin: int, cout: int) -> nn.Sequential:
    """Bilinear x2 up-sampling (align_corners=True, as the reference), then conv3x3-BN-ReLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *_conv_bn_relu(cin, cout))


def _pool() -> nn.Sequential:
    return nn.Sequential(nn.MaxPool2d(2))  # wrapped as the reference does (keeps its key names)


class _ReconstructiveEncoder(nn.Module):
    def __init__(self, in_channels: int, b: int) -> None:
        super().__init__()
        self.block1 = _double_conv(in_channels, b)
        self.mp1 = _pool()
        self.block2 = _double_conv(b, 2 * b)
        self.mp2 = _pool()
        self.block3 = _double_conv(2 * b, 4 * b)
        self.mp3 = _pool()
        self.block4 = _double_conv(4 * b, 8 * b)
        self.mp4 = _pool()
        self.block5 = _double_conv(8 * b, 8 * b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mp1(self.block1(x))
        x = self.mp2(self.block2(x))
        x = self.mp3(self.block3(x))
        x = self.mp4(self.block4(x))
        return self.block5(x)


class _ReconstructiveDecoder(nn.Module):
    def __init__(self, b: int, out_channels: int) -> None:
        super().__init__()
        self.up1 = _up_conv(8 * b, 8 * b)
        self.db1 = _double_conv(8 * b, 4 * b, mid=8 * b)
        self.up2 = _up_conv(4 * b, 4 * b)
        self.db2 = _double_conv(4 * b, 2 * b, mid=4 * b)
        self.up3 = _up_conv(2 * b, 2 * b)
        self.db3 = _double_conv(2 * b, b, mid=2 * b)
        self.up4 = _up_conv(b, b)
        self.db4 = _double_conv(b, b)
        self.fin_out = nn.Sequential(nn.Conv2d(b, out_channels, kernel_size=3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.db1(self.up1(x))
        x = self.db2(self.up2(x))
        x = self.db3(self.up3(x))
        x = self.db4(self.up4(x))
        return self.fin_out(x)


class ReconstructiveSubNetwork(nn.Module):
    """DRAEM's reconstructive encoder-decoder (no skip connections, no output activation).

    Parameters
    ----------
    in_channels, out_channels
        Image channels in and out (3 and 3 in DRAEM).
    base_width
        Width b of the first block; the blocks have b, 2b, 4b, 8b, 8b channels (DRAEM: 128).
    """

    down_factor = 16  # four 2x2 max-pools

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_width: int = 128) -> None:
        super().__init__()
        if base_width < 1:
            raise ValueError(f"base_width must be positive, got {base_width}")
        self.encoder = _ReconstructiveEncoder(in_channels, base_width)
        self.decoder = _ReconstructiveDecoder(base_width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_channels, H, W] -> reconstruction [B, out_channels, H, W]; H, W multiples of 16."""
        check_divisible(x, self.down_factor, "DRAEM's reconstructive network")
        return self.decoder(self.encoder(x))


class _DiscriminativeEncoder(nn.Module):
    def __init__(self, in_channels: int, b: int) -> None:
        super().__init__()
        self.block1 = _double_conv(in_channels, b)
        self.mp1 = _pool()
        self.block2 = _double_conv(b, 2 * b)
        self.mp2 = _pool()
        self.block3 = _double_conv(2 * b, 4 * b)
        self.mp3 = _pool()
        self.block4 = _double_conv(4 * b, 8 * b)
        self.mp4 = _pool()
        self.block5 = _double_conv(8 * b, 8 * b)
        self.mp5 = _pool()
        self.block6 = _double_conv(8 * b, 8 * b)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b1 = self.block1(x)
        b2 = self.block2(self.mp1(b1))
        b3 = self.block3(self.mp2(b2))
        b4 = self.block4(self.mp3(b3))
        b5 = self.block5(self.mp4(b4))
        b6 = self.block6(self.mp5(b5))
        return [b1, b2, b3, b4, b5, b6]


class _DiscriminativeDecoder(nn.Module):
    def __init__(self, b: int, out_channels: int) -> None:
        super().__init__()
        # each db* sees [upsampled, same-size encoder block] concatenated
        self.up_b = _up_conv(8 * b, 8 * b)
        self.db_b = _double_conv(8 * b + 8 * b, 8 * b)
        self.up1 = _up_conv(8 * b, 4 * b)
        self.db1 = _double_conv(4 * b + 8 * b, 4 * b)
        self.up2 = _up_conv(4 * b, 2 * b)
        self.db2 = _double_conv(2 * b + 4 * b, 2 * b)
        self.up3 = _up_conv(2 * b, b)
        self.db3 = _double_conv(b + 2 * b, b)
        self.up4 = _up_conv(b, b)
        self.db4 = _double_conv(b + b, b)
        self.fin_out = nn.Sequential(nn.Conv2d(b, out_channels, kernel_size=3, padding=1))

    def forward(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        b1, b2, b3, b4, b5, b6 = blocks
        x = self.db_b(torch.cat([self.up_b(b6), b5], dim=1))
        x = self.db1(torch.cat([self.up1(x), b4], dim=1))
        x = self.db2(torch.cat([self.up2(x), b3], dim=1))
        x = self.db3(torch.cat([self.up3(x), b2], dim=1))
        x = self.db4(torch.cat([self.up4(x), b1], dim=1))
        return self.fin_out(x)


class DiscriminativeSubNetwork(nn.Module):
    """DRAEM's discriminative U-Net: [reconstruction, image] -> per-pixel class logits.

    Parameters
    ----------
    in_channels
        6 in DRAEM: the reconstruction and the input image, concatenated.
    out_channels
        2 in DRAEM (normal, anomalous); softmax over them gives the anomaly map.
    base_width
        Width b of the first block; blocks have b, 2b, 4b, 8b, 8b, 8b channels (DRAEM: 64).
    """

    down_factor = 32  # five 2x2 max-pools

    def __init__(self, in_channels: int = 6, out_channels: int = 2, base_width: int = 64) -> None:
        super().__init__()
        if base_width < 1:
            raise ValueError(f"base_width must be positive, got {base_width}")
        self.encoder_segment = _DiscriminativeEncoder(in_channels, base_width)
        self.decoder_segment = _DiscriminativeDecoder(base_width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_channels, H, W] -> logits [B, out_channels, H, W]; H, W multiples of 32."""
        check_divisible(x, self.down_factor, "DRAEM's discriminative network")
        return self.decoder_segment(self.encoder_segment(x))


@torch.no_grad()
def init_draem_weights(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """DRAEM's initialisation: every conv weight ~ N(0, 0.02); every BatchNorm weight ~ N(1, 0.02)
    and bias 0. Conv biases keep PyTorch's default distribution, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    as in the reference, but are redrawn from `generator` so that a seed fixes every parameter.
    Returns `module`.

    Parameters
    ----------
    module
        Network to initialise in place (all sub-modules).
    generator
        Source of randomness (CPU generator; values are drawn on the CPU then copied, so a
        seed gives the same weights on any device).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * 0.02)
            if m.bias is not None:
                bound = 1.0 / math.sqrt(m.weight[0].numel())
                m.bias.copy_((torch.rand(m.bias.shape, generator=generator) * 2 - 1) * bound)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(1.0 + torch.randn(m.weight.shape, generator=generator) * 0.02)
            m.bias.zero_()
    return module


# -- generic U-Net (ADM / guided-diffusion layout) -------------------------------------------------
def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise: a residual branch then starts as the identity (guided-diffusion's choice)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block: GroupNorm-SiLU-conv, + projected embedding, GroupNorm-SiLU-dropout-conv.

    Parameters
    ----------
    in_channels, out_channels
        Channels in and out (a 1x1 conv matches the skip path when they differ).
    embed_dim
        Size of the per-sample embedding added after the first conv; None for none.
    dropout
        Dropout before the second conv.
    groups
        GroupNorm groups (reduced to a divisor of the channel count if needed).
    """

    def __init__(
        self, in_channels: int, out_channels: int, embed_dim: int | None = None, dropout: float = 0.0, groups: int = 32
    ) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            _norm(in_channels, groups), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.embed = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, out_channels)) if embed_dim else None
        self.out_layers = nn.Sequential(
            _norm(out_channels, groups),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.in_layers(x)
        if self.embed is not None:
            if emb is None:
                raise ValueError("this block was built with an embedding; pass emb [B, embed_dim]")
            h = h + self.embed(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions of a feature map, with a residual.

    Parameters
    ----------
    channels
        Feature channels (divisible by `heads`).
    heads
        Attention heads.
    groups
        GroupNorm groups.
    """

    def __init__(self, channels: int, heads: int = 1, groups: int = 32) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        # [B, heads, tokens, head_dim] each
        q, k, v = qkv.reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h * w)
        return x + self.proj(out).reshape(b, c, h, w)


class UNet(nn.Module):
    """A U-Net with residual blocks, optional embedding conditioning and optional attention.

    Layout (as ADM / guided-diffusion, which DDAD uses): a 3x3 input conv; for each level,
    `num_res_blocks` residual blocks (plus attention at `attention_levels`), then a stride-2
    conv down (not after the last level); a middle of ResBlock-Attention-ResBlock; for each
    level in reverse, `num_res_blocks` + 1 residual blocks, each on the concatenation with one
    stored encoder activation, then nearest x2 up + conv (not after level 0); GroupNorm-SiLU
    and a zero-initialised 3x3 output conv. DDAD's network is this with base 64, multipliers
    (1, 1, 2, 2, 4, 4), 2 residual blocks, attention at 32, 16 and 8 px, 4 heads.

    Parameters
    ----------
    in_channels, out_channels
        Image channels in and out.
    base_width
        Channels of level 0; level i has ``base_width * channel_mults[i]``.
    channel_mults
        Width multiplier per level; the resolution halves between levels.
    num_res_blocks
        Residual blocks per level on the way down.
    embed_dim
        Size of the conditioning embedding passed to `forward` (e.g. a timestep embedding);
        None for an unconditioned U-Net.
    attention_levels
        Level indices (0 = full resolution) that get self-attention.
    heads
        Attention heads.
    dropout
        Dropout inside the residual blocks.
    groups
        GroupNorm groups (32 in ADM; fewer for narrow CPU networks).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        *,
        base_width: int = 32,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        embed_dim: int | None = None,
        attention_levels: Sequence[int] = (),
        heads: int = 1,
        dropout: float = 0.0,
        groups: int = 32,
    ) -> None:
        super().__init__()
        if not channel_mults or num_res_blocks < 1 or base_width < 1:
            raise ValueError("UNet needs at least one level, one residual block per level and a positive width")
        self.down_factor = 2 ** (len(channel_mults) - 1)
        self.embed_dim = embed_dim
        self.input_conv = nn.Conv2d(in_channels, base_width, 3, padding=1)

        def block(cin: int, cout: int, level: int) -> nn.ModuleList:
            layers = nn.ModuleList([ResBlock(cin, cout, embed_dim, dropout, groups)])
            if level in attention_levels:
                layers.append(AttentionBlock(cout, heads, groups))
            return layers

        self.down = nn.ModuleList()
        skips = [base_width]
        ch = base_width
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, base_width * mult, level))
                ch = base_width * mult
                skips.append(ch)
            if level < len(channel_mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
        self.middle = nn.ModuleList(
            [
                ResBlock(ch, ch, embed_dim, dropout, groups),
                AttentionBlock(ch, heads, groups),
                ResBlock(ch, ch, embed_dim, dropout, groups),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for i in range(num_res_blocks + 1):
                layers = block(ch + skips.pop(), base_width * mult, level)
                ch = base_width * mult
                if level > 0 and i == num_res_blocks:
                    layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    layers.append(nn.Conv2d(ch, ch, 3, padding=1))
                self.up.append(layers)
        self.output = nn.Sequential(_norm(ch, groups), nn.SiLU(), _zero(nn.Conv2d(ch, out_channels, 3, padding=1)))

    @staticmethod
    def _run(layers: nn.Module, h: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        for layer in layers.children():  # a ModuleList of one level's layers
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """[B, in_channels, H, W] (+ emb [B, embed_dim]) -> [B, out_channels, H, W].

        H and W must be multiples of 2 ** (levels - 1).
        """
        check_divisible(x, self.down_factor, "this U-Net")
        if (self.embed_dim is None) != (emb is None):
            raise ValueError(
                "pass emb [B, embed_dim] exactly when the U-Net was built with embed_dim "
                f"(embed_dim={self.embed_dim}, emb {'given' if emb is not None else 'missing'})"
            )
        h = self.input_conv(x)
        stored = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            stored.append(h)
        h = self._run(self.middle, h, emb)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, stored.pop()], dim=1), emb)
        return self.output(h)


__all__ = [
    "AttentionBlock",
    "DiscriminativeSubNetwork",
    "InputSizeError",
    "ReconstructiveSubNetwork",
    "ResBlock",
    "UNet",
    "check_divisible",
    "init_draem_weights",
]
