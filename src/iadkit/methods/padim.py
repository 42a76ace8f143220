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

The authors released no code. Paper -> reference code (anomalib 2.7.0's ``Padim``; the widely
used re-implementation xiahaifeng1995/PaDiM-Anomaly-Detection-Localization-master where it
differs) -> ours:

=============================  ============================================  ================================================
paper                          reference code                                ours
=============================  ============================================  ================================================
R18 (d 100) / WRN-50 (d 550)   anomalib: ``layers`` layer1-3, n_features     EfficientNet-Lite0 ``blocks.1/2/4`` (strides 4,
                               defaults only for resnet18 (100) and          8, 16; 24 + 40 + 112 = 176 channels),
                               wide_resnet50_2 (550); xiahaifeng1995: the    ``n_features`` 100; ``paper=True``: WRN-50, 550
                               same two configurations                       (user weight file)
embedding: layers at stride 4  anomalib: nearest upsampling to the first     the same, nearest
                               layer's grid, concatenated; xiahaifeng1995:   (`components.features.ConcatEmbedding`)
                               ``embedding_concat`` (unfold/fold, the same
                               nearest replication)
random channel subset          anomalib: ``random.sample`` at construction;  a sorted random subset drawn from ``seed``
                               xiahaifeng1995: ``random.sample`` with seed   (`random_channel_index`), stored in the model
                               1024
Σ = covariance + 0.01 I        anomalib: the same, ``torch.linalg.inv``;     the same ``eps`` 0.01, float64, streamed over
                               xiahaifeng1995: ``np.cov + 0.01 I``,          batches; Cholesky factor and its triangular
                               ``np.linalg.inv``                             inverse instead of the inverse
                                                                             (`components.gaussian`): the same distance up to
                                                                             rounding, never negative
map: Mahalanobis, σ 4          anomalib: square root of the Mahalanobis      square root of the Mahalanobis form, bilinear to
                               form, bilinear to the input, GaussianBlur2d   the input, σ 4 at a 224-px input scaled with the
                               σ 4 (kernel 33) at its input size;            input size (4.57 at 256 px): the paper's σ only
                               xiahaifeng1995: scipy gaussian_filter σ 4 at  at 224 px (model `Postprocess`)
                               the 224-px crop
image score: map maximum       anomalib: the map maximum; xiahaifeng1995:    the maximum of the smoothed map
                               the maximum of the map min-max-normalised
                               over the whole test set (the same ranking)
input: 256 resize, 224 crop    xiahaifeng1995: the same; anomalib: its       the model's preprocessing: 224 px, no crop, by
                               default pre-processor resizes to 256, no      default; ``paper=True``: 256 px, no crop (add
                               crop                                          ``crop_size=224`` for the paper's crop)
=============================  ============================================  ================================================

``feature_runtime="auto"``: backbone + embedding run with ONNX Runtime on CPU when it is
installed (same features within 1e-4), torch otherwise (see `components.features`).
"""

from __future__ import annotations

import torch

from iadkit.components.features import RUNTIMES, ConcatEmbedding, FeaturePath
from iadkit.components.gaussian import PAPER_EPS, GaussianAccumulator, GaussianFitError, mahalanobis, whitening_matrices
from iadkit.data.transforms import ImageSet
from iadkit.errors import InvalidParameterError
from iadkit.methods.base import PRESET_STRIDES_4_8_16, BackboneDetector, register
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

    layer_presets = PRESET_STRIDES_4_8_16
    layers: tuple[str, ...] | None = param(
        None,
        "Backbone layers, concatenated on the finest grid (ResNet layer1-3); None: the preset for the backbone's family (`layer_presets`).",
        check=Length(1),
    )
    n_features: int = param(
        100, "Channels kept by the seeded random reduction (paper: 100 for R18).", check=at_least(1)
    )
    eps: float = param(
        PAPER_EPS, "Regularisation added to each covariance's diagonal (paper: 0.01).", check=at_least(0)
    )
    batch_size: int = param(32, "Images per feature batch.", check=at_least(1))
    feature_runtime: str = param(
        "auto",
        "'auto' (ONNX Runtime on CPU when installed), 'torch' or 'onnxruntime'.",
        check=OneOf(RUNTIMES),
        inference=True,
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
