"""CutPaste: learn what "locally irregular" looks like from cut-and-pasted good images, then
score with a Gaussian density estimate of the learned representations of good images.

Paper: Chun-Liang Li, Kihyuk Sohn, Jinsung Yoon, Tomas Pfister, "CutPaste: Self-Supervised
Learning for Anomaly Detection and Localization", CVPR 2021.

Algorithm. A CNN with a projection head is trained as a classifier to tell good images
from the same images augmented by CutPaste (a colour-jittered rectangle of 2%-15% of the
area, aspect ratio in (0.3, 1) U (1, 3.3), pasted elsewhere) and CutPaste-Scar (a thin
jittered strip 2-16 x 10-25 px rotated by -45..45 degrees). The "3-way" variant learns three
classes (good / CutPaste / Scar), the paper's best single model. After training, a
Gaussian density estimator (GDE) is fitted on the representations of the good training
images, and a test image is scored by its Mahalanobis distance to that Gaussian (the GDE's
negative log-density up to monotone terms). For localisation the same is done on patches:
the network is trained on random patches, every patch of a test image (stride s) is scored,
and patch scores are spread back over the patches' pixels (receptive-field upsampling, the
mean of the scores of the patches covering a pixel) and smoothed with a Gaussian.

The official code (google-research/deep_representation_one_class, TensorFlow) was not read: the
stored snapshot has no CutPaste files. Paper -> reference code (the popular unofficial PyTorch
port Runinho/pytorch-cutpaste: ``run_training.py``, ``model.py``, ``cutpaste.py``,
``density.py``) -> ours:

=============================  ============================================  ================================================
paper                          reference code                                ours
=============================  ============================================  ================================================
ResNet-18 (ImageNet), all      port: torchvision ResNet-18, pretrained,      EfficientNet-Lite0 (offline); only the stages
                               every layer trained                           from ``finetune_from`` (default ``blocks.5``:
                                                                             blocks.5, blocks.6 and the 1280-channel head
                                                                             conv, 2.7 M parameters) are trained, their
                                                                             batch-norm statistics frozen; ``paper=True``:
                                                                             ResNet-18 from ``layer1`` (user weight file)
MLP projection head            port: Linear-ReLU x 8 (512) then              Linear-BN-ReLU for each of ``head_dims`` (512,
                               Linear(128), no batch norm; classifier        128), the last one included; ``paper=True``: 8 x
                               Linear(128, classes)                          512 + 128; then the linear classifier
CutPaste: 2-15 % area          port: area U(0.02, 0.15), aspect U(0.3,       area U(0.02, 0.15), aspect log-uniform over
                               1/0.3) (uniform, not two intervals),          (0.3, 3.3), colour jitter 0.1, the same image
                               ColorJitter 0.1, pasted from the same image   (`components.synthesis.cutpaste`)
CutPaste-Scar, 3-way           not checked (the snapshot of the port read    scar 2-16 x 10-25 px at 256 px, scaled to the
                               has the plain CutPaste class only)            image, rotated -45..45 deg (`cutpaste_scar`);
                                                                             ``variant`` "3way" (default), "binary", "scar"
SGD 0.03, m 0.9, cosine        port: SGD lr 0.03, momentum 0.9, wd 3e-5,     SGD ``lr`` 0.03, ``momentum`` 0.9,
                               CosineAnnealingWarmRestarts(T_0 = epochs)     ``weight_decay`` 3e-5 (the port's; the paper's
                               stepped per batch, 256 epochs, batch 32 good  value not checked), CosineAnnealingLR over all
                               + 32 augmented                                steps, ``epochs`` 40 (CPU-sized; ``paper=True``:
                                                                             256), ``batch_size`` 32 good + 32 per
                                                                             augmentation
input 256 x 256                port: RandomResizedCrop(256, scale 0.5-1)     the model's preprocessing (224 by default;
                               and GaussianBlur before CutPaste (in the      ``paper=True``: 256), ImageNet normalisation, no
                               version read), no ImageNet normalisation      extra augmentation
GDE on the representation      port: Ledoit-Wolf precision, Mahalanobis      Ledoit-Wolf covariance, whitening, Mahalanobis
                               distance of the head output (128-d)           distance (`_fit_gde`) of the pooled backbone
                                                                             representation (``embedding="backbone"``,
                                                                             default) or of the head output (``"head"``)
patches 64 px, stride 4, σ 4   not checked (no patch-level code in the       ``patch_size`` None by default (image level, no
                               port's files read)                            maps); set, patches at ``patch_stride`` 4,
                                                                             receptive-field upsampling (mean of covering
                                                                             patches), σ 4 at a 224-px input scaled (model
                                                                             `Postprocess`)
=============================  ============================================  ================================================

Why the changes: the paper fine-tunes all of ResNet-18 for 256 epochs, out of reach on a CPU;
freezing the early stages keeps generic low-level features and lets a short schedule work. With
fewer good images than dimensions a sample covariance is singular, hence the Ledoit-Wolf
shrinkage (the GDE choice Sohn et al. recommend for one-class representations is the pooled
representation before the head). The image-level variant gives scores only: the paper localises
with it only by GradCAM visualisation, which we do not implement; set ``patch_size`` (e.g. 32
at 64-128 px, the paper's 64 at 256 px) for the localisation variant, which gives maps and
scores each image by the maximum of its map.

Measured on the synthetic set at 64 px (preset "small": 16 training images, 15-18 test
images; defects cover 0.3-3% of the image, less than CutPaste's 2-15% patches), image AUROC
fabric / metal / wood / washer / label:
    - localisation variant (32 px patches, stride 8, 40 epochs): 0.91 / 0.93 / 0.86 / 0.56 /
      0.36; with 15 epochs on wood 0.89 against 0.66 for the same network untrained;
    - image-level variant (40 epochs): 0.70 / 0.85 / 0.90 / 0.54 / 0.57, against 0.87 /
      0.80 / 0.72 / 0.56 / 0.61 for the untrained ImageNet representation: training helps
      on two textures and hurts on fabric, where a pooled 1280-d representation of a 64 px
      image hardly sees a defect of a few pixels. Prefer the patch variant for small defects.
Neither variant handles the logical defects of "label" (missing/extra print), as expected
of a method that learns local irregularities.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iadkit.backbones import FeatureExtractor
from iadkit.components.gaussian import mahalanobis, whitening_matrices
from iadkit.components.synthesis import cutpaste, cutpaste_scar
from iadkit.components.tracing import is_tracing
from iadkit.data.transforms import ImageSet
from iadkit.errors import InvalidParameterError, TrainingDataError
from iadkit.methods.base import BackboneDetector, register
from iadkit.methods.params import Interval, Length, OneOf, at_least, param, positive
from iadkit.progress import step_bar
from iadkit.types import Prediction

VARIANTS = {"binary": ("cutpaste",), "scar": ("scar",), "3way": ("cutpaste", "scar")}
EMBEDDINGS = ("backbone", "head")


def _keep_bn_eval(module: nn.Module) -> None:
    """Batch-norm layers of a fine-tuned trunk stay in eval mode: their ImageNet statistics
    are kept, because batches of a few images would corrupt them."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class CutPasteNet(nn.Module):
    """Trainable part: fine-tuned last backbone stages -> pooling -> MLP head -> classifier."""

    def __init__(self, trunk: Sequence[nn.Module], in_channels: int, head_dims: Sequence[int], n_classes: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(*trunk)
        layers: list[nn.Module] = []
        d = in_channels
        for h in head_dims:
            layers += [nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            d = h
        self.head = nn.Sequential(*layers)
        self.classifier = nn.Linear(d, n_classes)

    def train(self, mode: bool = True) -> CutPasteNet:
        super().train(mode)
        _keep_bn_eval(self.trunk)
        return self

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backbone features -> (pooled representation, head embedding, logits)."""
        rep = self.trunk(feats).mean(dim=(2, 3))
        emb = self.head(rep)
        return rep, emb, self.classifier(emb)


def ledoit_wolf_covariance(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk covariance of samples x [n, d] (float64), via scikit-learn."""
    from sklearn.covariance import ledoit_wolf

    cov, _ = ledoit_wolf(x.detach().double().cpu().numpy(), assume_centered=False)
    return torch.from_numpy(np.ascontiguousarray(cov))


def _coverage_matrix(n_patches: int, patch: int, stride: int) -> torch.Tensor:
    """[covered, n_patches] with 1 where pixel r lies in patch i (``i*stride <= r < i*stride + patch``)."""
    covered = (n_patches - 1) * stride + patch
    r = torch.arange(covered)[:, None]
    start = torch.arange(n_patches)[None, :] * stride
    return ((r >= start) & (r < start + patch)).float()


def receptive_field_upsample(scores: torch.Tensor, size: tuple[int, int], patch: int, stride: int) -> torch.Tensor:
    """Patch scores [B, nh, nw] -> pixel map [B, H, W]: each pixel gets the mean score of the
    patches that contain it (pixels no patch covers take the nearest patches' values).

    The sum over covering patches is separable (a patch covers a band of rows times a band of
    columns), so it is two products with 0/1 coverage matrices — what ``F.fold`` computes,
    but in ops an ONNX graph holds (the exporter cannot export this fold)."""
    _, nh, nw = scores.shape
    ah = _coverage_matrix(nh, patch, stride).to(scores)  # [Hc, nh]
    aw = _coverage_matrix(nw, patch, stride).to(scores)  # [Wc, nw]
    summed = torch.matmul(torch.matmul(ah, scores), aw.T)  # [B, Hc, Wc]
    count = ah.sum(1)[:, None] * aw.sum(1)[None, :]
    out = (summed / count)[:, None]
    covered_h, covered_w = int(ah.shape[0]), int(aw.shape[0])
    if (covered_h, covered_w) != tuple(size):  # uncovered right/bottom margin: replicate
        out = F.pad(out, (0, size[1] - covered_w, 0, size[0] - covered_h), mode="replicate")
    return out[:, 0]


@register
class CutPaste(BackboneDetector):
    """CutPaste (Li et al. 2021): self-supervised CutPaste classifier + Gaussian density."""

    name = "cutpaste"
    family = "one-class classification"
    paper = "Li et al., CutPaste: Self-Supervised Learning for Anomaly Detection and Localization, CVPR 2021"
    smoke_params = {"epochs": 1, "batch_size": 8, "patch_size": 32, "patch_stride": 16}
    paper_params = {
        "backbone": "resnet18",
        "epochs": 256,
        "finetune_from": "layer1",
        "head_dims": (512, 512, 512, 512, 512, 512, 512, 512, 128),
    }
    paper_image_size = 256
    produces_maps = False  # the image-level variant; `patch_size` turns on maps (`draws_maps`)

    finetune_from: str = param("blocks.5", "First backbone stage that is fine-tuned (earlier stages stay frozen).")
    variant: str = param(
        "3way", "'binary' (CutPaste), 'scar' or '3way' (both; paper's best).", check=OneOf(tuple(VARIANTS))
    )
    head_dims: tuple[int, ...] = param(
        (512, 128), "Projection-head widths (Linear-BN-ReLU).", check=(Length(1), Interval(1, None))
    )
    embedding: str = param(
        "backbone", "GDE on the pooled 'backbone' representation or the 'head' output.", check=OneOf(EMBEDDINGS)
    )
    epochs: int = param(40, "Training epochs (paper: 256; CPU-sized default).", check=at_least(1))
    batch_size: int = param(32, "Good images per step (paper: 32, + augmented copies).", check=at_least(1))
    lr: float = param(0.03, "SGD learning rate, cosine decay (paper: 0.03).", check=positive())
    momentum: float = param(0.9, "SGD momentum (paper: 0.9).", check=Interval(0, 1, closed="left"))
    weight_decay: float = param(3e-5, "SGD weight decay (paper: 3e-5).", check=at_least(0))
    patch_size: int | None = param(
        None, "Patch side for the localisation variant (None: image level).", check=at_least(8)
    )
    patch_stride: int = param(4, "Stride between scored patches (paper: 4).", check=at_least(1))

    def draws_maps(self) -> bool:
        return self.patch_size is not None

    def backbone_layers(self) -> list[str]:
        return [self._frozen_layer()]

    def _stage_names(self) -> list[str]:
        from iadkit.backbones import layer_names

        return [info.name for info in layer_names(self.backbone)]

    def _frozen_layer(self) -> str:
        """The last frozen stage: the one before `finetune_from`."""
        names = self._stage_names()
        return names[names.index(self.finetune_from) - 1]

    def _check_params(self) -> None:
        from iadkit.backbones import backbone_names

        names = self._stage_names() if self.backbone in backbone_names() else []
        if names and (self.finetune_from not in names or names.index(self.finetune_from) == 0):
            raise InvalidParameterError(
                f"CutPaste: finetune_from must name a stage after the stem of {self.backbone!r}: one of {', '.join(names[1:])}"
            )
        super()._check_params()

    # learned buffers, registered in _build (declared for type checkers)
    gde_mean_: torch.Tensor
    gde_whitening_: torch.Tensor

    def _build(self) -> None:
        # The full pretrained network, split: frozen stages up to `finetune_from` (excluded)
        # become `backbone_`; copies of the later ones are the trainable trunk.
        with torch.random.fork_rng(devices=[]):
            full = FeatureExtractor(self.backbone, ["head"], self.weights_path, channels_last=False)
        names = list(full._step_names)
        split = names.index(self.finetune_from)
        trunk = [copy.deepcopy(m) for m in list(full.body)[split:]]
        rep_dim = full.channels["head"]
        del full
        super()._build()
        self.net_ = CutPasteNet(trunk, rep_dim, self.head_dims, 1 + len(VARIANTS[self.variant]))
        for p in self.net_.parameters():
            p.requires_grad_(True)
        self.net_.eval()
        dim = rep_dim if self.embedding == "backbone" else self.head_dims[-1]
        self.register_buffer("gde_mean_", torch.zeros(1, dim))
        self.register_buffer("gde_whitening_", torch.eye(dim)[None])

    # -- pieces ------------------------------------------------------------------------------
    def _frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone_(images)[self._frozen_layer()]

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        rep, emb, _ = self.net_(self._frozen_features(images))
        return rep if self.embedding == "backbone" else emb

    def _patches(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Images [B, 3, H, W] -> patches [B*nh*nw, 3, p, p] at `patch_stride`, and (nh, nw)."""
        p, s = self.patch_size, self.patch_stride
        assert p is not None
        h, w = images.shape[-2:]
        if p > min(h, w):
            raise InvalidParameterError(f"CutPaste: patch_size {p} is larger than the input {h}x{w}")
        cols = F.unfold(images, kernel_size=p, stride=s)  # [B, 3*p*p, L]
        nh, nw = (h - p) // s + 1, (w - p) // s + 1
        patches = cols.transpose(1, 2).reshape(-1, 3, p, p)
        return patches, nh, nw

    def _embed_all(self, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Embeddings of whole images [B, d], or of all their patches [B*L, d]."""
        if self.patch_size is not None:
            images, _, _ = self._patches(images)
        if is_tracing():  # one block: a traced chunk loop would be unrolled at the traced batch
            return self._embed(images)
        return torch.cat([self._embed(images[i : i + chunk]) for i in range(0, images.shape[0], chunk)])

    def _augment(self, unit: torch.Tensor, image_side: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Good images or patches [B, 3, h, w] in [0, 1] -> good + augmented copies, labels.

        Scar sizes are pixels of a 256 px image, scaled to the image (not patch) size."""
        ref = 256.0 * min(unit.shape[-2:]) / image_side
        out, labels = [unit], [torch.zeros(unit.shape[0], dtype=torch.long)]
        for k, kind in enumerate(VARIANTS[self.variant], start=1):
            if kind == "cutpaste":
                aug = [cutpaste(x, generator=gen)[0] for x in unit]
            else:
                aug = [cutpaste_scar(x, reference_size=ref, generator=gen)[0] for x in unit]
            out.append(torch.stack(aug))
            labels.append(torch.full((unit.shape[0],), k, dtype=torch.long))
        return torch.cat(out), torch.cat(labels)

    # -- training ----------------------------------------------------------------------------
    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        n = len(train)
        if n < 2:
            raise TrainingDataError("CutPaste needs at least 2 good training images (for its Gaussian density)")
        device = self.device
        mean = torch.tensor(train.preprocess.mean).view(1, 3, 1, 1)
        std = torch.tensor(train.preprocess.std).view(1, 3, 1, 1)
        h, w = train.preprocess.output_size
        gen = torch.Generator().manual_seed(self.seed)
        bs = min(self.batch_size, n)
        steps_per_epoch = -(-n // bs)
        total = self.epochs * steps_per_epoch
        optimizer = torch.optim.SGD(
            self.net_.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        self.net_.train()
        with step_bar(total, "cutpaste", enabled=progress) as bar:
            for _ in range(self.epochs):
                order = torch.randperm(n, generator=gen)
                for start in range(0, n, bs):
                    idx = order[start : start + bs]
                    x = torch.stack([train.image(int(i)) for i in idx])
                    if self.patch_size is not None:
                        p = self.patch_size
                        tops = torch.randint(0, h - p + 1, (len(idx),), generator=gen)
                        lefts = torch.randint(0, w - p + 1, (len(idx),), generator=gen)
                        x = torch.stack([im[:, t : t + p, left : left + p] for im, t, left in zip(x, tops, lefts)])
                    unit = (x * std + mean).clamp(0, 1)
                    aug, labels = self._augment(unit, min(h, w), gen)
                    _, _, logits = self.net_(self._frozen_features(((aug - mean) / std).to(device)))
                    loss = F.cross_entropy(logits, labels.to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    acc = (logits.argmax(1).cpu() == labels).float().mean().item()
                    bar.advance(loss=loss.item(), acc=acc)
        self.net_.eval()
        self._fit_gde(train)

    @torch.no_grad()
    def _fit_gde(self, train: ImageSet) -> None:
        embs = [self._embed_all(b.images.to(self.device)) for b in train.batches(self.batch_size)]
        e = torch.cat(embs).double().cpu()
        cov = ledoit_wolf_covariance(e)
        self.gde_mean_.copy_(e.mean(0, keepdim=True).float())
        self.gde_whitening_.copy_(whitening_matrices(cov[None], eps=0.0).float())

    # -- inference ---------------------------------------------------------------------------
    def _predict(self, images: torch.Tensor) -> Prediction:
        emb = self._embed_all(images)
        dist = mahalanobis(emb[:, None], self.gde_mean_, self.gde_whitening_)[:, 0]
        if self.patch_size is None:
            return Prediction(scores=dist, maps=None)
        b = images.shape[0]
        size = (images.shape[-2], images.shape[-1])
        nh = (size[0] - self.patch_size) // self.patch_stride + 1
        nw = (size[1] - self.patch_size) // self.patch_stride + 1
        maps = receptive_field_upsample(dist.reshape(b, nh, nw), size, self.patch_size, self.patch_stride)
        return Prediction(scores=None, maps=maps)
