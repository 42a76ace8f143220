"""SSIM autoencoder: a convolutional autoencoder trained on good images with a structural
similarity loss; the anomaly map is where the reconstruction is structurally unlike the input.

Paper: Paul Bergmann, Sindy Löwe, Michael Fauser, David Sattlegger, Carsten Steger,
"Improving Unsupervised Defect Segmentation by Applying Structural Similarity to
Autoencoders", VISAPP 2019 (arXiv:1807.02011).

Algorithm. A fully convolutional encoder compresses a 128 x 128 patch to a d = 100 code
(1 x 1 x d) and a decoder reconstructs it (the layer table is in
`iadkit.components.autoencoders`). Training minimises the SSIM loss
``sum_pixels 1 - SSIM(p, q)`` between every local window p of the input and q of the
reconstruction (Gaussian window 11 x 11, sigma 1.5, c1 = (0.01 L)^2, c2 = (0.03 L)^2); the
per-pixel L2 loss is the baseline it replaces. Since the network never saw defects, it
reconstructs them as defect-free texture; the residual map is ``1 - SSIM`` at every pixel
(or ``(x - x_hat)^2`` for the L2 autoencoder), computed patch-wise and averaged where the
patches overlap. A pixel is defective where the residual exceeds a threshold; the image is
defective where any pixel is, i.e. the image score is the maximum of the map.

======================  ===============================  ======================================
paper                   reference code                   ours
======================  ===============================  ======================================
network                 Table 1 (no official code; the   `SSIMAutoencoder`: the same layers,
                        MindSpore model zoo ssim-ae      widths b, 2b, 4b with `base_width`
                        reimplements the same table)     b = 32, code `latent_dim` = 100
input                   grayscale 128 x 128 patches      `patch_size` = 128; RGB by default
                        (NanoTWICE / woven fabrics are   with the SSIM per channel, averaged
                        grayscale), values in [0, 1]     (`grayscale=True`: luma, 1 channel as
                                                         the paper); values in [0, 1]: the
                                                         model's preprocessing does no
                                                         mean/std normalisation
training data           10,000 random 128 px crops       each epoch takes one random crop of
                        (MindSpore: of images resized    every training image (the whole image
                        to 256, with rotation/flip       when it is `patch_size` wide); no
                        augmentation)                    augmentation
loss                    SSIM, window 11 (L2 baseline)    ``loss="ssim"`` (``ssim_window`` 11,
                                                         mirror padding at borders) or "l2"
optimiser               Adam, lr 2e-4, weight decay      the same (`lr`, `weight_decay`)
                        1e-5 (MindSpore config), batch
                        128, 200 epochs                  batch 8, 40 epochs (CPU-sized
                                                         defaults; the paper's are parameters)
residual map            1 - SSIM (or squared error) per  the same, per channel then averaged;
                        pixel, overlapping patches       patches every `patch_stride` px
                        averaged (MindSpore: stride 32)  (32), averaged
image score             any pixel above the threshold    maximum of the map (no smoothing:
                        (= the map maximum)              ``map_sigma = 0``)
======================  ===============================  ======================================

Measured on the synthetic demo set: see the module's tests and the issue's closing note.
"""

from __future__ import annotations

import torch

from iadkit.components.autoencoders import SSIMAutoencoder
from iadkit.components.losses import ssim_map
from iadkit.data.transforms import ImageSet
from iadkit.errors import InvalidParameterError
from iadkit.methods.base import Detector, register
from iadkit.methods.params import Divisible, OneOf, at_least, param, positive
from iadkit.progress import step_bar
from iadkit.types import Prediction

LOSSES = ("ssim", "l2")
LUMA = (0.299, 0.587, 0.114)


def to_luma(x: torch.Tensor) -> torch.Tensor:
    """RGB [B, 3, H, W] in [0, 1] -> grayscale [B, 1, H, W] (ITU-R 601 luma weights)."""
    w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def tile_starts(length: int, patch: int, stride: int) -> list[int]:
    """Top-left offsets of patches of side `patch` every `stride` px along an axis of
    `length`, with a last patch flush with the end so every pixel is covered."""
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


def residual_map(x: torch.Tensor, reconstruction: torch.Tensor, loss: str, window: int) -> torch.Tensor:
    """Per-pixel residual [B, H, W]: ``1 - SSIM`` (loss "ssim") or the squared error ("l2"),
    averaged over channels. SSIM uses mirror padding, so the map has the input's size."""
    if loss == "ssim":
        return (1.0 - ssim_map(x, reconstruction, window_size=window)).mean(1)
    return ((x - reconstruction) ** 2).mean(1)


