"""DDAD — anomaly detection by conditioned denoising diffusion.

Paper: A. Mousakhan, T. Brox, J. Tayyub, "Anomaly Detection with Conditioned Denoising
Diffusion Models", arXiv:2305.15956 (2023); reference code arimousa/DDAD (``config.yaml``,
``train.py``/``loss.py``, ``reconstruction.py``, ``feature_extractor.py``, ``anomaly_map.py``,
``ddad.py``).

Algorithm:
1. *Denoiser*: a U-Net eps_theta(x_t, t) is trained on good images only with DDPM's
   epsilon-prediction loss: t ~ U{0..T-1}, eps ~ N(0, I),
   ``x_t = sqrt(a_t) x + sqrt(1 - a_t) eps``, loss ``sum_pixels (eps - eps_theta(x_t, t))^2``
   averaged over the batch (images scaled to [-1, 1]).
2. *Conditioned reconstruction*: a test image y is noised to step t_s (250 of 1000) and
   walked back to x_0 with DDIM jumps, each step's predicted noise pulled towards y:
   ``eps_hat = eps - sqrt(1 - a_t) w (y_t - x_t)``, ``y_t = sqrt(a_t) y + sqrt(1 - a_t) eps``
   (`components.diffusion.ddad_conditioned_noise`, `ddim_reconstruct`). Noise at t_s drowns a
   defect; the conditioning keeps the normal parts of y where they were.
3. *Domain adaptation* (optional second stage): a copy of the feature extractor is
   fine-tuned so that a good image and its reconstruction look alike to it: for two halves
   of a batch of good images, x0 = reconstruction of half B conditioned on half A (weight
   w_DA); loss, summed over the levels, ``mean_batch(1 - cos(F(x0), F(A)))`` +
   ``lambda mean_batch(1 - cos(F(A), F0(A)))`` + ``lambda mean_batch(1 - cos(F(x0), F0(x0)))``,
   each cosine over a whole flattened feature map, F0 the frozen original.
4. *Map*: pixel discrepancy ``D_p = mean_channels |x0 - y|`` plus feature discrepancy
   ``D_f = sum_levels upsample(1 - cos(P(F(y)), P(F(x0))))`` over the levels but the first,
   P a 3 x 3 average of neighbouring feature vectors, cosine over channels, bilinear
   upsampling (corners aligned); ``map = D_f + v (max D_f / max D_p) D_p``, then a Gaussian
   blur (sigma 4 at 256 px); image score = the map's maximum.

Time: at test, every image costs ``noise_step / skip + 1`` U-Net passes plus two feature
passes. With the CPU defaults at 64 px (width-32 U-Net, 3 passes) that is 0.11 s of CPU per
image on one thread, and training on a 60-image category 120 s of CPU (measured on the demo
synthetic set; wall time was 3-7x that on the shared, overloaded test machine). The paper's
configuration (11 passes of a 64-wide six-level U-Net with 2 residual blocks per level at
256 px) is, by a count of its full-resolution convolutions alone, over 100 times our pass per
pass (an estimate, not measured): tens of seconds per image on one CPU thread; it is meant
for a GPU.

Results at the CPU defaults, 64 px, demo synthetic set (image AUROC / pixel AUROC): fabric
0.82 / 0.85, metal 0.95 / 0.94, wood 0.84 / 0.93, washer 0.58 / 0.44, label 0.64 / 0.40. The
textures are repaired well; on the two objects 20 epochs do not teach the U-Net their
structure, so the reconstruction differs from the input along normal edges too.

=========================  ============================================  ============================================
paper                      reference code                                ours
=========================  ============================================  ============================================
denoiser                   guided-diffusion U-Net: base 64, mults        `components.diffusion.DenoisingUNet` (ADM
                           (1, 1, 2, 2, 4, 4) at 256 px, 2 res blocks,   layout; strided-conv down and nearest+conv
                           attention at 32/16/8 px, 4 heads, dropout     up instead of BigGAN res-block up/down).
                           0, BigGAN up/down blocks                      CPU default: base 32, mults (1, 2, 2), 1
                                                                         res block, attention at the lowest level,
                                                                         1 head; every size is a parameter
schedule                   linear betas 1e-4 .. 0.02, T = 1000           same (parameters)
training                   Adam lr 3e-4, L2 weight decay 0.05, batch     Adam, L2 weight decay 0.05, no
                           32, 3000 epochs (checkpoint 2000 for MVTec),  augmentation: the same. CPU defaults: 20
                           t uniform over all T, no augmentation         epochs, batch 8, lr 1e-3 (3e-4 leaves a
                                                                         20-epoch run untrained: demo fabric image
                                                                         AUROC 0.45, against 0.77 at 1e-3, width
                                                                         16); t uniform over 0..``train_max_step``
                                                                         = 250, the steps the test trajectory
                                                                         visits (all T: 0.70 against 0.77);
                                                                         None trains on all T as the paper
loss                       ``(e - e_theta).square().sum((1,2,3))``,      same
                           mean over the batch
reconstruction             noise to t = 250, DDIM jumps of 25 (steps     noise to ``noise_step`` 250, steps 250,
                           225, 200, ..., 0 then x0: 10 U-Net passes,    250 - skip, ..., 0 then x0 (each step
                           the first labelled one jump below the noise   labelled with its noise level); CPU
                           level), eta 1, w = 2 (MVTec)                  default ``skip`` 125 (3 passes); eta 1,
                                                                         w 2
noise at test              fresh ``randn`` per batch (results vary       seeded by ``seed``, one draw shared by the
                           from run to run)                              batch: an image's map does not depend on
                                                                         its batch or the run
feature extractor          WideResNet-101, layer1-3 (strides 4/8/16);    EfficientNet-Lite0 ``blocks.1/2/4`` (the
                           the map uses layer2-3                         same strides, packaged offline); the map
                                                                         uses all levels but the first, as the
                                                                         reference
domain adaptation          AdamW lr 1e-4, batch 16 split in halves,      same loss, optimiser, batch, w_DA, lambda
                           w_DA 3, lambda 0.1 (MVTec), 4 epochs; the     and 4 epochs; BN statistics kept frozen
                           extractor in train mode (BN statistics        (halves of 8 images give noisy
                           updated)                                      statistics). The adapted copy is saved in
                                                                         the model file; ``adaptation_epochs`` 0
                                                                         keeps the pretrained features
pixel/feature balance      ``v * max(D_f) / max(D_p)`` over the test     ``v`` 1; the ratio of maxima over 16 good
                           batch (16 images), v = 1 (MVTec)              training images after training (stored): a
                                                                         test score does not depend on its batch
smoothing                  Gaussian sigma 4 (kernel 33) at 256 px,       sigma 3.5 at 224 px (the same physical
                           then centre crop 224                          blur; ``map_sigma``), scaled to the input
image score                max of the smoothed map                       same (the model's post-processing)
=========================  ============================================  ============================================
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from iadkit.components.diffusion import DDPM_BETA_RANGE, DDPM_STEPS, DenoisingUNet, NoiseSchedule, ddim_reconstruct
from iadkit.data.transforms import ImageSet
from iadkit.errors import InvalidParameterError
from iadkit.methods.base import BackboneDetector, register
from iadkit.methods.params import Interval, Length, at_least, param, positive
from iadkit.progress import step_bar
from iadkit.types import Prediction

# DDAD balances the two discrepancies with maxima over a test batch of 16; we take the same
# ratio once, over this many good training images.
RATIO_IMAGES = 16


def epsilon_loss(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor
) -> torch.Tensor:
    """DDPM's epsilon-prediction loss as DDAD sums it: ``x_t = sqrt(a_t) x + sqrt(1 - a_t) eps``,
    ``sum over pixels of (eps - model(x_t, t))^2``, averaged over the batch.

    Parameters
    ----------
    model
        Noise predictor eps(x_t, t).
    x
        Clean images [B, C, H, W].
    t
        [B] timesteps.
    noise
        eps, standard normal, shaped like `x`.
    alpha_bar
        [T] cumulative signal fractions of the schedule.
    """
    a = alpha_bar.to(device=x.device, dtype=x.dtype)[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x + (1 - a).sqrt() * noise
    return (noise - model(x_t, t)).square().sum(dim=(1, 2, 3)).mean()


def pixel_discrepancy(x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """DDAD's D_p: mean over channels of |x0 - x|, [B, H, W].

    Parameters
    ----------
    x, x0
        Images and their reconstructions [B, C, H, W] (DDAD: in [-1, 1]).
    """
    return (x0 - x).abs().mean(dim=1)


def feature_discrepancy(
    feats: list[torch.Tensor], feats_rec: list[torch.Tensor], size: tuple[int, int]
) -> torch.Tensor:
    """DDAD's D_f: per level, 1 - cosine (over channels) of the 3 x 3-averaged feature vectors
    of the input and the reconstruction, upsampled (bilinear, corners aligned) to `size` and
    summed over levels, [B, *size].

    Parameters
    ----------
    feats, feats_rec
        Per level, the feature maps [B, C_l, H_l, W_l] of the input and of its reconstruction.
    size
        (H, W) of the output map (the image size).
    """
    total = None
    for a, b in zip(feats, feats_rec):
        a = F.avg_pool2d(a, 3, stride=1, padding=1, count_include_pad=True)
        b = F.avg_pool2d(b, 3, stride=1, padding=1, count_include_pad=True)
        d = 1 - F.cosine_similarity(a, b, dim=1)
        d = F.interpolate(d[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
        total = d if total is None else total + d
    assert total is not None
    return total


def whole_map_cosine_loss(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Sum over levels of ``mean_batch(1 - cos(flatten(a_l), flatten(b_l)))`` (DDAD's
    domain-adaptation terms: one cosine per sample over its whole feature map).

    Parameters
    ----------
    a, b
        Per level, feature maps [B, C_l, H_l, W_l] to compare.
    """
    return sum((1 - F.cosine_similarity(x.flatten(1), y.flatten(1), dim=1)).mean() for x, y in zip(a, b))  # type: ignore[return-value]


