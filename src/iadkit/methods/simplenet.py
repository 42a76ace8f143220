"""SimpleNet: a feature adaptor and a discriminator trained against Gaussian-noise anomalies.

Paper: Zhikang Liu, Yiming Zhou, Yuansheng Xu, Zilei Wang, "SimpleNet: A Simple Network for
Image Anomaly Detection and Localization", CVPR 2023.

Algorithm. A frozen ImageNet backbone gives two intermediate feature maps; every position's
3x3 neighbourhood is aggregated and the two levels are upsampled to a common grid and
projected to one vector per position (PatchCore's locally aware patch features). A feature
adaptor (one linear layer, dimension kept) maps them to q. Anomalous features are
synthesised as q- = q + eps, eps ~ N(0, sigma^2 I) with sigma = 0.015. A 2-layer MLP
discriminator D is trained with the truncated L1 loss
    L = max(0, th+ - D(q)) + max(0, th- + D(q-)),  th+ = th- = 0.5,
while the adaptor is trained jointly. At test time, no noise: the anomaly score of a
position is -D(q); the score map is upsampled bilinearly to the input size and smoothed
with a Gaussian (sigma = 4); the image score is the maximum of the (feature-resolution)
score map.

The paper's hyper-parameters (and the authors' run script where the paper is silent):
    WideResNet-50, layer2 + layer3, 3x3 neighbourhood, features projected to 1536 dims;
    input resized to 329 px and centre-cropped to 288; adaptor 1536 -> 1536; discriminator
    Linear-BN-LeakyReLU(0.2)-Linear with 1024 hidden units; sigma 0.015; th = 0.5; Adam
    with lr 1e-4 (adaptor) and 2e-4 (discriminator), weight decay 1e-5; batch 8;
    160 epochs (40 meta-epochs x 4).

Ours and why:
    - backbone: the packaged EfficientNet-Lite0 (the ImageNet backbone every user has
      offline), blocks.2 + blocks.4 (strides 8 / 16, the strides of WRN-50 layer2 / layer3);
    - feature dimension `embed_dim` = 384 instead of 1536: Lite0's two levels have 152
      channels (1368 with the 3x3 neighbourhood) against WRN-50's 1536, and adaptor and
      discriminator cost grows with its square; the discriminator's hidden width is
      `embed_dim` too (the authors' 1024 is 2/3 of their 1536);
    - features are centred per channel and divided by one scalar, the RMS per-channel
      standard deviation of the good training features, and the noise is drawn in those
      units: `noise_std` = 0.1 instead of the paper's 0.015. The paper's sigma is an
      absolute value tied to WRN-50's post-ReLU feature scale; Lite0's block outputs are
      linear bottlenecks with a spread ~15x larger, and the paper's 0.015 there leaves the
      noisy features indistinguishable (image AUROC 0.45-0.51 on our synthetic fabric, i.e.
      chance). 0.1 of the spread was chosen on the synthetic set (0.05-0.3 all work;
      mean image AUROC 0.87 over its five categories at 64 px, 40 epochs). One global scale keeps the
      features' geometry, as the paper's isotropic noise in raw feature space does;
    - epochs: 40 by default (CPU-sized fixed schedule; the paper's 160 is a parameter).
      The authors' code keeps the epoch with the best *test* AUROC; we use no test data
      and keep the last epoch;
    - the Gaussian sigma is the paper's 4 px whatever the input size (a parameter).
"""

from __future__ import annotations

import torch
from torch import nn

from iadkit.components.adaptor import Discriminator, FeatureAdaptor, gaussian_feature_noise, truncated_l1_loss
from iadkit.components.features import PatchEmbedding
from iadkit.data.transforms import ImageSet
from iadkit.methods.base import BackboneDetector, register
from iadkit.methods.params import Length, at_least, param, positive
from iadkit.progress import step_bar
from iadkit.types import Prediction


