"""Image autoencoders without skip connections: Bergmann et al.'s SSIM-AE network and the
DCGAN encoder/decoder that GANomaly stacks into an encoder-decoder-encoder.

**SSIM-AE** (Bergmann, Löwe, Fauser, Sattlegger, Steger, "Improving Unsupervised Defect
Segmentation by Applying Structural Similarity to Autoencoders", VISAPP 2019), Table 1 of the
paper, at a 128 x 128 x 1 input and latent size d = 100 (b = `base_width` = 32):

=========  ===========  ======  ======  =======    =========  ===========  ======  ======  =======
encoder    output       kernel  stride  padding    decoder    output       kernel  stride  padding
=========  ===========  ======  ======  =======    =========  ===========  ======  ======  =======
Conv1      64x64x b     4       2       1          ConvT1     8x8x b       8       1       0
Conv2      32x32x b     4       2       1          Conv10     8x8x 2b      3       1       1
Conv3      32x32x b     3       1       1          Conv11     8x8x 4b      3       1       1
Conv4      16x16x 2b    4       2       1          ConvT2     16x16x 2b    4       2       1
Conv5      16x16x 2b    3       1       1          Conv12     16x16x 2b    3       1       1
Conv6      8x8x 4b      4       2       1          ConvT3     32x32x b     4       2       1
Conv7      8x8x 2b      3       1       1          Conv13     32x32x b     3       1       1
Conv8      8x8x b       3       1       1          ConvT4     64x64x b     4       2       1
Conv9      1x1x d       8       1       0          ConvT5     128x128x C   4       2       1
=========  ===========  ======  ======  =======    =========  ===========  ======  ======  =======

Leaky ReLU (slope 0.2) after every layer except the last of the encoder and of the decoder,
which are linear; no normalisation layers. For an input side s other than 128 (a multiple of
16) the bottleneck kernel is s/16 instead of 8, so the code is still a 1 x 1 x d vector.

**DCGAN encoder / decoder** as GANomaly's reference code (samet-akcay/ganomaly,
``lib/networks.py``) builds them for an input side ``isize`` (a power of two >= 16 here):
the encoder is conv4x4/2 + LeakyReLU(0.2), then (conv4x4/2, BatchNorm, LeakyReLU(0.2))
doubling the width until the map is 4 x 4, then a 4 x 4 conv to ``nz`` channels (1 x 1); the
decoder mirrors it with transposed convolutions, BatchNorm and ReLU and ends in a Tanh. All
convolutions are bias-free. `dcgan_init` is the reference's ``weights_init``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from iadkit.components.unet import InputSizeError


def _lrelu() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.2, inplace=True)


class SSIMAutoencoder(nn.Module):
    """Bergmann et al.'s convolutional autoencoder (the table above).

    Parameters
    ----------
    in_channels
        Image channels (1 in the paper, whose data are grayscale; 3 for colour).
    latent_dim
        Size d of the 1 x 1 bottleneck (paper: 100).
    base_width
        b, the width of the first layers; the layers have b, 2b or 4b channels (paper: 32).
    input_size
        Side (or (height, width)) of the input, multiples of 16 (paper: 128); sets the
        bottleneck kernel to input_size / 16.
    """

    def __init__(
        self, in_channels: int = 1, latent_dim: int = 100, base_width: int = 32, input_size: int | tuple[int, int] = 128
    ) -> None:
        super().__init__()
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
        if h % 16 or w % 16 or h < 16 or w < 16:
            raise InputSizeError(f"the SSIM autoencoder needs sides that are multiples of 16, got {h}x{w}")
        if min(in_channels, latent_dim, base_width) < 1:
            raise ValueError("in_channels, latent_dim and base_width must be positive")
        self.input_size = (h, w)
        b, d = base_width, latent_dim
        k = (h // 16, w // 16)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, b, 4, 2, 1), _lrelu(),
            nn.Conv2d(b, b, 4, 2, 1), _lrelu(),
            nn.Conv2d(b, b, 3, 1, 1), _lrelu(),
            nn.Conv2d(b, 2 * b, 4, 2, 1), _lrelu(),
            nn.Conv2d(2 * b, 2 * b, 3, 1, 1), _lrelu(),
            nn.Conv2d(2 * b, 4 * b, 4, 2, 1), _lrelu(),
            nn.Conv2d(4 * b, 2 * b, 3, 1, 1), _lrelu(),
            nn.Conv2d(2 * b, b, 3, 1, 1), _lrelu(),
            nn.Conv2d(b, d, k, 1, 0),  # linear: the code
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(d, b, k, 1, 0), _lrelu(),
            nn.Conv2d(b, 2 * b, 3, 1, 1), _lrelu(),
            nn.Conv2d(2 * b, 4 * b, 3, 1, 1), _lrelu(),
            nn.ConvTranspose2d(4 * b, 2 * b, 4, 2, 1), _lrelu(),
            nn.Conv2d(2 * b, 2 * b, 3, 1, 1), _lrelu(),
            nn.ConvTranspose2d(2 * b, b, 4, 2, 1), _lrelu(),
            nn.Conv2d(b, b, 3, 1, 1), _lrelu(),
            nn.ConvTranspose2d(b, b, 4, 2, 1), _lrelu(),
            nn.ConvTranspose2d(b, in_channels, 4, 2, 1),  # linear: the reconstruction
        )  # fmt: skip

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> code [B, d, 1, 1]."""
        if tuple(x.shape[-2:]) != self.input_size:
            h, w = self.input_size
            raise InputSizeError(f"this autoencoder was built for {h}x{w} inputs, got {x.shape[-2]}x{x.shape[-1]}")
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> reconstruction [B, C, H, W]."""
        return self.decoder(self.encode(x))


def _dcgan_levels(image_size: int) -> int:
    """Stride-2 steps from `image_size` down to 4 (the DCGAN pyramid); a power of two >= 16."""
    if image_size < 16 or image_size & (image_size - 1):
        raise InputSizeError(
            f"the DCGAN encoder/decoder needs a power-of-two input side >= 16 (16, 32, 64, 128, 256), got {image_size}"
        )
    return int(math.log2(image_size)) - 2


class DCGANEncoder(nn.Module):
    """GANomaly's (DCGAN) encoder: [B, C, s, s] -> [B, out_channels, 1, 1].

    Parameters
    ----------
    image_size
        Input side s, a power of two >= 16.
    out_channels
        Channels of the 1 x 1 output (nz = 100 for GANomaly's encoders, 1 for its
        discriminator's classifier).
    in_channels
        Image channels.
    base_width
        Width of the first conv (ngf = 64 in the reference); it doubles at every level.
    extra_layers
        Extra conv3x3-BN-LeakyReLU layers after the first conv (reference default 0).
    """

    def __init__(
        self, image_size: int, out_channels: int, in_channels: int = 3, base_width: int = 64, extra_layers: int = 0
    ) -> None:
        super().__init__()
        levels = _dcgan_levels(image_size)
        width = base_width
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1, bias=False), _lrelu()]
        for _ in range(extra_layers):
            layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), _lrelu()]
        for _ in range(levels - 1):  # image_size / 2 -> 4
            layers += [nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * width), _lrelu()]
            width *= 2
        self.features = nn.Sequential(*layers)
        self.final = nn.Conv2d(width, out_channels, 4, 1, 0, bias=False)
        self.feature_channels = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.features(x))


class DCGANDecoder(nn.Module):
    """GANomaly's (DCGAN) decoder: [B, in_channels, 1, 1] -> Tanh image [B, C, s, s].

    Parameters
    ----------
    image_size
        Output side s, a power of two >= 16.
    in_channels
        Latent channels (nz).
    out_channels
        Image channels.
    base_width
        Width before the last transposed conv (ngf); the first layer has
        ``base_width * image_size / 8`` channels and each level halves it.
    extra_layers
        Extra conv3x3-BN-ReLU layers before the last transposed conv.
    """

    def __init__(
        self, image_size: int, in_channels: int, out_channels: int = 3, base_width: int = 64, extra_layers: int = 0
    ) -> None:
        super().__init__()
        levels = _dcgan_levels(image_size)
        width = base_width * 2 ** (levels - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(in_channels, width, 4, 1, 0, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        for _ in range(levels - 1):  # 4 -> image_size / 2
            layers += [
                nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width // 2),
                nn.ReLU(True),
            ]
            width //= 2
        for _ in range(extra_layers):
            layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(width, out_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


@torch.no_grad()
def dcgan_init(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """DCGAN's initialisation (GANomaly's ``weights_init``): weights of every convolution and
    transposed convolution ~ N(0, 0.02); BatchNorm weights ~ N(1, 0.02), biases 0. Values are
    drawn on the CPU from `generator`, so a seed fixes them on any device. Returns `module`.

    Parameters
    ----------
    module
        Network to initialise in place.
    generator
        Source of randomness.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(1.0 + torch.randn(m.weight.shape, generator=generator) * 0.02)
            m.bias.zero_()
    return module


__all__ = ["DCGANDecoder", "DCGANEncoder", "SSIMAutoencoder", "dcgan_init"]
