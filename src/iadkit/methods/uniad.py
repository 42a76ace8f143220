"""UniAD — one transformer that reconstructs frozen features, for one or many categories.

Paper: Z. You, L. Cui, Y. Shen, K. Yang, X. Lu, Y. Zheng, X. Le, "A Unified Model for
Multi-class Anomaly Detection", NeurIPS 2022 (arXiv:2206.03687); reference code
zhiyuanyou/UniAD (``experiments/MVTec-AD/config.yaml``, ``models/reconstructions/uniad.py``,
``models/necks/mfcn.py``, ``utils/eval_helper.py``).

Algorithm:
1. *Features*: a frozen ImageNet CNN gives four stages; each is resized (bilinear, corners
   aligned) to one token grid and the stages are concatenated, C channels per position
   ("feature_align").
2. *Reconstruction*: tokens f [B, H*W, C] -> (training only) feature jittering
   ``f + N(0, (alpha ||f|| / C)^2)`` -> linear projection to the hidden width -> the
   neighbour-masked transformer encoder and the layer-wise query decoder
   (`components.transformer.NeighborMaskedTransformer`) -> linear projection back to C:
   f_hat.
3. *Loss*: ``MSE(f_hat, f)`` against the clean features (mean over tokens, channels, batch).
4. *Map*: ``||f - f_hat||_2`` over channels at every token, upsampled bilinearly (corners
   aligned) to the input size; no smoothing. *Image score*: the maximum of the map averaged
   over 16 x 16-pixel windows (stride 1) at a 224-px input.

Multi-class: nothing in the algorithm knows a category. One model is trained on the good
images of every category at once (a training set that mixes them; ``multi_class = True``)
and tested per category. The neighbour mask, the query decoder and the jitter are what stop
the reconstruction from becoming an identity map that would copy anomalies too, which is
why one network can serve many categories.

The features are computed once, before training, and kept in memory for every epoch (UniAD
applies no image augmentation; its only noise is the jitter, in feature space): N training
images cost ``N * C * H * W * 4`` bytes, 150 KB per image at the paper's 14 x 14 grid with
our 192 channels (about 0.5 GB for MVTec AD's 3,629 training images).

Cost and results at the CPU defaults, 64 px, demo synthetic set (60 training images per
category): training 17 s of CPU per category on one thread, 5 ms of CPU per test image. One
model trained on all five categories (87 s of CPU) against five per-category models, mean
image AUROC / pixel AUROC / pixel AP / AUPRO: 0.777 / 0.882 / 0.108 / 0.694 against 0.758 /
0.879 / 0.095 / 0.690 -- the unified model loses nothing, as the paper claims.

==========================  ==========================================  ==========================================
paper                       reference code                              ours
==========================  ==========================================  ==========================================
backbone                    EfficientNet-B4 (lukemelas), stages 1-4:    EfficientNet-Lite0 (packaged, offline):
                            24 + 32 + 56 + 160 = 272 channels at        ``blocks.0/1/2/4``, 16 + 24 + 40 + 112 =
                            strides 2 / 4 / 8 / 16                      192 channels at the same strides (the
                                                                        last block of each of those strides)
token grid                  every stage resized by its stride / 16      every stage resized to ``feature_size``
                            (``UpsamplingBilinear2d``, corners          (bilinear, corners aligned): the same at
                            aligned): 14 x 14 at 224 px                 224 px with (14, 14); fixed whatever the
                                                                        input size, so the queries and position
                                                                        embeddings fit any input. CPU default
                                                                        (8, 8)
hidden width / heads        256 / 8, FFN 1024, dropout 0.1, ReLU,       parameters with the paper's values
                            post-norm                                   except ``hidden_dim`` 128 and
                                                                        ``ff_dim`` 512 by default (CPU)
layers                      4 encoder + 4 decoder                       parameters; CPU default 1 + 1 (one
                                                                        decoder layer still starts from its own
                                                                        learned queries)
neighbour mask              7 x 7 of 14 x 14, in all three attentions   ``neighbor_size`` (default 5 x 5 of the
                                                                        CPU 8 x 8 grid: the same share of the
                                                                        grid, about half its width)
position embedding          learned                                     learned (``position``), same
jitter                      alpha = 20, probability 1                   same (parameters)
initialisation              xavier-uniform Linear weights, zero bias    `init_uniad_weights`, seeded
loss                        ``nn.MSELoss`` on the features              same
optimiser                   AdamW, lr 1e-4, betas (0.9, 0.999), wd      AdamW, betas, wd, batch and clip the
                            1e-4, batch 8, grad-norm clip 0.1,          same; ``epochs`` CPU default 40 with the
                            1000 epochs, StepLR x0.1 at epoch 800       lr drop at the same share of training
                                                                        (``lr_drop_at`` 0.8); lr 1e-3 by
                                                                        default: at 1e-4 a 60-epoch run stays
                                                                        far from converged (demo fabric, 64 px,
                                                                        image AUROC 0.63; 0.75-0.78 at 1e-3)
checkpoint                  best of every 10 epochs by *test* pixel     the last epoch (no test data in training)
                            AUROC
map                         L2 over channels, bilinear x16 (corners     same, upsampled to the input size
                            aligned), no smoothing                      (``map_sigma`` 0)
image score                 max of ``avg_pool2d(map, 16, stride 1)``    same, the window scaled to the input
                            at 224 px                                   (``score_pool`` pixels at 224 px)
==========================  ==========================================  ==========================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iadkit.components.postprocess import pooled_max_score
from iadkit.components.transformer import (
    UNIAD_JITTER_PROB,
    UNIAD_JITTER_SCALE,
    NeighborMaskedTransformer,
    feature_jitter,
    init_uniad_weights,
    neighbor_mask,
)
from iadkit.data.transforms import ImageSet
from iadkit.errors import InvalidParameterError
from iadkit.methods.base import BackboneDetector, register
from iadkit.methods.params import Interval, Length, OneOf, at_least, param, positive
from iadkit.progress import step_bar
from iadkit.types import Prediction

POSITIONS = ("learned", "sine")
ACTIVATIONS = ("relu", "gelu")
SCORE_REFERENCE_SIZE = 224  # `score_pool` is in pixels of a 224-px input, as the paper's 16


def align_features(feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Resize every level to `size` (bilinear, corners aligned, as UniAD's MFCN neck) and
    concatenate along channels: [B, sum C_l, *size].

    Parameters
    ----------
    feats
        Feature maps [B, C_l, H_l, W_l], shallow to deep.
    size
        (H, W) of the token grid.
    """
    out = [
        f if tuple(f.shape[-2:]) == tuple(size) else F.interpolate(f, size=size, mode="bilinear", align_corners=True)
        for f in feats
    ]
    return torch.cat(out, dim=1)