@register
class DDAD(BackboneDetector):
    """DDAD (Mousakhan et al. 2023): a denoising diffusion U-Net reconstructs the test image
    conditioned on itself; map = feature + pixel discrepancy."""

    name = "ddad"
    family = "diffusion"
    paper = "Mousakhan, Brox, Tayyub, Anomaly Detection with Conditioned Denoising Diffusion Models, arXiv 2023"
    map_sigma = 3.5  # sigma 4 at 256 px = 3.5 at 224 px
    smoke_params = {
        "epochs": 2,
        "batch_size": 8,
        "base_width": 8,
        "channel_mults": (1, 2),
        "attention_levels": (),
        "skip": 250,
        "adaptation_epochs": 1,
    }
    paper_params = {
        "backbone": "wide_resnet101_2",
        "layers": ("layer1", "layer2", "layer3"),
        "base_width": 64,
        "channel_mults": (1, 1, 2, 2, 4, 4),
        "num_res_blocks": 2,
        "attention_levels": (3, 4, 5),
        "heads": 4,
        "epochs": 2000,
        "batch_size": 32,
        "lr": 3e-4,
        "train_max_step": None,
        "skip": 25,
    }
    paper_image_size = 256

    layers: tuple[str, ...] = param(
        ("blocks.1", "blocks.2", "blocks.4"),
        "Feature levels (WRN-101 layer1-3 in the paper); the map uses all but the first.",
        check=Length(2),
    )
    base_width: int = param(32, "U-Net channels at full resolution (paper: 64).", check=at_least(2))
    channel_mults: tuple[int, ...] = param(
        (1, 2, 2),
        "U-Net width multiplier per level (paper: 1, 1, 2, 2, 4, 4 at 256 px).",
        check=(Length(1), at_least(1)),
    )
    num_res_blocks: int = param(1, "Residual blocks per U-Net level (paper: 2).", check=at_least(1))
    attention_levels: tuple[int, ...] = param(
        (2,), "U-Net levels with self-attention, 0 = full size (paper: the 32, 16, 8 px levels).", check=at_least(0)
    )
    heads: int = param(1, "Attention heads (paper: 4).", check=at_least(1))
    dropout: float = param(0.0, "U-Net dropout (paper: 0).", check=Interval(0, 1, closed="left"))
    groups: int = param(32, "GroupNorm groups (ADM: 32; reduced to a divisor of narrow widths).", check=at_least(1))
    diffusion_steps: int = param(DDPM_STEPS, "T, forward steps of the schedule (paper: 1000).", check=at_least(2))
    beta_start: float = param(
        DDPM_BETA_RANGE[0], "First beta of the linear schedule (paper: 1e-4).", check=Interval(0, 1, closed="neither")
    )
    beta_end: float = param(DDPM_BETA_RANGE[1], "Last beta (paper: 0.02).", check=Interval(0, 1, closed="neither"))
    epochs: int = param(
        20, "U-Net training epochs (paper: 3000, checkpoint 2000; CPU-sized default).", check=at_least(1)
    )
    batch_size: int = param(8, "Images per U-Net step (paper: 32; 8 gives a short run more steps).", check=at_least(1))
    lr: float = param(
        1e-3, "Adam learning rate (paper: 3e-4 over 3000 epochs; 1e-3 for the short CPU run).", check=positive()
    )
    weight_decay: float = param(0.05, "Adam L2 weight decay (paper: 0.05).", check=at_least(0))
    train_max_step: int | None = param(
        250,
        "Train on t <= this step only, the steps the test trajectory visits (CPU default 250 = noise_step); "
        "None: every t, as the paper.",
        check=at_least(0),
    )
    noise_step: int = param(250, "Step the test image is noised to (paper: 250 of 1000).", check=at_least(0))
    skip: int = param(125, "Steps per DDIM jump (paper: 25; CPU default 125, three U-Net passes).", check=at_least(1))
    condition_weight: float = param(
        2.0, "w, pull of each step towards the test image (paper: 2 for MVTec).", check=at_least(0)
    )
    eta: float = param(1.0, "DDIM stochasticity (paper: 1).", check=at_least(0))
    pixel_weight: float = param(
        1.0, "v, weight of the pixel discrepancy (paper: 1 for MVTec, 7 for VisA).", check=at_least(0)
    )
    adaptation_epochs: int = param(
        4, "Epochs of feature-extractor domain adaptation (paper: 4 for MVTec); 0: frozen features.", check=at_least(0)
    )
    adaptation_batch_size: int = param(
        16, "Images per adaptation step, split in halves (paper: 16).", check=at_least(2)
    )
    adaptation_weight: float = param(3.0, "w_DA, conditioning weight during adaptation (paper: 3).", check=at_least(0))
    adaptation_lambda: float = param(0.1, "lambda of the distillation terms (paper: 0.1 for MVTec).", check=at_least(0))
    adaptation_lr: float = param(1e-4, "AdamW learning rate of the adaptation (paper: 1e-4).", check=positive())

    def _check_params(self) -> None:
        super()._check_params()
        owner = type(self).__name__
        if self.beta_start > self.beta_end:
            raise InvalidParameterError(f"{owner}: beta_start={self.beta_start} exceeds beta_end={self.beta_end}")
        if self.noise_step >= self.diffusion_steps:
            raise InvalidParameterError(
                f"{owner}: noise_step={self.noise_step} must be below diffusion_steps={self.diffusion_steps}"
            )
        if self.train_max_step is not None and not self.noise_step <= self.train_max_step < self.diffusion_steps:
            raise InvalidParameterError(
                f"{owner}: train_max_step={self.train_max_step} must lie between noise_step={self.noise_step} "
                f"(the denoiser must know every step it is asked to undo) and diffusion_steps={self.diffusion_steps}; "
                "None trains on every step"
            )
        bad = [a for a in self.attention_levels if a >= len(self.channel_mults)]
        if bad:
            raise InvalidParameterError(
                f"{owner}: attention_levels {list(bad)} do not exist in a {len(self.channel_mults)}-level U-Net "
                f"(channel_mults={tuple(self.channel_mults)}); use levels 0..{len(self.channel_mults) - 1}"
            )
        for level, mult in enumerate(self.channel_mults):
            if level in self.attention_levels and (self.base_width * mult) % self.heads:
                raise InvalidParameterError(
                    f"{owner}: heads={self.heads} must divide the {self.base_width * mult} channels of attention level {level}"
                )
        if self.base_width % 2:
            raise InvalidParameterError(
                f"{owner}: base_width must be even (timestep embedding size), got {self.base_width}"
            )

    def input_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        # the diffusion model works on pixels in [-1, 1], as DDAD's
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    # learned buffers, registered in _build (declared for type checkers)
    pixel_ratio_: torch.Tensor

    def _build(self) -> None:
        super()._build()
        self.schedule = NoiseSchedule.linear(self.diffusion_steps, self.beta_start, self.beta_end)
        self.unet_ = DenoisingUNet(
            3,
            base_width=self.base_width,
            channel_mults=tuple(self.channel_mults),
            num_res_blocks=self.num_res_blocks,
            attention_levels=tuple(self.attention_levels),
            heads=self.heads,
            dropout=self.dropout,
            groups=self.groups,
        )
        self.unet_.eval()
        # max D_f / max D_p on good training images (DDAD's batch ratio, fixed at fit time)
        self.register_buffer("pixel_ratio_", torch.ones(()))
        self.adapted_ = self._adaptable_copy() if self.adaptation_epochs > 0 else None

    def _adaptable_copy(self) -> nn.Module:
        """A copy of the frozen extractor whose weights the adaptation may change. It runs in
        plain NCHW memory layout, so that a model loaded from a file (whose tensors are stored
        contiguous) computes bit for bit what the fitted one did."""
        extractor = copy.deepcopy(self.backbone_)
        extractor.channels_last = False
        extractor.body.to(memory_format=torch.contiguous_format)
        return extractor

    # -- features and maps -------------------------------------------------------------------
    def _extractor_input(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] pixels -> the backbone's ImageNet normalisation."""
        mean = torch.tensor(self.backbone_.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.backbone_.std, device=x.device).view(1, 3, 1, 1)
        return ((x + 1) / 2 - mean) / std

    def feature_levels(self, x: torch.Tensor, *, frozen: bool = False) -> list[torch.Tensor]:
        """Feature maps of `layers` for [-1, 1] images: the adapted extractor when there is
        one (and not `frozen`), else the frozen backbone."""
        extractor = self.backbone_ if frozen or self.adapted_ is None else self.adapted_
        taps = extractor(self._extractor_input(x))
        return [taps[layer] for layer in self.layers]

    def reconstruct(
        self,
        x: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        weight: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDAD's conditioned DDIM reconstruction of [-1, 1] images `x` (conditioned on `x`
        itself unless `target` is given). Without a `generator`, the noise is seeded by
        `seed` and shared by the batch, so each image's result is reproducible on its own."""
        shared = generator is None
        if generator is None:
            generator = torch.Generator().manual_seed(self.seed)
        return ddim_reconstruct(
            self.unet_,
            x,
            self.schedule,
            t_start=self.noise_step,
            skip=self.skip,
            weight=self.condition_weight if weight is None else weight,
            eta=self.eta,
            generator=generator,
            target=target,
            shared_noise=shared,
        )

    def discrepancies(self, x: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(D_p, D_f), each [B, H, W], between images `x` and reconstructions `x0`."""
        size = (int(x.shape[-2]), int(x.shape[-1]))
        feats, feats_rec = self.feature_levels(x), self.feature_levels(x0)
        return pixel_discrepancy(x, x0), feature_discrepancy(feats[1:], feats_rec[1:], size)

    # -- training ----------------------------------------------------------------------------
    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        images = torch.cat([b.images for b in train.batches(self.batch_size)]).to(self.device)
        gen = torch.Generator().manual_seed(self.seed)
        self._train_denoiser(images, gen, progress)
        if self.adapted_ is not None:
            self._adapt_features(images, gen, progress)
        self._fit_pixel_ratio(images, gen)

    def _train_denoiser(self, images: torch.Tensor, gen: torch.Generator, progress: bool) -> None:
        n = images.shape[0]
        max_t = self.diffusion_steps if self.train_max_step is None else self.train_max_step + 1
        optimizer = torch.optim.Adam(self.unet_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        n_batches = -(-n // self.batch_size)
        losses = []
        self.unet_.train()
        with step_bar(self.epochs * n_batches, "ddad", enabled=progress) as bar:
            for _ in range(self.epochs):
                order = torch.randperm(n, generator=gen).to(images.device)
                for start in range(0, n, self.batch_size):
                    x = images[order[start : start + self.batch_size]]
                    t = torch.randint(0, max_t, (x.shape[0],), generator=gen).to(images.device)
                    eps = torch.randn(x.shape, generator=gen).to(images.device)
                    loss = epsilon_loss(self.unet_, x, t, eps, self.schedule.alpha_bar)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
                    bar.advance(loss=losses[-1])
        self.loss_history_ = losses
        self.unet_.eval()

    def _adapt_features(self, images: torch.Tensor, gen: torch.Generator, progress: bool) -> None:
        assert self.adapted_ is not None
        n = images.shape[0]
        half = self.adaptation_batch_size // 2
        if n < 2:
            return  # nothing to pair: keep the pretrained features
        params = list(self.adapted_.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=self.adaptation_lr)
        # the reference drops the last incomplete batch; we keep at least one pair
        full = max(1, n // self.adaptation_batch_size)
        with step_bar(self.adaptation_epochs * full, "ddad adaptation", enabled=progress) as bar:
            for _ in range(self.adaptation_epochs):
                order = torch.randperm(n, generator=gen).to(images.device)
                for step in range(full):
                    batch = images[order[step * self.adaptation_batch_size : (step + 1) * self.adaptation_batch_size]]
                    k = min(half, batch.shape[0] // 2)
                    target, source = batch[:k], batch[k : 2 * k]
                    x0 = self.reconstruct(source, target=target, weight=self.adaptation_weight, generator=gen)
                    with torch.no_grad():
                        frozen_target = self.feature_levels(target, frozen=True)
                        frozen_x0 = self.feature_levels(x0, frozen=True)
                    adapted_target, adapted_x0 = self.feature_levels(target), self.feature_levels(x0)
                    loss = whole_map_cosine_loss(adapted_x0, adapted_target) + self.adaptation_lambda * (
                        whole_map_cosine_loss(adapted_target, frozen_target)
                        + whole_map_cosine_loss(adapted_x0, frozen_x0)
                    )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    bar.advance(loss=loss.item())
        for p in params:
            p.requires_grad_(False)

    @torch.no_grad()
    def _fit_pixel_ratio(self, images: torch.Tensor, gen: torch.Generator) -> None:
        pick = torch.randperm(images.shape[0], generator=gen)[:RATIO_IMAGES].to(images.device)
        x = images[pick]
        d_p, d_f = self.discrepancies(x, self.reconstruct(x))
        self.pixel_ratio_.copy_(d_f.max() / d_p.max().clamp_min(1e-12))

    # -- inference ---------------------------------------------------------------------------
    def _predict(self, images: torch.Tensor) -> Prediction:
        d_p, d_f = self.discrepancies(images, self.reconstruct(images))
        return Prediction(scores=None, maps=d_f + self.pixel_weight * self.pixel_ratio_ * d_p)
