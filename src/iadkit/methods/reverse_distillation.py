"""Reverse Distillation (RD4AD) — anomaly detection via reverse distillation from one-class embedding.

Paper: H. Deng, X. Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding",
CVPR 2022 (arXiv:2201.10703).

Algorithm (the paper's; the loss as its official code trains it, see below):
- teacher E: a frozen, ImageNet-pretrained encoder tapped at 3 stages (shallow to deep);
- one-class bottleneck embedding (OCBE), trainable: multi-scale feature fusion (strided
  3x3 conv + BN + ReLU bringing the shallow stages to the deepest one's resolution,
  concatenated) followed by one residual stage (stride 2) — the compact one-class embedding;
- student D: a decoder that mirrors the encoder in reverse (residual blocks upsampling by
  transposed convolutions) and restores the three encoder stages from the embedding;
- loss: cosine distance between E's and D's features at each of the three scales, summed;
- anomaly map: ``Σ_k Upsample(1 − cos)`` per position at input size, then a Gaussian
  filter σ = 4; image score = maximum of the map.

Paper → official code (hq-deng/RD4AD) → anomalib 2.7.0 → ours:

=====================  =========================  ===========================  ======================  ==============================
item                   paper                      official code                anomalib                ours
=====================  =========================  ===========================  ======================  ==============================
encoder                WRN-50 layer1-3            same                         ResNet family only      Lite0 blocks.1/2/4 (24@1/4,
                                                                                                       40@1/8, 112@1/16);
                                                                                                       ``paper=True``: WRN-50 layer1-3
loss                   Σ_k mean_hw(1 − cos) per   Σ_k mean_b(1 − cos) of the   as the official code    ``loss="flat"`` (default, the
                       position                   whole flattened C·H·W map                            official form) or
                                                                                                       ``"position"`` (the paper's)
OCE                    ResNet stage 4             3 Bottleneck (WRN) /         same                    ``bottleneck_blocks=1`` basic
                                                  2 BasicBlock (R18)                                   block (``paper=True``: 3)
decoder                mirror of the encoder      stages of 3, 4, 6 Bottleneck same                    1 basic block per stage
                                                  (WRN) / 2, 2, 2 (R18)                                (``paper=True``: 3, 4, 6); last
                                                                                                       block of a stage ends without
                                                                                                       ReLU (Lite0 outputs are signed)
optimiser              Adam 0.005, β (.5, .999)   same                         β (.5, **.99**)         same as the paper
batch / epochs         16 / 200                   16 / 200                     32 / unset              16 / **40** (CPU-sized;
                                                                                                       ``paper=True``: 200)
map                    sum, σ 4                   sum, align_corners=True,     same, σ 4 at input     sum, align_corners=False, σ 4
                                                  σ 4                          size                    at 224 px scaled to the input
encoder features       every step                 every step                   every step              computed **once** before
                                                                                                       training (ONNX Runtime)
=====================  =========================  ===========================  ======================  ==============================

Why the official (flattened) loss by default — measured, mean image AUROC / AUPRO over the
five synthetic demo categories at 128 px, 20 epochs: ``"position"`` 0.562 / 0.809,
``"flat"`` 0.908 / 0.819; with two blocks per decoder stage and in the OCE: 0.732 / 0.837
and 0.863 / 0.793. With the per-position loss every image's maximum sits in the top-right
corner of the map (the corner features of Lite0's TF-"same"-padded stages are large and the
decoder does not learn them when each of the h·w positions weighs 1/(h·w)); the flattened
loss weighs positions by their feature norm and learns them, so the maximum moves to the
defects. On ELPV (224 px, 20 epochs) ``"flat"``: mono 0.921, poly 0.731 (full protocol).

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
from iadkit.errors import InvalidParameterError
from iadkit.methods.base import PRESET_STRIDES_4_8_16, BackboneDetector, register
from iadkit.methods.params import Interval, Length, OneOf, at_least, param, positive
from iadkit.types import Prediction


@register
class ReverseDistillation(BackboneDetector):
    """Teacher encoder → one-class bottleneck → student decoder (Deng & Li, CVPR 2022)."""

    name = "reverse_distillation"
    family = "teacher-student"
    paper = "Deng & Li, Anomaly Detection via Reverse Distillation from One-Class Embedding, CVPR 2022"
    smoke_params = {"epochs": 4, "batch_size": 8}
    paper_params = {
        "backbone": "wide_resnet50_2",
        "epochs": 200,
        "embed_channels": 2048,
        "bottleneck_blocks": 3,
        "decoder_blocks": (3, 4, 6),
    }
    paper_image_size = 256

    layer_presets = PRESET_STRIDES_4_8_16
    layers: tuple[str, ...] | None = param(
        None,
        "Encoder stages, shallow to deep (WRN-50 layer1-3); None: the preset for the backbone's family (`layer_presets`).",
        check=Length(2),
    )
    embed_channels: int | None = param(
        None, "Width of the one-class embedding (None: twice the deepest stage).", check=at_least(1)
    )
    bottleneck_blocks: int = param(
        1,
        "Residual blocks in the one-class embedding stage (official: 2 for ResNet-18, 3 for WRN-50).",
        check=at_least(1),
    )
    decoder_blocks: int | tuple[int, ...] = param(
        1,
        "Residual blocks per decoder stage, or one count per stage from the deepest (official: 2,2,2 / 3,4,6).",
        check=at_least(1),
    )
    loss: str = param(
        "flat",
        "'position': 1 - cos per position (the paper's equation); 'flat': 1 - cos of the whole flattened map (official code, anomalib).",
        check=OneOf(("position", "flat")),
    )
    epochs: int = param(40, "Training epochs (paper: 200; CPU-sized default).", check=at_least(1))
    batch_size: int = param(16, "Images per Adam step (paper: 16).", check=at_least(1))
    lr: float = param(0.005, "Adam learning rate (paper: 0.005).", check=positive())
    betas: tuple[float, float] = param(
        (0.5, 0.999), "Adam betas (paper: 0.5, 0.999).", check=Interval(0, 1, closed="left")
    )

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
        optimizer = torch.optim.Adam(trainable.parameters(), lr=self.lr, betas=(self.betas[0], self.betas[1]))
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
        size = (images.shape[-2], images.shape[-1])
        maps = torch.stack([upsample(cosine_distance_map(e, d), size) for e, d in self._pairs(images)]).sum(0)
        return Prediction(scores=None, maps=maps)