class FeatureReconstructor(nn.Module):
    """UniAD's reconstruction head: input projection, neighbour-masked transformer, output
    projection. Tokens in and out are [B, H*W, channels].

    Parameters
    ----------
    channels
        Feature channels per token (UniAD: 272).
    hidden_dim
        Transformer width (256).
    feature_size
        Token grid (14 x 14).
    **transformer
        Keyword arguments of `NeighborMaskedTransformer`.
    """

    def __init__(self, channels: int, hidden_dim: int, feature_size: tuple[int, int], **transformer) -> None:
        super().__init__()
        self.input_proj = nn.Linear(channels, hidden_dim)
        self.transformer = NeighborMaskedTransformer(hidden_dim, feature_size, **transformer)
        self.output_proj = nn.Linear(hidden_dim, channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output_proj(self.transformer(self.input_proj(tokens)))


@register
class UniAD(BackboneDetector):
    """UniAD (You et al., NeurIPS 2022): a neighbour-masked transformer reconstructs frozen
    features; one model for many categories."""

    name = "uniad"
    family = "transformer"
    paper = "You et al., A Unified Model for Multi-class Anomaly Detection, NeurIPS 2022"
    multi_class = True
    map_sigma = 0.0  # the map is not smoothed in the paper
    smoke_params = {
        "epochs": 15,
        "feature_size": (6, 6),
        "neighbor_size": (3, 3),
        "hidden_dim": 32,
        "heads": 4,
        "ff_dim": 64,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "lr": 1e-3,
    }
    # the paper's transformer and schedule; its EfficientNet-B4 is not among our backbones, so
    # the packaged Lite0 stages stand in (stated in the table above)
    paper_params = {
        "feature_size": (14, 14),
        "hidden_dim": 256,
        "encoder_layers": 4,
        "decoder_layers": 4,
        "ff_dim": 1024,
        "epochs": 1000,
        "lr": 1e-4,
    }
    paper_image_size = 224

    layers: tuple[str, ...] = param(
        ("blocks.0", "blocks.1", "blocks.2", "blocks.4"),
        "Backbone stages concatenated into each token (EfficientNet-B4 stages 1-4 in the paper).",
        check=Length(1),
    )
    feature_size: tuple[int, int] = param(
        (8, 8),
        "Token grid every stage is resized to (paper: 14 x 14, stride 16 at 224 px).",
        check=(Length(2, 2), at_least(1)),
    )
    hidden_dim: int = param(128, "Transformer width (paper: 256).", check=at_least(1))
    heads: int = param(8, "Attention heads (paper: 8); must divide hidden_dim.", check=at_least(1))
    encoder_layers: int = param(1, "Encoder layers (paper: 4).", check=at_least(1))
    decoder_layers: int = param(1, "Query-decoder layers (paper: 4).", check=at_least(1))
    ff_dim: int = param(512, "Feed-forward width (paper: 1024).", check=at_least(1))
    dropout: float = param(0.1, "Dropout in the transformer (paper: 0.1).", check=Interval(0, 1, closed="left"))
    activation: str = param("relu", "Feed-forward activation (paper: relu).", check=OneOf(ACTIVATIONS))
    normalize_before: bool = param(False, "Pre-norm layers instead of post-norm (paper: post-norm).")
    neighbor_size: tuple[int, int] | None = param(
        (5, 5),
        "Window a token may not attend to, odd (paper: 7 x 7 of 14 x 14); None: no neighbour mask.",
        check=(Length(2, 2), at_least(1)),
    )
    position: str = param("learned", "Position embedding: 'learned' (paper) or 'sine'.", check=OneOf(POSITIONS))
    jitter_scale: float = param(
        UNIAD_JITTER_SCALE, "Feature-jitter alpha (paper: 20); 0: no jitter.", check=at_least(0)
    )
    jitter_prob: float = param(UNIAD_JITTER_PROB, "Probability a batch is jittered (paper: 1).", check=Interval(0, 1))
    epochs: int = param(40, "Training epochs (paper: 1000; CPU-sized default).", check=at_least(1))
    batch_size: int = param(8, "Images per step (paper: 8).", check=at_least(1))
    lr: float = param(
        1e-3, "AdamW learning rate (paper: 1e-4 over 1000 epochs; 1e-3 for the short CPU schedule).", check=positive()
    )
    weight_decay: float = param(1e-4, "AdamW weight decay (paper: 1e-4).", check=at_least(0))
    lr_drop_at: float = param(
        0.8, "Share of the epochs after which the lr drops tenfold (paper: epoch 800 of 1000).", check=Interval(0, 1)
    )
    clip_grad_norm: float | None = param(0.1, "Gradient-norm clip (paper: 0.1); None: no clipping.", check=positive())
    score_pool: int = param(
        16, "Averaging window of the image score, pixels at a 224-px input (paper: 16).", check=at_least(1)
    )

    def _check_params(self) -> None:
        super()._check_params()
        owner = type(self).__name__
        if self.hidden_dim % self.heads:
            raise InvalidParameterError(
                f"{owner}: hidden_dim={self.hidden_dim} must be divisible by heads={self.heads}"
            )
        multiple = 4 if self.position == "sine" else 2
        if self.hidden_dim % multiple:
            raise InvalidParameterError(
                f"{owner}: the {self.position} position embedding needs hidden_dim divisible by {multiple}, "
                f"got {self.hidden_dim}"
            )
        if self.neighbor_size is not None:
            try:
                neighbor_mask(self._grid(), (self.neighbor_size[0], self.neighbor_size[1]))
            except ValueError as exc:
                raise InvalidParameterError(
                    f"{owner}: neighbor_size={tuple(self.neighbor_size)} does not fit the "
                    f"{tuple(self.feature_size)} token grid ({exc}); use an odd window about half the grid "
                    "(paper: 7 x 7 of 14 x 14) or None"
                ) from None

    def _grid(self) -> tuple[int, int]:
        """`feature_size` as a (H, W) tuple (a user may have passed a list)."""
        return self.feature_size[0], self.feature_size[1]

    def _build(self) -> None:
        super()._build()
        self.reconstructor_ = FeatureReconstructor(
            sum(self.layer_channels()),
            self.hidden_dim,
            self._grid(),
            heads=self.heads,
            encoder_layers=self.encoder_layers,
            decoder_layers=self.decoder_layers,
            ff_dim=self.ff_dim,
            dropout=self.dropout,
            activation=self.activation,
            normalize_before=self.normalize_before,
            neighbor_size=None if self.neighbor_size is None else tuple(self.neighbor_size),
            position=self.position,
        )
        init_uniad_weights(self.reconstructor_, torch.Generator().manual_seed(self.seed))
        self.reconstructor_.eval()

    # -- pieces ------------------------------------------------------------------------------
    def feature_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen, aligned features as tokens [B, H*W, C] (row-major grid)."""
        aligned = align_features(self.features(images), self._grid())
        return aligned.flatten(2).transpose(1, 2)

    def token_errors(self, tokens: torch.Tensor) -> torch.Tensor:
        """``||f - f_hat||_2`` per token of clean tokens [B, N, C], as a [B, H, W] grid."""
        rec = self.reconstructor_(tokens)
        return (rec - tokens).pow(2).sum(-1).sqrt().reshape(tokens.shape[0], *self.feature_size)

    # -- training ----------------------------------------------------------------------------
    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        # features once, kept in memory: UniAD has no image augmentation
        tokens = torch.cat(
            [
                self.feature_tokens(x)
                for x in self.single_pass(train, self.batch_size, "uniad features", progress=progress)
            ]
        )
        n = tokens.shape[0]
        gen = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.AdamW(
            self.reconstructor_.parameters(), lr=self.lr, betas=(0.9, 0.999), weight_decay=self.weight_decay
        )
        drop_epoch = round(self.lr_drop_at * self.epochs)
        n_batches = -(-n // self.batch_size)
        losses = []
        self.reconstructor_.train()
        with step_bar(self.epochs * n_batches, "uniad", enabled=progress) as bar:
            for epoch in range(self.epochs):
                if epoch == drop_epoch:  # StepLR: x0.1 once, at the paper's share of training
                    for group in optimizer.param_groups:
                        group["lr"] = self.lr * 0.1
                order = torch.randperm(n, generator=gen).to(tokens.device)
                for start in range(0, n, self.batch_size):
                    clean = tokens[order[start : start + self.batch_size]]
                    noisy = feature_jitter(clean, scale=self.jitter_scale, prob=self.jitter_prob, generator=gen)
                    loss = F.mse_loss(self.reconstructor_(noisy), clean)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if self.clip_grad_norm is not None:
                        nn.utils.clip_grad_norm_(self.reconstructor_.parameters(), self.clip_grad_norm)
                    optimizer.step()
                    losses.append(loss.item())
                    bar.advance(loss=losses[-1])
        self.loss_history_ = losses
        self.reconstructor_.eval()

    # -- inference ---------------------------------------------------------------------------
    def _predict(self, images: torch.Tensor) -> Prediction:
        size = (int(images.shape[-2]), int(images.shape[-1]))
        errors = self.token_errors(self.feature_tokens(images))
        maps = F.interpolate(errors[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
        pool = max(1, round(self.score_pool * min(size) / SCORE_REFERENCE_SIZE))
        return Prediction(scores=pooled_max_score(maps, pool), maps=maps)
