"""BTF — "Back to the Feature": FPFH point descriptors and RGB patch features in one memory bank.

Paper: E. Horwitz, Y. Hoshen, "Back to the Feature: Classical 3D Features are (Almost) All You
Need for 3D Anomaly Detection", CVPR 2023 workshops (VAND), arXiv:2203.05550; code:
github.com/eliahuhorwitz/3D-ADS.

Algorithm, as in the paper and its code:

1. Each training sample is an RGB image and its organised point map (MVTec 3D-AD), the
   background plane removed (``load_dataset(..., remove_plane=True)``; `data.point_maps`).
2. *RGB patch features*: a frozen ImageNet network's two mid-level maps (WideResNet-50
   layer 2 + 3), each averaged over 3 x 3 neighbourhoods and brought to the layer-2 grid
   (PatchCore's features without projection).
3. *3D patch features*: the FPFH descriptor (33-d, Rusu et al. 2009) of every point of the
   point map resized to the input size, averaged over 3 x 3 pixels and pooled to the same
   grid (`components.point_features.fpfh_map`).
4. *Fusion*: the two are concatenated per position into one vector, and all training
   positions form one memory bank, reduced by PatchCore's greedy coreset (10 %).
5. *Scoring*: a test position's score is the distance to its nearest bank vector; the map is
   the score grid upsampled (bilinear) and blurred (Gaussian, sigma 4); the image score is
   PatchCore's reweighted maximum, in the BTF code's form (below).

The same paper's baselines are one parameter away: ``modality="fpfh"`` (3D only: FPFH
features alone, the paper's best single 3D representation) and ``modality="rgb"`` (the RGB
half alone, "RGB iNet", i.e. PatchCore on the colour image).

Paper -> reference code -> ours:

==========================  ==============================  ==============================
item                        BTF (paper and 3D-ADS code)     ours
==========================  ==============================  ==============================
RGB network / layers        WRN-50 layer2 + layer3 (timm,   EfficientNet-Lite0 ``blocks.2``
                            downloaded), 512 + 1024 ch      + ``blocks.4`` (strides 8, 16;
                                                            40 + 112 ch; PatchCore's preset,
                                                            ``layers=`` / ``backbone=`` to
                                                            change), offline
3x3 aggregation, grid       AvgPool2d(3, stride 1), no      PatchCore's `PatchEmbedding`
                            padding, then AdaptiveAvgPool   ("average": 3x3 mean with zero
                            to the layer-2 grid (28 x 28    padding, coarser layer bilinearly
                            at 224 px)                      upsampled), no projection
FPFH                        Open3D, normals 30 nn within    `fpfh_map` (numpy/scipy, same
                            0.1, FPFH 100 nn within 0.25    neighbourhoods; normals oriented
                            (voxel size 0.05), on the point to the camera, see its module),
                            map resized (nearest) to 224    on the point map nearest-resized
                                                            to the model's input size
FPFH aggregation            AvgPool2d(3, 1), no padding,    same
                            AdaptiveAvgPool to the grid
fusion                      concatenation, unscaled         same; ``fpfh_scale`` multiplies
                                                            the FPFH half (1: the paper's)
coreset                     10 %, greedy on a sparse        10 %, PatchCore's coreset
                            random projection (eps 0.9)     (`StreamingCoreset`, 128-d
                                                            projection, composable)
patch score                 distance to the nearest bank    same (exact search)
                            vector
image score                 s* (1 - e^(s*/D) /              same, D = sqrt(dimension),
                            sum_{m in N_b(m*) \\ m*}         b = 3 (``num_neighbors``)
                            e^(|m_test - m|/D)), b = 3,
                            D = sqrt(dimension)
map                         bilinear to 224, Gaussian       bilinear to the input size,
                            blur sigma 4                    sigma 4 at 224 px (scaled)
input                       224 x 224, RGB bicubic          the model's (224 by default),
                                                            RGB bilinear (antialiased)
==========================  ==============================  ==============================

FPFH takes seconds per image on a CPU (a k-d tree over up to 50 000 points and 100
neighbours each); it is computed once per image in `fit` (a single pass) and per image in
`predict`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from iadkit.components.features import RUNTIMES, FeaturePath, PatchEmbedding
from iadkit.components.memory_bank import (
    CORESET_METHODS,
    CoresetResult,
    MemoryBankError,
    StreamingCoreset,
    knn_exact,
)
from iadkit.components.point_features import (
    BTF_FEATURE_MAX_NN,
    BTF_FEATURE_RADIUS,
    BTF_NORMAL_MAX_NN,
    BTF_NORMAL_RADIUS,
    FPFH_DIM,
    fpfh_map,
)
from iadkit.data.transforms import ImageSet
from iadkit.methods.base import BackboneDetector, register, split_depth
from iadkit.methods.params import Interval, Length, OneOf, at_least, param, positive
from iadkit.methods.patchcore import PatchCore
from iadkit.types import Prediction

MODALITIES = ("rgb+fpfh", "rgb", "fpfh")


def fpfh_features(
    xyz: torch.Tensor,
    grid: tuple[int, int],
    *,
    normal_radius: float = BTF_NORMAL_RADIUS,
    normal_max_nn: int = BTF_NORMAL_MAX_NN,
    feature_radius: float = BTF_FEATURE_RADIUS,
    feature_max_nn: int = BTF_FEATURE_MAX_NN,
) -> torch.Tensor:
    """BTF's 3D patch features: point maps [B, 3, H, W] -> [B, 33, h, w] on `grid`.

    Each map's per-pixel FPFH (`fpfh_map`; zeros where there is no point) is averaged over
    3 x 3 pixels (no padding) and adaptively average-pooled to `grid`, as the BTF code does.
    """
    out = []
    for m in xyz.detach().cpu().numpy():
        desc = fpfh_map(
            np.ascontiguousarray(m.transpose(1, 2, 0)),
            normal_radius=normal_radius,
            normal_max_nn=normal_max_nn,
            feature_radius=feature_radius,
            feature_max_nn=feature_max_nn,
        )
        out.append(torch.from_numpy(desc).permute(2, 0, 1))
    maps = torch.stack(out).to(xyz.device)
    if min(maps.shape[-2:]) >= 3:
        maps = F.avg_pool2d(maps, 3, stride=1)
    return F.adaptive_avg_pool2d(maps, grid)


def btf_image_scores(
    patch_scores: torch.Tensor,
    nn_index: torch.Tensor,
    embeddings: torch.Tensor,
    bank: torch.Tensor,
    num_neighbors: int,
    *,
    bank_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """BTF's image scores (its ``compute_s_s_map``): the largest patch score s*, reweighted.

    With m_test the patch of score s*, m* its nearest bank vector, N_b(m*) the b bank vectors
    nearest m* (m* first) and D = sqrt(dimension):
    ``s = (1 - exp(s*/D) / sum_{m in N_b(m*), m != m*} exp(|m_test - m| / D)) * s*``.
    PatchCore's Eq. 7 differs in keeping m* in the sum and in having no temperature D.
    With b = 1 (no other neighbour) the plain maximum s* is returned.
    """
    rows = torch.arange(patch_scores.shape[0], device=patch_scores.device)
    star = patch_scores.argmax(1)
    s_star = patch_scores[rows, star]
    b = min(int(num_neighbors), int(bank.shape[0]))
    if b <= 1:
        return s_star
    m_test = embeddings[rows, star].float()
    m_star = bank[nn_index[rows, star]].float()
    _, support = knn_exact(m_star, bank, b, bank_sq=bank_sq)  # m* itself first
    d = torch.linalg.vector_norm(m_test[:, None, :] - bank[support[:, 1:]].float(), dim=-1)  # [B, b-1]
    temperature = math.sqrt(bank.shape[1])
    # exp(s*/D) / sum exp(d/D), computed relative to the largest exponent (no overflow)
    shift = torch.maximum(d.max(1).values, s_star) / temperature
    ratio = torch.exp(s_star / temperature - shift) / torch.exp(d / temperature - shift[:, None]).sum(1)
    return (1.0 - ratio) * s_star


@register
class BTF(BackboneDetector):
    """FPFH point descriptors + RGB patch features in one coreset memory bank (Horwitz & Hoshen 2023)."""

    name = "btf"
    family = "memory bank"
    paper = "Horwitz & Hoshen, Back to the Feature: Classical 3D Features are (Almost) All You Need for 3D Anomaly Detection, CVPRW 2023"
    uses_depth = True
    map_sigma = 4.0  # the code's Gaussian blur, sigma 4 at 224 px
    smoke_params = {"coreset_ratio": 0.1}
    paper_params = {"backbone": "wide_resnet50_2"}
    paper_image_size = 224

    layer_presets = PatchCore.layer_presets
    modality: str = param(
        "rgb+fpfh",
        "Features in the bank: 'rgb+fpfh' (BTF), or the paper's baselines 'rgb' and 'fpfh'.",
        check=OneOf(MODALITIES),
    )
    layers: tuple[str, ...] | None = param(
        None, "RGB layers (strides 8, 16: WRN-50 layer2/3); None: PatchCore's preset for the backbone.", check=Length(1)
    )
    fpfh_scale: float = param(
        1.0, "Factor on the FPFH half of a fused vector (paper: 1, plain concatenation).", check=positive()
    )
    normal_radius: float = param(
        BTF_NORMAL_RADIUS, "Normal estimation radius, point-map units (BTF: 0.1).", check=positive()
    )
    normal_max_nn: int = param(BTF_NORMAL_MAX_NN, "Normal estimation neighbours (BTF: 30).", check=at_least(3))
    feature_radius: float = param(BTF_FEATURE_RADIUS, "FPFH radius, point-map units (BTF: 0.25).", check=positive())
    feature_max_nn: int = param(BTF_FEATURE_MAX_NN, "FPFH neighbours (BTF: 100).", check=at_least(2))
    coreset_ratio: float = param(
        0.1, "Share of training positions kept in the bank (BTF: 0.1).", check=Interval(0, 1, closed="right")
    )
    coreset_method: str = param(
        "composable", "'composable' (streaming) or 'greedy' k-center (see PatchCore).", check=OneOf(CORESET_METHODS)
    )
    projection_dim: int = param(128, "Random-projection dimension of the coreset selection.", check=at_least(1))
    num_neighbors: int = param(
        3, "b of the image-score reweighting (BTF: 3; 1: plain maximum).", check=at_least(1), inference=True
    )
    batch_size: int = param(16, "Images per feature batch.", check=at_least(1))
    feature_runtime: str = param(
        "auto",
        "RGB features: 'auto' (ONNX Runtime on CPU when installed), 'torch' or 'onnxruntime'.",
        check=OneOf(RUNTIMES),
        inference=True,
    )

    def _build(self) -> None:
        super()._build()
        self.embedding_ = PatchEmbedding(
            self.layer_channels(), patch_size=3, pretrain_dim=None, target_dim=None, aggregation="average"
        )
        dim = (self.embedding_.target_dim if self.modality != "fpfh" else 0) + (
            FPFH_DIM if self.modality != "rgb" else 0
        )
        self.register_buffer("memory_bank_", torch.empty(0, dim))
        self.fit_info_: dict[str, Any] = {}
        self._params_changed(["feature_runtime"])

    def _params_changed(self, names: list[str]) -> None:
        self._path = FeaturePath(self.backbone_, self.embedding_, list(self.tapped_layers()), self.feature_runtime)

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Inputs [B, 6, H, W] (colour + point map) -> fused patch features [B, D, h, w]."""
        rgb, xyz = split_depth(images)
        stride = self.layer_strides()[0]
        grid = (max(1, rgb.shape[-2] // stride), max(1, rgb.shape[-1] // stride))
        parts = []
        if self.modality != "fpfh":
            f_rgb = self._path(rgb)
            grid = (int(f_rgb.shape[-2]), int(f_rgb.shape[-1]))
            parts.append(f_rgb)
        if self.modality != "rgb":
            f_3d = fpfh_features(
                xyz,
                grid,
                normal_radius=self.normal_radius,
                normal_max_nn=self.normal_max_nn,
                feature_radius=self.feature_radius,
                feature_max_nn=self.feature_max_nn,
            )
            parts.append(self.fpfh_scale * f_3d.to(rgb.dtype))
        return torch.cat(parts, dim=1)

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        builder = StreamingCoreset(
            self.coreset_ratio, method=self.coreset_method, projection_dim=self.projection_dim, seed=self.seed
        )
        for images in self.single_pass(train, self.batch_size, "btf features", progress=progress):
            feats = self.patch_features(images)
            builder.add(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).cpu())
        result: CoresetResult = builder.result()
        self.memory_bank_ = result.bank.contiguous().to(self.device)
        self.fit_info_ = {"n_patches": result.n_seen, "bank_size": int(result.bank.shape[0]), "modality": self.modality}

    def _predict(self, images: torch.Tensor) -> Prediction:
        feats = self.patch_features(images)
        b, d, h, w = feats.shape
        bank = self.memory_bank_
        if d != bank.shape[1]:
            raise MemoryBankError(f"BTF features have {d} dimensions but the memory bank has {bank.shape[1]}")
        emb = feats.permute(0, 2, 3, 1).reshape(b, h * w, d).to(bank.device)
        bank_sq = (bank.float() ** 2).sum(1)
        dist, idx = knn_exact(emb.reshape(-1, d), bank, 1, bank_sq=bank_sq)
        patch_scores = dist[:, 0].reshape(b, h * w)
        scores = btf_image_scores(
            patch_scores, idx[:, 0].reshape(b, h * w), emb, bank, self.num_neighbors, bank_sq=bank_sq
        )
        return Prediction(scores=scores.to(images.device), maps=patch_scores.reshape(b, h, w).to(images.device))


__all__ = ["BTF", "MODALITIES", "btf_image_scores", "fpfh_features"]
