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
- 256×256 input → the model's preprocessing; σ = 4 at the paper's resolution → ``sigma=4``
  given at a 224-px reference and scaled to the input size (same physical blur).

The bottleneck and decoder are saved in the model file; the encoder is rebuilt on load.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from iadkit.backbones import FeatureExtractor
from iadkit.components.distillation import OneClassBottleneck, ReverseDecoder, train_epochs
from iadkit.components.losses import cosine_distance_map, multilevel_cosine_loss
from iadkit.components.postprocess import blur_at_reference_sigma, upsample
from iadkit.data.transforms import ImageSet
from iadkit.methods.base import Detector, register
from iadkit.types import Prediction


@register
class ReverseDistillation(Detector):
    """Teacher encoder → one-class bottleneck → student decoder (Deng & Li, CVPR 2022)."""

    name = "reverse_distillation"
    family = "teacher-student"
    paper = "Deng & Li, Anomaly Detection via Reverse Distillation from One-Class Embedding, CVPR 2022"

    def __init__(
        self,
        *,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] = ("blocks.1", "blocks.2", "blocks.4"),
        weights_path: str | None = None,
        embed_channels: int | None = None,
        bottleneck_blocks: int = 1,
        decoder_blocks: int = 1,
        epochs: int = 40,
        batch_size: int = 16,
        lr: float = 0.005,
        betas: Sequence[float] = (0.5, 0.999),
        sigma: float = 4.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if len(layers) < 2:
            raise ValueError("reverse distillation needs at least two encoder layers (the paper uses three)")
        self.backbone_name = backbone
        self.layers = tuple(layers)
        self.weights_path = weights_path
        self.embed_channels = None if embed_channels is None else int(embed_channels)
        self.bottleneck_blocks = int(bottleneck_blocks)
        self.decoder_blocks = int(decoder_blocks)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.backbone = FeatureExtractor(backbone, self.layers, weights_path)
        channels = [self.backbone.channels[k] for k in self.layers]
        strides = [self.backbone.strides[k] for k in self.layers]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.bottleneck = OneClassBottleneck(
                channels, strides, embed_channels=self.embed_channels, blocks=self.bottleneck_blocks
            )
            self.decoder = ReverseDecoder(
                channels, strides, embed_channels=self.bottleneck.embed_channels, blocks=self.decoder_blocks
            )
        self.bottleneck.eval()
        self.decoder.eval()

    def _pairs(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            enc = self.backbone(images)
        enc_list = [enc[k] for k in self.layers]
        dec_list = self.decoder(self.bottleneck(enc_list))
        return list(zip(enc_list, dec_list))

    def fit(self, train: ImageSet, *, progress: bool = True) -> "ReverseDistillation":
        trainable = nn.ModuleList([self.bottleneck, self.decoder])
        trainable.train()
        optimizer = torch.optim.Adam(trainable.parameters(), lr=self.lr, betas=self.betas)
        self.loss_history = train_epochs(
            train,
            lambda images: multilevel_cosine_loss(self._pairs(images)),
            optimizer,
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=self.seed,
            description="reverse distillation",
            progress=progress,
            device=self.device,
        )
        trainable.eval()
        self._mark_fitted()
        return self

    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted()
        size = tuple(images.shape[-2:])
        maps = torch.stack([upsample(cosine_distance_map(e, d), size) for e, d in self._pairs(images)]).sum(0)
        maps = blur_at_reference_sigma(maps, self.sigma)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)
