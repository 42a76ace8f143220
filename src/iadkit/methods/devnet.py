"""DevNet — deviation networks: a few labelled defects teach the network what "far from normal" is.

Papers: G. Pang, C. Shen, A. van den Hengel, "Deep Anomaly Detection with Deviation Networks",
KDD 2019 (tabular data), and its image version G. Pang, C. Ding, C. Shen, A. van den Hengel,
"Explainable Deep Few-shot Anomaly Detection with Deviation Networks", arXiv:2108.00462
(2021); code: github.com/Choubo/deviation-network-image (also in open-iad, arch/devnet.py).

Setting: semi-supervised. The training set holds good images and a few labelled defects
(label 1); `Model.fit` passes both to this method. At least one of each is required.

Algorithm (image version):
1. A CNN maps the image to a feature map; a 1x1 convolution turns each position (a patch
   instance) into a scalar score. The image's anomaly score is the mean of the K largest
   absolute position scores, K = 10 % of the positions (top-K multiple-instance learning,
   `components.deviation.topk_mil_score`). The network runs at `n_scales` image scales (full,
   half, ...: nearest-neighbour downsizing, as the code) and the scale scores are averaged.
2. Deviation loss (`components.losses.deviation_loss`, FIELD.md §2): with a reference set R of
   5000 draws from N(0, 1), ``dev = (score - mean R) / std R``; normal images are pulled to
   the prior's mean (``|dev|``), labelled anomalies pushed at least a = 5 deviations above it
   (``max(0, a - dev)``).
3. Balanced batches: half normal images, half labelled anomalies, each side drawn from
   endless random permutations, so a handful of defects recurs in every batch; images are
   randomly rotated by up to +-180 degrees (the code's training transform).
4. Score: the network's output. Map: the absolute position scores at full scale (the MIL
   map) — see the table for what the paper shows instead.

paper -> reference code -> ours:

===========================  ====================================  =====================================
paper                        reference code                        ours
===========================  ====================================  =====================================
ResNet-18 (ImageNet),        ResNet-18 conv1..layer4 (stride 32,   EfficientNet-Lite0 (the packaged
fine-tuned end to end        512 ch), all trained, BN in train     ImageNet backbone): stages up to
                             mode                                  ``finetune_from`` (blocks.5) frozen,
                                                                   blocks.5-6 (``layer``, stride 32,
                                                                   320 ch) fine-tuned, batch-norm
                                                                   statistics frozen (small batches)
top-K MIL, K = 10 %          topk 0.1, ``max(int(n*0.1), 1)``      ``topk`` 0.1, same formula
2 scales (448, 224 px)       n_scales 2, F.interpolate (nearest)   ``n_scales`` 2, same resizing
deviation loss, R = 5000     torch.normal(0, 1, 5000) per call,    ``reference_size`` 5000 drawn per
N(0,1), a = 5                margin 5                              step from the seeded generator, a = 5
balanced batches             BalancedBatchSampler, batch 48,       same sampler; ``batch_size`` 48,
                             20 steps per epoch                    ``steps_per_epoch`` 20
Adam                         lr 2e-4, weight decay 1e-5, StepLR    same (``lr``, ``weight_decay``,
                             (step 10 epochs, x0.1), grad-norm     ``lr_step``); clip 1.0
                             clip 1.0
epochs                       50 (open-iad config: 30)              ``epochs`` 10: CPU-sized default
RandomRotation(180) on       train transform: Resize,              rotation by U(-180, 180) degrees
training images              RandomRotation(180), Normalize        (black outside), ``rotation`` 180
explanation: anomaly maps    localization.py: |d score / d input|  the MIL map |conv1x1(features)| at
                             summed over channels, clipped at the  full scale (feature resolution),
                             99th percentile, Gaussian sigma 4     upsampled and smoothed by the model
                             (at 448 px)                           (sigma 2 at 224 px = 4 at 448)
===========================  ====================================  =====================================

Measured: see tests/test_devnet.py (more labelled defects, higher AUROC on a synthetic category).

The paper's configuration is one switch away: ``Model.create("devnet", paper=True,
weights_path=<torchvision resnet18 file>)`` — ResNet-18 fine-tuned from its stem, layer4 scored,
50 epochs, 448 px (the code's img_size); batch-norm statistics stay frozen here too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iadkit.components.deviation import PlainHead, balanced_batches
from iadkit.components.finetune import freeze_batchnorm, pretrained_stages
from iadkit.components.losses import deviation_loss
from iadkit.components.synthesis import rotate
from iadkit.data.transforms import ImageSet
from iadkit.errors import InvalidParameterError, TrainingDataError
from iadkit.methods.base import BackboneDetector, register
from iadkit.methods.params import Interval, at_least, param, positive
from iadkit.progress import step_bar
from iadkit.types import ANOMALOUS, GOOD, Prediction


class DeviationNetwork(BackboneDetector):
    """What DevNet and DRA share: a partly fine-tuned backbone, multi-scale feature maps,
    balanced batches of normal images and labelled defects, rotation augmentation and the
    Adam / step-decay schedule. Subclasses build their heads (`_build_heads`), define the
    training loss of a batch (`_batch_loss`) and predict."""

    supervision = "semi-supervised"
    map_sigma = 2.0

    layer: str = param("blocks.6", "Feature map that is scored (stride 32 like ResNet-18's layer4).")
    finetune_from: str = param("blocks.5", "First trained stage; earlier stages stay frozen ('stem': train all).")
    topk: float = param(
        0.1, "Share of positions whose scores make the image score (paper: 10 %).", check=Interval(0, 1, closed="right")
    )
    n_scales: int = param(2, "Image scales scored and averaged (full, half, ...; paper: 2).", check=at_least(1))
    epochs: int = param(10, "Training epochs (code: 50; CPU-sized default).", check=at_least(1))
    steps_per_epoch: int = param(20, "Balanced batches per epoch (code: 20).", check=at_least(1))
    batch_size: int = param(
        48, "Images per batch, half normal and half labelled defects (code: 48).", check=at_least(2)
    )
    lr: float = param(2e-4, "Adam learning rate (code: 2e-4).", check=positive())
    weight_decay: float = param(1e-5, "Adam weight decay (code: 1e-5).", check=at_least(0))
    lr_step: int = param(10, "Epochs between learning-rate decays by 10x (code: 10).", check=at_least(1))
    margin: float = param(5.0, "Deviation a that labelled defects must reach (paper: 5).", check=positive())
    reference_size: int = param(
        5000, "Draws from N(0, 1) in the deviation loss's reference set (paper: 5000).", check=at_least(2)
    )
    rotation: float = param(
        180.0, "Training images are rotated by up to this many degrees (code: 180; 0: off).", check=Interval(0, 180)
    )

    # -- backbone: frozen stages, then trained copies of the rest ---------------------------------
    def _stage_names(self) -> list[str]:
        from iadkit.backbones import layer_names

        return [info.name for info in layer_names(self.backbone)]

    def tapped_layers(self) -> list[str]:
        return [self.layer]

    def backbone_layers(self) -> list[str]:
        names = self._stage_names()
        first = names.index(self.finetune_from)
        return [names[first - 1]] if first > 0 else []

    def _check_params(self) -> None:
        from iadkit.backbones import backbone_names

        if self.backbone in backbone_names():
            names = self._stage_names()
            for key in ("layer", "finetune_from"):
                if getattr(self, key) not in names:
                    raise InvalidParameterError(
                        f"{type(self).__name__}: {key}={getattr(self, key)!r} is not a stage of {self.backbone!r}; "
                        f"choose among {', '.join(names)}"
                    )
            if names.index(self.finetune_from) > names.index(self.layer):
                raise InvalidParameterError(
                    f"{type(self).__name__}: finetune_from={self.finetune_from!r} comes after layer={self.layer!r}; "
                    "the trained stages must end at the scored layer"
                )
        super()._check_params()

    def _build(self) -> None:
        names = self._stage_names()
        first, last = names.index(self.finetune_from), names.index(self.layer)
        stages = pretrained_stages(self.backbone, self.layer, self.weights_path)
        if first > 0:
            super()._build()  # the frozen stages, rebuilt from the package on load (not saved)
        self.trunk_ = freeze_batchnorm(nn.Sequential(*[m for _, m in stages[first : last + 1]]))
        self._build_heads(self.layer_channels()[0])

    def _build_heads(self, channels: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def train(self, mode: bool = True) -> DeviationNetwork:
        super().train(mode)
        if hasattr(self, "trunk_"):
            freeze_batchnorm(self.trunk_)
        return self

    def frozen(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> the output of the frozen stages (the images themselves when all train)."""
        if not self.backbone_layers():
            return images
        with torch.no_grad():
            return self.backbone_(images)[self.backbone_layers()[0]]

    def frozen_scales(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen stages' output for the image at each of `n_scales` scales: full size, then
        halved, quartered ... (nearest-neighbour resizing of the normalised image, as the code)."""
        h, w = images.shape[-2:]
        out = []
        for s in range(self.n_scales):
            x = images if s == 0 else F.interpolate(images, size=(max(1, h >> s), max(1, w >> s)), mode="nearest")
            out.append(self.frozen(x))
        return out

    # -- training ------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        labels = [s.label for s in train.samples]
        normal = [i for i, y in enumerate(labels) if y == GOOD]
        anomalous = [i for i, y in enumerate(labels) if y == ANOMALOUS]
        if not anomalous:
            raise TrainingDataError(
                f"{type(self).__name__} is semi-supervised: it needs labelled defects (label 1) among its training "
                "images, and got none; add a few (e.g. the semi_supervised setting) or use an unsupervised method"
            )
        if not normal:
            raise TrainingDataError(
                f"{type(self).__name__} needs good training images (label 0) besides the labelled defects"
            )
        gen = torch.Generator().manual_seed(self.seed)
        self._prepare_training(train, normal, gen)
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.lr_step, gamma=0.1)
        mean = torch.tensor(train.preprocess.mean).view(3, 1, 1)
        std = torch.tensor(train.preprocess.std).view(3, 1, 1)
        # The frozen stages of an image that is not augmented give the same output every time:
        # computed once (an optimisation only; results are identical).
        cache: dict[int, list[torch.Tensor]] = {}
        self.loss_history_: list[float] = []
        self.train()
        with step_bar(self.epochs * self.steps_per_epoch, self.name, enabled=progress) as bar:
            for _ in range(self.epochs):
                total = 0.0
                for batch in balanced_batches(normal, anomalous, self.batch_size, self.steps_per_epoch, gen):
                    pixels = torch.stack([train.image(i) for i in batch]) * std + mean
                    batch_labels = torch.tensor([labels[i] for i in batch])
                    pixels, batch_labels, changed = self._augment(pixels, batch_labels, gen)
                    images = ((pixels - mean) / std).to(self.device)
                    frozen = self._frozen_cached(images, batch, changed, cache)
                    loss = self._batch_loss(frozen, batch_labels.to(self.device), gen)
                    if not torch.isfinite(loss):
                        raise TrainingDataError(
                            f"{self.name}: the training loss became {float(loss)}; lower the learning rate"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    total += float(loss.detach())
                    bar.advance(loss=float(loss.detach()))
                schedule.step()
                self.loss_history_.append(total / self.steps_per_epoch)
        self.eval()
        self._finish_training(train)

    def _frozen_cached(
        self, images: torch.Tensor, batch: list[int], changed: torch.Tensor, cache: dict[int, list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        """`frozen_scales(images)`, reusing the cached output of images that were not augmented."""
        todo = [j for j, i in enumerate(batch) if bool(changed[j]) or i not in cache]
        if todo:
            fresh = self.frozen_scales(images[todo])
            for row, j in enumerate(todo):
                if not bool(changed[j]):
                    cache[batch[j]] = [f[row] for f in fresh]
        out = []
        for s in range(self.n_scales):
            rows: list[torch.Tensor | None] = [None] * len(batch)
            for row, j in enumerate(todo):
                rows[j] = fresh[s][row]
            out.append(torch.stack([r if r is not None else cache[batch[j]][s] for j, r in enumerate(rows)]))
        return out

    def _prepare_training(self, train: ImageSet, normal: list[int], gen: torch.Generator) -> None:
        """Hook before the first batch (DRA picks its reference normal images here)."""

    def _finish_training(self, train: ImageSet) -> None:
        """Hook after the last batch."""

    def _augment(
        self, pixels: torch.Tensor, labels: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training augmentation of unnormalised [B, 3, H, W] images in [0, 1]: a random rotation
        by U(-rotation, rotation) degrees. Returns (images, labels, which images changed)."""
        if self.rotation <= 0:
            return pixels, labels, torch.zeros(pixels.shape[0], dtype=torch.bool)
        angles = (torch.rand(pixels.shape[0], generator=gen) * 2 - 1) * self.rotation
        rotated = torch.stack([rotate(img, float(a)) for img, a in zip(pixels, angles)])
        return rotated, labels, torch.ones(pixels.shape[0], dtype=torch.bool)

    def _batch_loss(
        self, frozen: list[torch.Tensor], labels: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:  # pragma: no cover
        """The loss of a batch given the frozen stages' output at each scale."""
        raise NotImplementedError

    def deviation(self, scores: torch.Tensor, targets: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The deviation loss of `scores` for 0/1 `targets`, reference drawn from `gen`."""
        return deviation_loss(
            scores, targets.float(), margin=self.margin, reference_size=self.reference_size, generator=gen
        )


@register
class DevNet(DeviationNetwork):
    """Deviation network with top-K MIL scoring, trained on good images and a few labelled defects (Pang et al. 2019/2021)."""

    name = "devnet"
    family = "few-shot supervised"
    paper = "Pang et al., Explainable Deep Few-shot Anomaly Detection with Deviation Networks, arXiv 2021 (KDD 2019)"
    smoke_params = {"epochs": 2, "steps_per_epoch": 4, "batch_size": 8, "lr": 1e-3}
    paper_params = {"backbone": "resnet18", "layer": "layer4", "finetune_from": "stem", "epochs": 50}
    paper_image_size = 448  # the code's default img_size

    def _build_heads(self, channels: int) -> None:
        self.scorer_ = PlainHead(channels, self.topk)

    def score(self, frozen: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image scores [B]: the mean over scales of the top-K MIL scores, MIL map at full scale [B, h, w])."""
        results = [self.scorer_(self.trunk_(f)) for f in frozen]
        return torch.stack([s for s, _ in results], 1).mean(1), results[0][1]

    def _batch_loss(self, frozen: list[torch.Tensor], labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.deviation(self.score(frozen)[0], labels, gen)

    def _predict(self, images: torch.Tensor) -> Prediction:
        scores, maps = self.score(self.frozen_scales(images.to(self.device)))
        return Prediction(scores=scores.to(images.device), maps=maps.to(images.device))


__all__ = ["DevNet", "DeviationNetwork"]