@register
class SimpleNet(BackboneDetector):
    """SimpleNet (Liu et al. 2023): adaptor + discriminator against Gaussian feature noise."""

    name = "simplenet"
    family = "one-class classification"
    paper = "Liu et al., SimpleNet: A Simple Network for Image Anomaly Detection and Localization, CVPR 2023"
    smoke_params = {"epochs": 2}
    paper_params = {"backbone": "wide_resnet50_2", "embed_dim": 1536, "epochs": 160}
    paper_image_size = 288

    layer_presets = {"efficientnet": ('blocks.2', 'blocks.4'), "resnet": ('layer2', 'layer3'), "mobilenet": ('features.6', 'features.13')}
    layers: tuple[str, ...] | None = param(
        None, "Backbone layers (strides 8, 16: WRN-50 layer2/3); None: the preset for the backbone's family (`layer_presets`).", check=Length(1)
    )
    patch_size: int = param(3, "Neighbourhood aggregated around each position (paper: 3).", check=at_least(1))
    embed_dim: int = param(384, "Patch feature dimension (paper: 1536 on WRN-50).", check=at_least(1))
    noise_std: float = param(0.1, "Gaussian noise std, in units of the good features' spread.", check=positive())
    threshold: float = param(0.5, "Truncation th+ = th- of the L1 loss (paper: 0.5).", check=positive())
    epochs: int = param(40, "Training epochs (paper: 160; CPU-sized default).", check=at_least(1))
    batch_size: int = param(8, "Images per step (paper: 8).", check=at_least(1))
    adaptor_lr: float = param(1e-4, "Adaptor AdamW learning rate (authors' code: 0.1 x 1e-3).", check=positive())
    adaptor_weight_decay: float = param(0.01, "Adaptor AdamW weight decay (authors' code: AdamW's default 0.01).", check=at_least(0))
    discriminator_lr: float = param(2e-4, "Discriminator Adam learning rate (paper: 2e-4).", check=positive())
    weight_decay: float = param(1e-5, "Discriminator Adam weight decay (paper: 1e-5).", check=at_least(0))

    def _build(self) -> None:
        super()._build()
        self.embedding_ = PatchEmbedding(
            self.layer_channels(),
            patch_size=self.patch_size,
            pretrain_dim=self.embed_dim,
            target_dim=self.embed_dim,
        )
        # centring per channel and one global scale (fixed at fit time; geometry preserved)
        self.register_buffer("feat_mean_", torch.zeros(self.embed_dim))
        self.register_buffer("feat_scale_", torch.ones(()))
        self.adaptor_ = FeatureAdaptor(self.embed_dim)
        self.discriminator_ = Discriminator(self.embed_dim)

    # -- pieces ------------------------------------------------------------------------------
    @torch.no_grad()
    def _patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen locally aware patch features [B, D, h, w]."""
        fmap = self.embedding_(self.features(images))
        return (fmap - self.feat_mean_.view(1, -1, 1, 1)) / self.feat_scale_

    @staticmethod
    def _vectors(fmap: torch.Tensor) -> torch.Tensor:
        return fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1])

    # -- training ----------------------------------------------------------------------------
    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        n = len(train)
        # The backbone and the patch embedding are frozen and the images not augmented (the
        # noise is added in feature space): the patch features are computed once.
        with self.frozen_features(train, head=self.embedding_, batch_size=self.batch_size, progress=progress) as cache:
            (cached,) = cache.all(self.device)
        # the noise is isotropic, so it is measured against the typical per-dimension spread
        # of good features: RMS over channels of the per-channel standard deviation
        self.feat_mean_.copy_(cached.mean(dim=(0, 2, 3)))
        self.feat_scale_.copy_(cached.var(dim=(0, 2, 3)).mean().sqrt().clamp_min(1e-6))
        cached = (cached - self.feat_mean_.view(1, -1, 1, 1)) / self.feat_scale_
        # The authors' two optimisers: AdamW for the adaptor, Adam for the discriminator.
        adaptor_opt = torch.optim.AdamW(
            self.adaptor_.parameters(), lr=self.adaptor_lr, weight_decay=self.adaptor_weight_decay
        )
        disc_opt = torch.optim.Adam(self.discriminator_.parameters(), lr=self.discriminator_lr, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(self.seed)
        n_batches = -(-n // self.batch_size)
        self.adaptor_.train()
        self.discriminator_.train()
        with step_bar(self.epochs * n_batches, "simplenet", enabled=progress) as bar:
            for _ in range(self.epochs):
                order = torch.randperm(n, generator=gen).to(cached.device)
                for start in range(0, n, self.batch_size):
                    q = self.adaptor_(self._vectors(cached[order[start : start + self.batch_size]]))
                    q_neg = gaussian_feature_noise(q, self.noise_std, gen)
                    scores = self.discriminator_(torch.cat([q, q_neg]))
                    normal, anomalous = scores[: q.shape[0]], scores[q.shape[0] :]
                    loss = truncated_l1_loss(normal, anomalous, self.threshold, self.threshold)
                    adaptor_opt.zero_grad(set_to_none=True)
                    disc_opt.zero_grad(set_to_none=True)
                    loss.backward()
                    adaptor_opt.step()
                    disc_opt.step()
                    bar.advance(
                        loss=loss.item(),
                        p_true=(normal >= self.threshold).float().mean().item(),
                        p_fake=(anomalous < -self.threshold).float().mean().item(),
                    )
        self.adaptor_.eval()
        self.discriminator_.eval()

    # -- inference ---------------------------------------------------------------------------
    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """-D(adaptor(features)) at feature resolution, [B, h, w]."""
        fmap = self._patch_features(images)
        b, _, h, w = fmap.shape
        return -self.discriminator_(self.adaptor_(self._vectors(fmap))).reshape(b, h, w)

    def _predict(self, images: torch.Tensor) -> Prediction:
        scores = self.patch_scores(images)
        return Prediction(scores=scores.flatten(1).amax(dim=1), maps=scores)
