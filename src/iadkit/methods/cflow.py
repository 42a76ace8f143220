"""CFLOW-AD: conditional normalizing flows on feature vectors, conditioned on position.

Paper: Denis Gudovskiy, Shun Ishizaka, Kazuki Kozuka, "CFLOW-AD: Real-Time Unsupervised
Anomaly Detection with Localization via Conditional Normalizing Flows", WACV 2022.

Algorithm. A frozen pretrained encoder gives feature maps at L = 3 scales. Every feature
vector ("fiber") of a map is modelled by that scale's decoder: a conditional normalizing
flow of affine coupling layers whose sub-networks (fully connected) receive, besides half
of the fiber, a condition vector: the 2-D sinusoidal positional encoding of the fiber's
location (128 dims). Training samples random fibers (fiber batches of N) from good images
and minimises the negative log-likelihood normalised per dimension,
    -log p(x) / C = -(-C/2 log 2 pi - 1/2 ||z||^2 + log|det J|) / C.
At test time each scale gives the per-position log-likelihood / C; it is turned into a
likelihood relative to its maximum, exp(ll - max), upsampled bilinearly to the input size
and summed over scales; the anomaly map is the maximum of that sum minus the sum
(anomaly = max - likelihood), and the image score is the map's maximum.

Paper → official code (gudovskiy/cflow-ad) → anomalib 2.7.0 → ours:

=================  ======================  ============================  ==========================  ==============================
item               paper                   official code                 anomalib                    ours
=================  ======================  ============================  ==========================  ==============================
encoder / scales   WRN-50 layer2/3/4       same                          any timm, layer2/3/4        Lite0 blocks.2/4/6 (strides
                   (strides 8/16/32)                                                                 8/16/32); ``paper=True``: WRN-50
decoder            K = 8 couplings, FC     same, clamp 1.9, soft         hard permutation            same as official (random
                   sub-nets 2x wide        permutation (rotation)        (permute_soft False)        rotation, clamp 1.9)
condition          2-D PE, 128 dims        same                          same                        same
fiber loss         −log p / C              −log σ(log p / C)             −log σ(log p / C)           ``loss="logsigmoid"`` (default,
                                                                                                     official) or ``"nll"``
fiber / image      N 256 / 32              256 / 32 (drop_last)          **64** / 32                 256 / 32
batch
optimiser          Adam 2e-4, warm-up +    same                          Adam **1e-4**, constant     Adam 2e-4, constant (no warm-up
                   cosine                                                                            or cosine)
schedule           25 x 8 sub-epochs       25 meta-epochs x 8            unset                       **20** epochs, each one pass
                                                                                                     over every fiber (CPU-sized;
                                                                                                     ``paper=True``: 25)
before the flow    raw features            raw                           raw                         per-channel standardisation
                                                                                                     (fixed affine: ranking kept)
map "max"          over the test set       over the test set             over the current test       fixed at fit time from the
                                                                         **batch**                   training images: a score
                                                                                                     depends on its image only
encoder features   every step              every step                    every step                  computed **once** (ONNX Runtime)
=================  ======================  ============================  ==========================  ==============================

The log-sigmoid loss (≈ −ll/C while a fiber is unlikely, saturating once it is likely) and
the plain NLL measure alike here (mean image AUROC over the five synthetic demo categories,
128 px, 10 epochs: 0.933 vs 0.932); we keep the official one.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from iadkit.components.flows import (
    ChannelStandardizer,
    Flow,
    coupling_flow,
    gaussian_log_likelihood,
    level_flows,
    mlp_subnet,
    standardized_features,
)
from iadkit.components.postprocess import upsample
from iadkit.data.transforms import ImageSet
from iadkit.methods.base import BackboneDetector, register
from iadkit.methods.params import Divisible, Length, OneOf, at_least, param, positive
from iadkit.progress import step_bar
from iadkit.types import Prediction


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """Sinusoidal 2-D positional encoding [channels, H, W] (Transformer encoding per axis).

    The first half of the channels encodes the column, the second half the row; within a
    half, pairs (sin, cos) of position * 10000^(-2i/half) for i = 0 .. half/2 - 1.
    """
    if channels % 4 != 0:
        raise ValueError(f"positional encoding needs a multiple of 4 channels, got {channels}")
    half = channels // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(10000.0) / half))
    cols = torch.arange(width, dtype=torch.float64)[:, None] * freq[None]  # [W, half/2]
    rows = torch.arange(height, dtype=torch.float64)[:, None] * freq[None]  # [H, half/2]
    pe = torch.zeros(channels, height, width, dtype=torch.float64)
    pe[0:half:2] = torch.sin(cols).t()[:, None, :].expand(-1, height, -1)
    pe[1:half:2] = torch.cos(cols).t()[:, None, :].expand(-1, height, -1)
    pe[half::2] = torch.sin(rows).t()[:, :, None].expand(-1, -1, width)
    pe[half + 1 :: 2] = torch.cos(rows).t()[:, :, None].expand(-1, -1, width)
    return pe.float()


def cflow_decoder(channels: int, cond_channels: int, blocks: int, clamp: float, seed: int) -> Flow:
    """One scale's decoder: `blocks` x (conditional affine coupling, fixed random rotation).

    Sub-network: linear(in -> 2 in) -> ReLU -> linear(2 in -> out), in = C/2 + condition.
    """
    return coupling_flow(
        channels,
        blocks,
        lambda step, cin, cout: mlp_subnet(cin, cout, 2 * cin),
        cond_channels=cond_channels,
        clamp=clamp,
        mixing="orthogonal",
        seed=seed,
    )


def fiber_loss(ll_per_dim: torch.Tensor, kind: str) -> torch.Tensor:
    """The decoders' training loss on fibers' per-dimension log-likelihoods ll/C: the official
    code's and anomalib's ``-log sigmoid(ll/C)`` (≈ -ll/C while a fiber is unlikely, saturating
    once it is likely: likely fibers stop pulling) or the plain ``-ll/C``; mean over fibers."""
    if kind == "logsigmoid":
        return -F.logsigmoid(ll_per_dim).mean()
    return -ll_per_dim.mean()


@register
class CFlow(BackboneDetector):
    """CFLOW-AD (Gudovskiy et al. 2022): positional-conditional flows on feature fibers."""

    name = "cflow"
    family = "normalizing flow"
    paper = "Gudovskiy et al., CFLOW-AD: Real-Time Unsupervised Anomaly Detection with Localization via Conditional Normalizing Flows, WACV 2022"
    smoke_params = {"epochs": 1, "coupling_blocks": 2, "layers": ("blocks.2", "blocks.4")}
    paper_params = {"backbone": "wide_resnet50_2", "epochs": 25}
    paper_image_size = 256
    map_sigma = 0.0  # the paper does not smooth its maps

    layer_presets = {
        "efficientnet": ("blocks.2", "blocks.4", "blocks.6"),
        "resnet": ("layer2", "layer3", "layer4"),
        "mobilenet": ("features.6", "features.13", "features.17"),
    }
    layers: tuple[str, ...] | None = param(
        None,
        "Encoder scales (strides 8/16/32); None: the preset for the backbone's family (`layer_presets`).",
        check=Length(1),
    )
    coupling_blocks: int = param(8, "Conditional coupling blocks per scale (paper: 8).", check=at_least(1))
    condition_dim: int = param(
        128, "Positional-encoding condition size (paper: 128).", check=(at_least(4), Divisible(4))
    )
    clamp: float = param(1.9, "Soft clamp of the coupling scales (authors' code: 1.9).", check=at_least(0))
    epochs: int = param(20, "Training epochs (CPU-sized default).", check=at_least(1))
    batch_size: int = param(32, "Images per feature batch.", check=at_least(1))
    fiber_batch_size: int = param(256, "Fibers per optimiser step, N (paper: 256).", check=at_least(1))
    lr: float = param(2e-4, "Adam learning rate (paper: 2e-4).", check=positive())
    loss: str = param(
        "logsigmoid",
        "Fiber loss on the per-dimension log-likelihood ll/C: 'logsigmoid' = -log sigmoid(ll/C) (official code "
        "and anomalib) or 'nll' = -ll/C (the paper's maximum likelihood).",
        check=OneOf(("logsigmoid", "nll")),
    )

    # learned buffers, registered in _build (declared for type checkers)
    ll_max_: torch.Tensor
    map_max_: torch.Tensor

    def _build(self) -> None:
        super()._build()
        channels = self.layer_channels()
        self.decoders_ = level_flows(
            channels,
            lambda c, seed: cflow_decoder(c, self.condition_dim, self.coupling_blocks, self.clamp, seed),
            self.seed,
        )
        self.standardizers_ = nn.ModuleList(ChannelStandardizer(c) for c in channels)
        # per-scale max training log-likelihood / C, and the max summed likelihood map
        self.register_buffer("ll_max_", torch.zeros(len(channels)))
        self.register_buffer("map_max_", torch.tensor(float(len(channels))))

    # -- pieces ------------------------------------------------------------------------------
    def _fibers(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C, H, W] -> fibers [B*H*W, C] and their conditions [B*H*W, P]."""
        b, c, h, w = fmap.shape
        pe = positional_encoding_2d(self.condition_dim, h, w).to(fmap)
        fibers = fmap.permute(0, 2, 3, 1).reshape(-1, c)
        cond = pe.permute(1, 2, 0).reshape(1, h * w, -1).expand(b, -1, -1).reshape(-1, self.condition_dim)
        return fibers, cond

    def _log_likelihood(self, level: int, fmap: torch.Tensor) -> torch.Tensor:
        """Per-position log-likelihood normalised per dimension, [B, H, W]."""
        b, c, h, w = fmap.shape
        fibers, cond = self._fibers(fmap)
        z, logdet = self.decoders_[level](fibers, cond)
        return (gaussian_log_likelihood(z, logdet) / c).reshape(b, h, w)

    def _likelihood_map(self, images: torch.Tensor) -> torch.Tensor:
        size = (images.shape[-2], images.shape[-1])
        total = None
        for level, fmap in enumerate(
            standardized_features(self.backbone_, self.tapped_layers(), self.standardizers_, images)
        ):
            prob = upsample(torch.exp(self._log_likelihood(level, fmap) - self.ll_max_[level]), size)
            total = prob if total is None else total + prob
        assert total is not None  # at least one level
        return total

    # -- training ----------------------------------------------------------------------------
    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        device = self.device
        # Frozen encoder, no augmentation: its maps are computed once; the decoders train on
        # random batches of their fibers.
        with self.frozen_features(train, batch_size=self.batch_size, progress=progress) as cache:
            levels = cache.all(device)
        fibers, conds = [], []
        for norm, fmap in zip(self.standardizers_, levels):
            x, c = self._fibers(cast(ChannelStandardizer, norm).fit(fmap))
            fibers.append(x)
            conds.append(c)
        del levels

        optimizer = torch.optim.Adam(self.decoders_.parameters(), lr=self.lr)
        n_steps = sum(-(-x.shape[0] // self.fiber_batch_size) for x in fibers)
        gen = torch.Generator().manual_seed(self.seed)
        self.decoders_.train()
        with step_bar(self.epochs * n_steps, "cflow", enabled=progress) as bar:
            for _ in range(self.epochs):
                for level, (x, c) in enumerate(zip(fibers, conds)):
                    order = torch.randperm(x.shape[0], generator=gen).to(x.device)
                    for start in range(0, x.shape[0], self.fiber_batch_size):
                        idx = order[start : start + self.fiber_batch_size]
                        z, logdet = self.decoders_[level](x[idx], c[idx])
                        loss = fiber_loss(gaussian_log_likelihood(z, logdet) / x.shape[1], self.loss)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        bar.advance(loss=loss.item(), scale=level)
        self.decoders_.eval()

        # fix the paper's "max" at fit time: per-scale max log-likelihood, then max summed map
        with torch.no_grad():
            for level, (x, c) in enumerate(zip(fibers, conds)):
                best = -math.inf
                for start in range(0, x.shape[0], 4096):
                    z, logdet = self.decoders_[level](x[start : start + 4096], c[start : start + 4096])
                    best = max(best, float((gaussian_log_likelihood(z, logdet) / x.shape[1]).max()))
                self.ll_max_[level] = best
            self.map_max_.fill_(-math.inf)
            for batch in train.batches(self.batch_size):
                peak = self._likelihood_map(batch.images.to(device)).flatten(1).amax()
                self.map_max_.copy_(torch.maximum(self.map_max_, peak))

    # -- inference ---------------------------------------------------------------------------
    def _predict(self, images: torch.Tensor) -> Prediction:
        return Prediction(scores=None, maps=self.map_max_ - self._likelihood_map(images))