@register
class SSIMAutoencoderDetector(Detector):
    """SSIM autoencoder (Bergmann et al. 2019): reconstruct good patches, map 1 - SSIM."""

    name = "autoencoder"
    family = "autoencoder"
    paper = (
        "Bergmann et al., Improving Unsupervised Defect Segmentation by Applying Structural "
        "Similarity to Autoencoders, VISAPP 2019"
    )
    map_sigma = 0.0  # the residual map is used as it is
    # 240 Adam steps: the contract set's noisy texture needs that many before 1 - SSIM separates
    # its dark blobs (fewer steps pass for some seeds only).
    smoke_params = {"epochs": 40, "batch_size": 2, "lr": 2e-3, "patch_size": 64, "base_width": 8, "latent_dim": 32}
    paper_params = {"epochs": 200, "batch_size": 128, "patch_size": 128, "latent_dim": 100, "base_width": 32}

    loss: str = param("ssim", "Training loss and residual map: 'ssim' (the paper's) or 'l2'.", check=OneOf(LOSSES))
    latent_dim: int = param(100, "Size of the code (paper: 100).", check=at_least(1))
    base_width: int = param(32, "Width b of the first layers; others are 2b, 4b (paper: 32).", check=at_least(1))
    grayscale: bool = param(False, "Work on luma (1 channel, as the paper's grayscale data) instead of RGB.")
    patch_size: int = param(
        128, "Side of the patches the network sees (paper: 128).", check=(at_least(16), Divisible(16))
    )
    patch_stride: int = param(32, "Stride between overlapping patches at test time.", check=at_least(1))
    ssim_window: int = param(11, "SSIM window side, odd (paper: 11).", check=at_least(3))
    epochs: int = param(40, "Training epochs (paper: 200 over 10,000 crops; CPU-sized default).", check=at_least(1))
    batch_size: int = param(
        8, "Patches per Adam step (paper: 128; 8 gives a few dozen images several steps per epoch).", check=at_least(1)
    )
    lr: float = param(2e-4, "Adam learning rate (paper: 2e-4).", check=positive())
    weight_decay: float = param(1e-5, "Adam weight decay (paper: 1e-5).", check=at_least(0))

    def input_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        # The autoencoder reconstructs pixel values in [0, 1] (SSIM's L = 1): no mean/std.
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def _check_params(self) -> None:
        if self.ssim_window % 2 == 0:
            raise InvalidParameterError(
                f"SSIMAutoencoderDetector: ssim_window={self.ssim_window} must be odd (paper: 11)"
            )
        if self.ssim_window > self.patch_size:
            raise InvalidParameterError(
                f"SSIMAutoencoderDetector: ssim_window={self.ssim_window} is larger than patch_size={self.patch_size}"
            )

    def _channels(self) -> int:
        return 1 if self.grayscale else 3

    def _build(self) -> None:
        self.autoencoder_ = SSIMAutoencoder(self._channels(), self.latent_dim, self.base_width, self.patch_size)
        self.autoencoder_.eval()

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        return to_luma(images) if self.grayscale else images

    def _check_size(self, h: int, w: int) -> None:
        if min(h, w) < self.patch_size:
            raise InvalidParameterError(
                f"SSIMAutoencoderDetector: images of {h}x{w} px are smaller than patch_size={self.patch_size}; "
                f"set patch_size to a multiple of 16 <= {min(h, w)} (e.g. {min(h, w) // 16 * 16}) or use larger images"
            )

    def _loss(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        return residual_map(x, reconstruction, self.loss, self.ssim_window).mean()

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        h, w = train.preprocess.output_size
        self._check_size(h, w)
        p = self.patch_size
        n = len(train)
        gen = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.Adam(self.autoencoder_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        bs = min(self.batch_size, n)
        self.autoencoder_.train()
        self.loss_history_: list[float] = []
        with step_bar(self.epochs * -(-n // bs), "autoencoder", enabled=progress) as bar:
            for epoch in range(self.epochs):
                order = torch.randperm(n, generator=gen)
                total = 0.0
                for start in range(0, n, bs):
                    idx = order[start : start + bs]
                    tops = torch.randint(0, h - p + 1, (len(idx),), generator=gen)
                    lefts = torch.randint(0, w - p + 1, (len(idx),), generator=gen)
                    crops = [train.image(int(i))[:, t : t + p, left : left + p] for i, t, left in zip(idx, tops, lefts)]
                    x = self._input(torch.stack(crops).to(self.device))
                    loss = self._loss(x, self.autoencoder_(x))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(idx)
                    bar.advance(loss=float(loss.detach()), epoch=f"{epoch + 1}/{self.epochs}")
                self.loss_history_.append(total / n)
        self.autoencoder_.eval()

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction of images [B, 3, H, W] (side = patch_size), in the network's channels."""
        return self.autoencoder_(self._input(images))

    def _predict(self, images: torch.Tensor) -> Prediction:
        b, _, h, w = images.shape
        self._check_size(h, w)
        p = self.patch_size
        x = self._input(images)
        total = torch.zeros(b, h, w, device=images.device)
        count = torch.zeros(1, h, w, device=images.device)
        with torch.no_grad():
            for top in tile_starts(h, p, self.patch_stride):
                for left in tile_starts(w, p, self.patch_stride):
                    patch = x[:, :, top : top + p, left : left + p]
                    total[:, top : top + p, left : left + p] += residual_map(
                        patch, self.autoencoder_(patch), self.loss, self.ssim_window
                    )
                    count[:, top : top + p, left : left + p] += 1
        return Prediction(scores=None, maps=total / count)
