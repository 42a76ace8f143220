"""Reverse Distillation (RD4AD) — anomaly detection via reverse distillation from one-class embedding.

Paper: H. Deng, X. Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding",
CVPR 2022 (arXiv:2201.10703).

Algorithm (as in the paper):
- teacher E: a frozen, ImageNet-pretrained encoder tapped at 3 stages (shallow to deep);
- one-class bottleneck embedding (OCBE), trainable: multi-scale feature fusion (strided
  3x3 conv + BN + ReLU bringing the shallow stages to the deepest one's resolution,
  concatenated) followed by one residual stage (stride 2) — the compact one-class embedding;
- student D: a decoder that mirrors the encoder in reverse (residual blocks upsampling by
  transposed convolutions) and restores the three encoder stages from the embedding;
- loss ``L = Σ_k 1/(H_k W_k) Σ_hw (1 − cos(f_E^k(h,w), f_D^k(h,w)))``: cosine distance per
  position, averaged over positions, summed over the three scales;
- anomaly map: ``Σ_k Upsample(1 − cos)`` at input size, then a Gaussian filter σ = 4;
  image score = maximum of the map.

Paper hyper-parameters → ours:
- encoder WideResNet-50 (layer1..3: 256@1/4, 512@1/8, 1024@1/16; OCE 2048@1/32; decoder
  stages of 3/4/6 bottleneck blocks) → EfficientNet-Lite0 ``blocks.1/2/4`` (24@1/4, 40@1/8,
  112@1/16), OCE ``2 x 112 = 224``@1/32, decoder stages of ``decoder_blocks=1`` basic block
  each (``bottleneck_blocks``/``decoder_blocks`` scale it up; the encoder is a user choice —
  ``backbone="wide_resnet50_2", layers=("layer1", "layer2", "layer3")`` with the user's
  weight file, and ``embed_channels=2048``, gives the paper's shapes);
- Adam, lr 0.005, betas (0.5, 0.999), batch 16 → same;
- 200 epochs → ``epochs=40`` by default, a CPU-sized fixed schedule; the paper's 200 is a
  parameter;
- 256×256 input → the model's preprocessing; σ = 4 at the paper's resolution → the model's
  `Postprocess` (σ = 4 at a 224-px input, scaled to the input size: the same physical blur).

The bottleneck and decoder are saved in the model file; the encoder is rebuilt on load.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from iadkit.components.distillation import OneClassBottleneck, ReverseDecoder
from iadkit.components.feature_cache import train_on_indices
from iadkit.components.losses import cosine_distance_map, flattened_cosine_loss, multilevel_cosine_loss
from iadkit.components.postprocess import upsample
from iadkit.data.transforms import ImageSet
from iadkit.methods.base import BackboneDetector, register
from iadkit.errors import InvalidParameterError
from iadkit.methods.params import Interval, Length, OneOf, at_least, param, positive
from iadkit.types import Prediction


@register
class ReverseDistillation(BackboneDetector):
    """Teacher encoder → one-class bottleneck → student decoder (Deng & Li, CVPR 2022)."""

    name = "reverse_distillation"
    family = "teacher-student"
    paper = "Deng & Li, Anomaly Detection via Reverse Distillation from One-Class Embedding, CVPR 2022"
    smoke_params = {"epochs": 2, "batch_size": 8}
    paper_params = {"backbone": "wide_resnet50_2", "epochs": 200, "embed_channels": 2048, "bottleneck_blocks": 3, "decoder_blocks": (3, 4, 6)}
    paper_image_size = 256

    layer_presets = {"efficientnet": ('blocks.1', 'blocks.2', 'blocks.4'), "resnet": ('layer1', 'layer2', 'layer3'), "mobilenet": ('features.3', 'features.6', 'features.13')}
    layers: tuple[str, ...] | None = param(
        None, "Encoder stages, shallow to deep (WRN-50 layer1-3); None: the preset for the backbone's family (`layer_presets`).", check=Length(2)
    )
    embed_channels: int | None = param(None, "Width of the one-class embedding (None: twice the deepest stage).", check=at_least(1))
    bottleneck_blocks: int = param(1, "Residual blocks in the one-class embedding stage (official: 2 for ResNet-18, 3 for WRN-50).", check=at_least(1))
    decoder_blocks: int | tuple[int, ...] = param(
        1, "Residual blocks per decoder stage, or one count per stage from the deepest (official: 2,2,2 / 3,4,6).", check=at_least(1)
    )
    loss: str = param(
        "position", "'position': 1 - cos per position (the paper's equation); 'flat': 1 - cos of the whole flattened map (official code, anomalib).", check=OneOf(("position", "flat"))
    )
    epochs: int = param(40, "Training epochs (paper: 200; CPU-sized default).", check=at_least(1))
    batch_size: int = param(16, "Images per Adam step (paper: 16).", check=at_least(1))
    lr: float = param(0.005, "Adam learning rate (paper: 0.005).", check=positive())
    betas: tuple[float, float] = param((0.5, 0.999), "Adam betas (paper: 0.5, 0.999).", check=Interval(0, 1, closed="left"))

    def _build(self) -> None:
        super()._build()
        channels, strides = self.layer_channels(), self.layer_strides()
        self.bottleneck_ = OneClassBottleneck(
            channels, strides, embed_channels=self.embed_channels, blocks=self.bottleneck_blocks
        )
        self.decoder_ = ReverseDecoder(
            channels, strides, embed_channels=self.bottleneck_.embed_channels, blocks=self.decoder_blocks
        )
        self.bottleneck_.eval()
        self.decoder_.eval()

    def _pairs(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        enc = self.features(images)
        return list(zip(enc, self.decoder_(self.bottleneck_(enc))))

    def _check_params(self) -> None:
        super()._check_params()
        if isinstance(self.decoder_blocks, tuple) and len(self.decoder_blocks) != len(self.tapped_layers()):
            raise InvalidParameterError(
                f"ReverseDistillation: decoder_blocks {self.decoder_blocks} needs one count per layer ({len(self.tapped_layers())})"
            )

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        # The encoder is frozen and the images are not augmented: its features are computed
        # once and the bottleneck and decoder train on them.
        encoder = self.frozen_features(train, batch_size=self.batch_size, progress=progress)
        trainable = nn.ModuleList([self.bottleneck_, self.decoder_])
        trainable.train()
        optimizer = torch.optim.Adam(trainable.parameters(), lr=self.lr, betas=tuple(self.betas))
        loss_fn = multilevel_cosine_loss if self.loss == "position" else flattened_cosine_loss

        def step(idx: np.ndarray) -> torch.Tensor:
            enc = encoder.take(idx, self.device)
            return loss_fn(list(zip(enc, self.decoder_(self.bottleneck_(enc)))))

        with encoder:
            self.loss_history_ = train_on_indices(
                len(train),
                step,
                optimizer,
                epochs=self.epochs,
                batch_size=self.batch_size,
                seed=self.seed,
                description="reverse distillation",
                progress=progress,
            )
        trainable.eval()

    def _predict(self, images: torch.Tensor) -> Prediction:
        size = tuple(images.shape[-2:])
        maps = torch.stack([upsample(cosine_distance_map(e, d), size) for e, d in self._pairs(images)]).sum(0)
        return Prediction(scores=None, maps=maps)
