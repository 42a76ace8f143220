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

Paper → authors' code (DonaldRR/SimpleNet, run.sh + defaults) → ours (anomalib 2.7.0 has no
SimpleNet):

=====================  ========================  =================================  =======================================
item                   paper                     authors' code                      ours
=====================  ========================  =================================  =======================================
features               WRN-50 layer2+3, 3x3      same, 1536-d (PatchCore pipeline)  Lite0 blocks.2+4, 3x3, ``embed_dim``
                       neighbourhood                                                 384 (Lite0 has 152 channels; cost
                                                                                     grows with its square);
                                                                                     ``paper=True``: WRN-50, 1536
adaptor                linear                    Linear 1536→1536, xavier-normal,   same: xavier-normal, AdamW 1e-4,
                                                 **AdamW lr·0.1 = 1e-4, wd 0.01**   wd 0.01 (``adaptor_lr``,
                                                                                     ``adaptor_weight_decay``)
discriminator          2-layer MLP               Linear→BN→LeakyReLU(.2)→Linear,    same layers, hidden = embed_dim,
                                                 hidden 1024, xavier-normal,        xavier-normal, Adam 2e-4, wd 1e-5
                                                 Adam 2e-4, wd 1e-5
noise                  N(0, σ²), σ = 0.015       σ = 0.015 (absolute, WRN-50        σ = 0.1 in units of the good
                                                 feature scale)                     features' RMS spread (0.015 of
                                                                                     Lite0's linear-bottleneck features
                                                                                     leaves them indistinguishable:
                                                                                     chance AUROC)
loss                   truncated L1, th 0.5      same                               same
schedule               160 epochs, batch 8       40 x 4, batch 8; keeps the         **40** epochs (CPU-sized;
                                                 meta-epoch with the best *test*    ``paper=True``: 160), the last one
                                                 AUROC                              (no test data is used)
input                  288 crop of 329           same                               the model's (``paper=True``: 288)
map / score            bilinear + Gaussian σ 4;  same, σ 4 px at the input size     Postprocess: σ 4 at a 224-px input,
                       max of patch scores                                          scaled to the input; score = max of
                                                                                     the patch scores
features per epoch     —                         every step                         computed **once** (ONNX Runtime);
                                                                                     the noise is in feature space
=====================  ========================  =================================  =======================================
"""

from __future__ import annotations

import torch

from iadkit.components.adaptor import Discriminator, FeatureAdaptor, gaussian_feature_noise, truncated_l1_loss
from iadkit.components.features import PatchEmbedding
from iadkit.data.transforms import ImageSet
from iadkit.methods.base import PRESET_STRIDES_8_16, BackboneDetector, register
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

    layer_presets = PRESET_STRIDES_8_16
    layers: tuple[str, ...] | None = param(
        None,
        "Backbone layers (strides 8, 16: WRN-50 layer2/3); None: the preset for the backbone's family (`layer_presets`).",
        check=Length(1),
    )
    patch_size: int = param(3, "Neighbourhood aggregated around each position (paper: 3).", check=at_least(1))
    embed_dim: int = param(384, "Patch feature dimension (paper: 1536 on WRN-50).", check=at_least(1))
    noise_std: float = param(0.1, "Gaussian noise std, in units of the good features' spread.", check=positive())
    threshold: float = param(0.5, "Truncation th+ = th- of the L1 loss (paper: 0.5).", check=positive())
    epochs: int = param(40, "Training epochs (paper: 160; CPU-sized default).", check=at_least(1))
    batch_size: int = param(8, "Images per step (paper: 8).", check=at_least(1))
    adaptor_lr: float = param(1e-4, "Adaptor AdamW learning rate (authors' code: 0.1 x 1e-3).", check=positive())
    adaptor_weight_decay: float = param(
        0.01, "Adaptor AdamW weight decay (authors' code: AdamW's default 0.01).", check=at_least(0)
    )
    discriminator_lr: float = param(2e-4, "Discriminator Adam learning rate (paper: 2e-4).", check=positive())
    weight_decay: float = param(1e-5, "Discriminator Adam weight decay (paper: 1e-5).", check=at_least(0))

    # learned buffers, registered in _build (declared for type checkers)
    feat_mean_: torch.Tensor
    feat_scale_: torch.Tensor

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
        disc_opt = torch.optim.Adam(
            self.discriminator_.parameters(), lr=self.discriminator_lr, weight_decay=self.weight_decay
        )
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
