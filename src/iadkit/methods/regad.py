"""RegAD — registration-based few-shot anomaly detection.

Paper: C. Huang, H. Guan, A. Jiang, Y. Zhang, M. Spratling, Y.-F. Wang, "Registration based
Few-Shot Anomaly Detection", ECCV 2022 (arXiv:2207.07361); code:
github.com/MediaBrain-SJTU/RegAD (train.py, test.py, models/stn.py, models/siamese.py).

Setting: few-shot. A new product has k good images (1, 2, 4, 8); RegAD needs no training on
it. Registration is learned once on *other* categories, where plenty of good images exist;
for a new category only a Gaussian of the k support images' registered features is fitted.

Why RegAD and not GraphCore (the other few-shot method the survey lists): GraphCore's
features come from a Vision GNN (ViG) pretrained on ImageNet, whose weights are not
available offline here, and its rotation invariance is a property of that network; a
"GraphCore" on another backbone would be PatchCore with augmentation. RegAD's ingredients —
an ImageNet CNN (the packaged EfficientNet-Lite0), spatial transformers, a Siamese objective,
meta-training data from other categories (the synthetic generator makes five; or any
MVTec-layout folder) and a per-position Gaussian — are all here and run on a CPU at small
sizes, so the algorithm can be built as published.

Algorithm:
1. *Registration network*: the backbone's stages up to stride 16 (ResNet-18 layer1-3 in the
   paper) with a spatial transformer after each tapped stage (`components.registration`): the
   stage's feature map is warped by a predicted affine transform (``stn_mode``
   "rotation_scale") before the next stage.
2. *Meta-training on other categories* (paper §3.2): batches of queries, each with K support
   images of the same category (never the query itself); the query's and the K supports'
   final feature maps (the supports' averaged) go through a Siamese encoder and predictor, and
   the symmetric negative cosine ``-cos(p_q, sg(z_s))/2 - cos(p_s, sg(z_q))/2`` per position
   is minimised (SimSiam without negatives). The categories: ``meta_source="synthetic"`` takes
   the synthetic generator's five categories except the target's own (train on four, test on
   the fifth), generated in memory; a folder path takes every ``<category>/train/good`` in it
   except the target's. K is the number of support images given to `fit` (the code trains one
   model per shot count), at most 8, unless ``meta_shots`` sets it.
3. *Support distribution* (paper §3.3, test.py): each support image is expanded to 22 (the
   original, 8 small rotations, 8 translations, a flip, a greyscale copy, 3 right-angle
   rotations: `support_augmentations`); their registered feature maps of the three stages,
   each mapped back into the image frame with the inverse of every transform applied so far,
   are concatenated on the stride-4 grid (nearest upsampling, PaDiM's embedding), and a
   Gaussian N(mu_ij, Sigma_ij + 0.01 I) is fitted at every position.
4. *Scoring*: the Mahalanobis distance of a test image's registered features at each
   position; the map is upsampled and smoothed (sigma 4) by the model, the image score is the
   map's maximum.

paper -> reference code -> ours:

==============================  =======================================  =====================================
paper                           reference code                           ours
==============================  =======================================  =====================================
ResNet-18 (ImageNet), STN       layer1-3 + STN after each, whole net     EfficientNet-Lite0 stages up to
after layer1/2/3                trained (BN in train mode)               blocks.1/2/4 (strides 4/8/16; 24/40/
                                                                         112 ch) + STN after each, all
                                                                         trained, backbone BN statistics
                                                                         frozen (small batches)
STN: rotation + scale           conv3x3(64)-BN-ReLU-pool-conv3x3(16)-    same, with an adaptive 4x4 pool
                                BN-ReLU-pool, fc 1024, identity init,    before the fc (the code fixes its
                                fc input fixed for 224 px                input to 224-px sizes)
Siamese encoder / predictor,    3 / 2 1x1 convs (256 ch), CosLoss with   same layers at 112 channels, same
symmetric neg. cosine           detach                                   loss (`negative_cosine`)
meta-train on the other 14      queries batched 32 per category, K       ``meta_source``: synthetic (4 other
MVTec categories                supports each (random, != query)         categories, ``meta_images_per_
                                                                         category`` 16) or a folder;
                                                                         ``meta_batch_size`` 8
SGD, 50 epochs                  lr 1e-4, momentum 0.9, cosine decay      lr 1e-4, momentum 0.9, cosine decay
                                per epoch (last epoch at lr 0)           starting at epoch 0 (never 0);
                                                                         ``meta_epochs`` 2 (CPU-sized)
support augmentation            22 variants per shot (list above)        same list (``augment_support``)
Gaussian per position           torch.cov + 0.01 I on 448-d layer1-3     0.01 I (``eps``) on 176-d concat
                                concat at 56x56                          (``n_features`` can subsample)
score map: Mahalanobis,         bilinear upsampling, gaussian_filter     the model's Postprocess (bilinear,
sigma 4, image score = max      sigma 4; max of the normalised map       sigma 4); score = map max
input 224, ToTensor only        ImageNet normalisation commented out     the backbone's normalisation (the
                                                                         Lite0 weights expect it)
==============================  =======================================  =====================================

``Model.create("regad", paper=True, weights_path=<resnet18 file>)`` gives ResNet-18 layer1-3,
50 meta-training epochs of 32 queries at 224 px.

Each `fit` meta-trains the registration network (seconds on 64-px synthetic images, minutes
at 224 px) and stores it in the model file together with the Gaussian.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from iadkit.components.features import ConcatEmbedding
from iadkit.components.finetune import freeze_batchnorm, pretrained_stages
from iadkit.components.gaussian import PAPER_EPS, GaussianAccumulator, GaussianFitError, mahalanobis, whitening_matrices
from iadkit.components.registration import (
    TRANSFORM_PARAMS,
    SiameseEncoder,
    SiamesePredictor,
    SpatialTransformer,
    invert_affine,
    negative_cosine,
    support_augmentations,
    warp,
)
from iadkit.data.transforms import ImageSet
from iadkit.errors import InvalidParameterError, TrainingDataError
from iadkit.methods.base import PRESET_STRIDES_4_8_16, BackboneDetector, register
from iadkit.methods.padim import random_channel_index
from iadkit.methods.params import Interval, Length, OneOf, at_least, param, positive
from iadkit.progress import step_bar
from iadkit.types import GOOD, Prediction, Sample

MAX_META_SHOTS = 8


@functools.lru_cache(maxsize=4096)
def _synthetic_image(category: str, seed: int, index: int, size: int) -> np.ndarray:
    """One good synthetic training image, generated in memory (cached: every fit reuses them)."""
    from iadkit.data.synthetic import synthesize

    img = synthesize(category, seed=seed, index=index, image_size=size, split="train").image
    img.setflags(write=False)
    return img


def meta_training_sets(
    source: str | os.PathLike[str], exclude: str, preprocess, *, per_category: int, seed: int
) -> dict[str, ImageSet]:
    """The good images of every meta-training category except `exclude`, as ImageSets.

    Parameters
    ----------
    source
        "synthetic": the synthetic generator's categories, `per_category` images each at the
        preprocessing size; otherwise a folder in MVTec layout (``<category>/train/good/*``).
    exclude
        The target category's name (its images never enter meta-training).
    preprocess
        The model's preprocessing (size and normalisation).
    per_category
        Synthetic images per category (a folder's images are all used).
    seed
        Seed of the synthetic images.
    """
    from iadkit.data.io import is_image_file
    from iadkit.data.synthetic import CATEGORIES

    sets: dict[str, ImageSet] = {}
    if str(source) == "synthetic":
        size = max(preprocess.output_size)
        for cat in sorted(CATEGORIES):
            if cat == exclude:
                continue
            samples = [
                Sample(
                    path=f"synthetic://{cat}/{i}", label=GOOD, category=cat, image=_synthetic_image(cat, seed, i, size)
                )
                for i in range(per_category)
            ]
            sets[cat] = ImageSet(samples, preprocess)
        return sets
    root = Path(source)
    if not root.is_dir():
        raise InvalidParameterError(
            f"RegAD: meta_source {os.fspath(source)!r} is neither 'synthetic' nor a folder; give a folder in MVTec "
            "layout (<category>/train/good/) with categories other than the target"
        )
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != exclude):
        good = folder / "train" / "good"
        files = sorted(p for p in good.iterdir() if is_image_file(p)) if good.is_dir() else []
        if files:
            sets[folder.name] = ImageSet(
                [Sample(path=str(p), label=GOOD, category=folder.name) for p in files], preprocess
            )
    return sets


class RegistrationNetwork(nn.Module):
    """Backbone segments, each followed by a spatial transformer (RegAD's STN-ResNet).

    `forward(x)` returns the last warped feature map (the Siamese input) and, per segment, the
    warped map taken back into the input frame by the inverses of all transforms so far
    (detached, as the code's ``stn{1,2,3}_output``).
    """

    def __init__(self, segments: Sequence[nn.Module], channels: list[int], mode: str, pool: int = 4) -> None:
        super().__init__()
        self.segments = nn.ModuleList(segments)
        self.stns = nn.ModuleList([SpatialTransformer(c, mode, pool) for c in channels])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        thetas: list[torch.Tensor] = []
        aligned: list[torch.Tensor] = []
        for segment, stn in zip(self.segments, self.stns):
            x, theta = stn(segment(x))
            thetas.append(theta.detach())
            y = x.detach()
            for t in reversed(thetas):  # undo this transform, then the earlier ones
                y = warp(y, invert_affine(t))
            aligned.append(y)
        return x, aligned


@register
class RegAD(BackboneDetector):
    """Feature registration meta-trained on other categories + a Gaussian of the augmented k-shot support (Huang et al. 2022)."""

    name = "regad"
    family = "few-shot"
    paper = "Huang et al., Registration based Few-Shot Anomaly Detection, ECCV 2022"
    frozen_prefixes = ()  # the whole network is trained and saved
    smoke_params = {"meta_epochs": 1, "meta_images_per_category": 4, "meta_batch_size": 4, "meta_shots": 1}

    paper_params = {"backbone": "resnet18", "meta_epochs": 50, "meta_batch_size": 32}
    paper_image_size = 224

    layer_presets = PRESET_STRIDES_4_8_16
    layers: tuple[str, ...] | None = param(
        None,
        "Stages followed by a spatial transformer (ResNet-18 layer1-3); None: the preset for the backbone's family "
        "(`layer_presets`).",
        check=Length(1),
    )
    stn_mode: str = param(
        "rotation_scale",
        "Affine parameters the transformers predict (paper: rotation_scale).",
        check=OneOf(tuple(TRANSFORM_PARAMS)),
    )
    meta_source: str | os.PathLike[str] = param(
        "synthetic", "Other categories to learn registration on: 'synthetic' or an MVTec-layout folder."
    )
    meta_images_per_category: int = param(16, "Synthetic images per meta-training category.", check=at_least(2))
    meta_epochs: int = param(2, "Meta-training epochs (paper: 50; CPU-sized default).", check=at_least(1))
    meta_batch_size: int = param(8, "Queries per meta-training step (code: 32).", check=at_least(2))
    meta_shots: int | None = param(
        None, "Supports per query in meta-training (None: the k images given to fit, at most 8).", check=at_least(1)
    )
    lr: float = param(1e-4, "SGD learning rate, cosine decay (code: 1e-4).", check=positive())
    momentum: float = param(0.9, "SGD momentum (code: 0.9).", check=Interval(0, 1, closed="left"))
    augment_support: bool = param(True, "Expand each support image into RegAD's 22 augmented variants.")
    n_features: int | None = param(
        None, "Random subset of the concatenated channels for the Gaussian (None: all, as RegAD).", check=at_least(1)
    )
    eps: float = param(PAPER_EPS, "Regularisation added to each covariance's diagonal (code: 0.01).", check=at_least(0))
    batch_size: int = param(32, "Images per feature batch when fitting the Gaussian.", check=at_least(1))

    def _check_params(self) -> None:
        super()._check_params()
        names = self._stage_names()
        order = [names.index(layer) for layer in self.tapped_layers()]
        if order != sorted(order):
            raise InvalidParameterError(f"RegAD: layers {self.tapped_layers()} must be in network order")
        if str(self.meta_source) != "synthetic" and not os.path.isdir(self.meta_source):
            raise InvalidParameterError(
                f"RegAD: meta_source={os.fspath(self.meta_source)!r} is neither 'synthetic' nor a folder; give a folder "
                "in MVTec layout (<category>/train/good/) with categories other than the target"
            )
        total = sum(self.layer_channels())
        if self.n_features is not None and self.n_features > total:
            raise InvalidParameterError(
                f"RegAD: n_features={self.n_features} exceeds the {total} channels of layers {self.tapped_layers()}"
            )

    def _stage_names(self) -> list[str]:
        from iadkit.backbones import layer_names

        return [info.name for info in layer_names(self.backbone)]

    # learned buffers, registered in _build (declared for type checkers)
    channel_index_: torch.Tensor
    mean_: torch.Tensor
    whitening_: torch.Tensor

    def _build(self) -> None:
        layers = self.tapped_layers()
        stages = pretrained_stages(self.backbone, layers[-1], self.weights_path)
        names = [n for n, _ in stages]
        segments, start = [], 0
        for layer in layers:
            end = names.index(layer) + 1
            segments.append(nn.Sequential(*[m for _, m in stages[start:end]]))
            start = end
        channels = self.layer_channels()
        self.registration_ = RegistrationNetwork(segments, channels, self.stn_mode)
        self.encoder_ = SiameseEncoder(channels[-1])
        self.predictor_ = SiamesePredictor(channels[-1])
        total = sum(channels)
        index = random_channel_index(total, self.n_features, self.seed) if self.n_features else torch.arange(total)
        self.register_buffer("channel_index_", index)
        self.register_buffer("mean_", torch.empty(0))
        self.register_buffer("whitening_", torch.empty(0))
        self._after_load()

    def _after_load(self) -> None:
        self.embedding_ = ConcatEmbedding(self.layer_channels(), self.channel_index_, mode="nearest")

    def train(self, mode: bool = True) -> RegAD:
        super().train(mode)
        if hasattr(self, "registration_"):
            for segment in self.registration_.segments:
                freeze_batchnorm(segment)
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> registered, re-aligned, concatenated features [B, d, H/4, W/4]."""
        _, aligned = self.registration_(images)
        return self.embedding_(aligned)

    # -- fit -----------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        k = len(train)
        target = train.samples[0].category if train.samples else ""
        meta = meta_training_sets(
            self.meta_source, target, train.preprocess, per_category=self.meta_images_per_category, seed=self.seed
        )
        # The code trains one model per shot count (2, 4, 8): K = k. With a full training set
        # (the vanilla setting) K is capped at 8, the paper's largest shot count of its main
        # tables: more supports per query only average more feature maps.
        shots = self.meta_shots if self.meta_shots is not None else min(k, MAX_META_SHOTS)
        usable = {c: s for c, s in meta.items() if len(s) > shots}
        if not usable:
            raise TrainingDataError(
                f"RegAD: no meta-training category has more than {shots} images (queries need {shots} other supports); "
                "lower meta_shots or give more images per category"
            )
        self._meta_train(usable, shots, progress)
        self._fit_support(train)

    def _meta_train(self, sets: dict[str, ImageSet], shots: int, progress: bool) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        params = [p for m in (self.registration_, self.encoder_, self.predictor_) for p in m.parameters()]
        optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        steps_per_epoch = sum(math.ceil(len(s) / self.meta_batch_size) for s in sets.values())
        self.meta_loss_history_: list[float] = []
        self.train()
        with step_bar(self.meta_epochs * steps_per_epoch, "regad meta-training", enabled=progress) as bar:
            for epoch in range(self.meta_epochs):
                for group in optimizer.param_groups:
                    group["lr"] = self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.meta_epochs))
                batches = []
                for cat, images in sets.items():
                    order = torch.randperm(len(images), generator=gen).tolist()
                    for s in range(0, len(order), self.meta_batch_size):
                        batches.append((cat, order[s : s + self.meta_batch_size]))
                total = 0.0
                for b in torch.randperm(len(batches), generator=gen).tolist():
                    cat, queries = batches[b]
                    loss = self._meta_step(sets[cat], queries, shots, gen)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach())
                    bar.advance(loss=float(loss.detach()))
                self.meta_loss_history_.append(total / len(batches))
        self.eval()

    def _meta_step(self, images: ImageSet, queries: list[int], shots: int, gen: torch.Generator) -> torch.Tensor:
        """Symmetric negative cosine between each query and the mean of its `shots` supports."""
        supports = []
        for q in queries:
            others = torch.tensor([i for i in range(len(images)) if i != q])
            supports += others[torch.randint(len(others), (shots,), generator=gen)].tolist()
        x_q = torch.stack([images.image(i) for i in queries]).to(self.device)
        x_s = torch.stack([images.image(i) for i in supports]).to(self.device)
        f_q = self.registration_(x_q)[0]
        f_s = self.registration_(x_s)[0]
        f_s = f_s.reshape(len(queries), shots, *f_s.shape[1:]).mean(1)
        z_q, z_s = self.encoder_(f_q), self.encoder_(f_s)
        p_q, p_s = self.predictor_(z_q), self.predictor_(z_s)
        return negative_cosine(p_q, z_s) / 2 + negative_cosine(p_s, z_q) / 2

    @torch.no_grad()
    def _fit_support(self, train: ImageSet) -> None:
        mean_px = torch.tensor(train.preprocess.mean).view(1, 3, 1, 1)
        std_px = torch.tensor(train.preprocess.std).view(1, 3, 1, 1)
        acc = GaussianAccumulator()
        for batch in train.batches(max(1, self.batch_size // 22 if self.augment_support else self.batch_size)):
            images = batch.images
            if self.augment_support:
                images = (support_augmentations(images * std_px + mean_px) - mean_px) / std_px
            for s in range(0, images.shape[0], self.batch_size):
                emb = self.embed(images[s : s + self.batch_size].to(self.device))
                acc.add(emb.flatten(2).transpose(1, 2).cpu())
        if acc.n < 2:
            raise GaussianFitError(
                "RegAD needs at least 2 support images for its Gaussian; turn augment_support on or give more images"
            )
        mean, cov = acc.finalize()
        self.mean_ = mean.float().to(self.device)
        self.whitening_ = whitening_matrices(cov, self.eps).float().to(self.device)

    # -- predict ---------------------------------------------------------------------------------------
    def _predict(self, images: torch.Tensor) -> Prediction:
        emb = self.embed(images.to(self.device))
        b, _, h, w = emb.shape
        if h * w != self.mean_.shape[0]:
            raise GaussianFitError(
                f"RegAD was fitted on a {self.mean_.shape[0]}-position grid but got {h}x{w}: predict at the training image size"
            )
        dist = mahalanobis(emb.flatten(2).transpose(1, 2), self.mean_, self.whitening_).reshape(b, h, w)
        return Prediction(scores=None, maps=dist.to(images.device))


__all__ = ["RegAD", "RegistrationNetwork", "meta_training_sets"]
