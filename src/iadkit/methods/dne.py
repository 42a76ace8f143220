"""DNE — continual anomaly detection by keeping the Distribution of Normal Embeddings per task.

Paper: W. Li, J. Zhan, J. Wang, B. Xia, B.-B. Gao, J. Liu, C. Wang, F. Zheng, "Towards
Continual Adaptation in Industrial Anomaly Detection", ACM MM 2022. Reference code: the
authors' DNE repository, re-used by IM-IAD in open-iad (``arch/dne.py``,
``models/cutpaste/density.py``, ``configuration/1_model_base/dne.yaml``).

Algorithm, as in the paper and its code: an image's global embedding (the ViT's class
token), L2-normalised, is modelled per task by a Gaussian; only the statistics of each task
(mean, covariance, number of images) are kept in memory, never images. After learning task
T, a test image is scored by its Mahalanobis distance to one Gaussian fitted (Ledoit-Wolf
shrinkage) on the union of the current task's embeddings and, for every earlier task t, n_t
embeddings *replayed* by sampling N(mu_t, Sigma_t) — so no task id is needed at test time.

Paper -> reference code (the authors' vijaylee/Continual_Anomaly_Detection, "Official code for
ACMMM 2022": ``methods/dne.py``, ``main.py``, ``configs/cad.yaml``; re-used by open-iad
``arch/dne.py``) -> ours:

=============================  ============================================  ================================================
paper                          reference code                                ours
=============================  ============================================  ================================================
ViT-B/16, 224 px, class token  ViT-B/16 from                                 a frozen packaged CNN (EfficientNet-Lite0 by
                               ``vit_models/sam/ViT-B_16.npz`` (the          default): the global average of its 1280-channel
                               README's checkpoint), 224 px,                 ``head`` map (the input of its ImageNet
                               ``forward_features``                          classifier) stands in for the class token; any
                                                                             registered backbone and layer (``layers``:
                                                                             ResNet ``layer4``, MobileNetV2 ``features.18``);
                                                                             no ViT weights offline
encoder fine-tuned per task    ``configs/cad.yaml``: Adam, base lr 1e-4      not done: the encoder stays frozen (this
                               with 10 warm-up epochs, wd 3e-5, 50 epochs,   toolkit's continual setting for DNE), one pass
                               batch 32, strong (CutPaste-style)             over the task's images; an old task's statistics
                               augmentation, head fixed after task 0         stay exactly valid (no embedding drift), so
                                                                             forgetting comes only from the joint Gaussian
                                                                             widening
task embeddings                the non-augmented half of every batch of the  every training image once, L2-normalised
                               training epoch before an evaluation,          (`DNE.embed`)
                               L2-normalised
per task: mean, covariance     the mean and what ``density.fit`` returns,    mean and Ledoit-Wolf covariance (what the paper
                               stored as ``task_wise_cov``: in open-iad's    describes; `DNE._fit_task`)
                               copy (``models/cutpaste/density.py``) the
                               Ledoit-Wolf **precision**, so replays are
                               drawn from the inverse covariance; the
                               authors' ``utils/density.py`` not checked
replay n_t samples per task    ``np.random.multivariate_normal`` with n_t =  the same procedure with n_t = the task's number
                               the task's training count (times 1 −          of training images, drawn with a generator
                               ``noise_ratio``, default 0), unseeded beyond  seeded by ``seed`` and the task count
                               the global seed 42                            (`DNE._joint_gaussian`)
joint Gaussian, Mahalanobis    replays + current embeddings, L2-normalised,  the same (``scoring="joint"``, default), stored
                               one Ledoit-Wolf fit, Mahalanobis distance     in the model so a loaded model scores as the
                               (square root)                                 fitted one; ``scoring="nearest_task"`` (ours):
                                                                             the smallest distance to any task's own Gaussian
image level only               the same (image AUROC)                        the same (``produces_maps = False``)
=============================  ============================================  ================================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from iadkit.components.gaussian import torch_threads, whitening_matrices
from iadkit.data.transforms import ImageSet
from iadkit.errors import TrainingDataError
from iadkit.methods.base import BackboneDetector, register
from iadkit.methods.params import Length, OneOf, at_least, param
from iadkit.types import Prediction

SCORINGS = ("joint", "nearest_task")


def ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk covariance of samples x [n, d] (float64), as the reference's
    ``sklearn.covariance.LedoitWolf``."""
    from iadkit.methods.cutpaste import ledoit_wolf_covariance

    return ledoit_wolf_covariance(x)


@register
class DNE(BackboneDetector):
    """Per-task Gaussian statistics of frozen global image embeddings; Mahalanobis scoring against
    a Gaussian refitted on replays of every task (Li et al., ACM MM 2022). Continual."""

    name = "dne"
    family = "memory bank"
    paper = "Li et al., Towards Continual Adaptation in Industrial Anomaly Detection, ACM MM 2022"
    continual = True
    produces_maps = False
    map_sigma = 0.0
    smoke_params = {"batch_size": 8}
    # the paper's batch and scoring; its ImageNet ViT-B/16 has no offline weights here, so the
    # backbone stays a parameter (any registered CNN's pooled features stand in for the class token)
    paper_params = {"batch_size": 32, "scoring": "joint"}

    layer_presets = {"efficientnet": ("head",), "resnet": ("layer4",), "mobilenet": ("features.18",)}
    layers: tuple[str, ...] | None = param(
        None,
        "The layer whose globally pooled map is the image embedding (the ViT class token's stand-in); "
        "None: the backbone's last layer (`layer_presets`).",
        check=Length(1, 1),
    )
    scoring: str = param(
        "joint",
        "'joint': Mahalanobis distance to one Gaussian refitted on replays of every task (the paper's code); "
        "'nearest_task': the smallest distance to any task's own Gaussian.",
        check=OneOf(SCORINGS),
        inference=True,
    )
    batch_size: int = param(32, "Images per feature batch (paper: 32).", check=at_least(1))

    # learned buffers, registered in _build (declared for type checkers)
    means_: torch.Tensor
    covariances_: torch.Tensor
    counts_: torch.Tensor
    joint_mean_: torch.Tensor
    joint_whitening_: torch.Tensor

    def _build(self) -> None:
        super()._build()
        d = self.layer_channels()[0]
        self.register_buffer("means_", torch.empty(0, d))  # per task
        self.register_buffer("covariances_", torch.empty(0, d, d))  # Ledoit-Wolf, per task
        self.register_buffer("counts_", torch.empty(0, dtype=torch.long))  # training images per task
        self.register_buffer("joint_mean_", torch.empty(0))
        self.register_buffer("joint_whitening_", torch.empty(0, 0))
        self._task_whitening: torch.Tensor | None = None  # per task, from covariances_ when needed

    def _after_load(self) -> None:
        self._task_whitening = None

    def task_whitening(self) -> torch.Tensor:
        """Whitening matrices of every task's own Gaussian [T, d, d] (for ``nearest_task``)."""
        if self._task_whitening is None or self._task_whitening.shape[0] != self.n_tasks:
            with torch_threads(1):
                white = whitening_matrices(self.covariances_.double().cpu(), eps=0.0)
            self._task_whitening = white.to(self.covariances_.device, torch.float32)
        return self._task_whitening

    @property
    def n_tasks(self) -> int:
        return int(self.counts_.shape[0])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> L2-normalised global embeddings [B, d] (the pooled map of the layer)."""
        (fmap,) = self.features(images)
        return F.normalize(fmap.mean(dim=(2, 3)).double(), p=2, dim=1)

    # -- fit -----------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        self._fit_task(train, progress=progress)

    def _fit_task(self, train: ImageSet, *, progress: bool) -> None:
        z = torch.cat(
            [self.embed(x).cpu() for x in self.single_pass(train, self.batch_size, "dne embeddings", progress=progress)]
        )
        if z.shape[0] < 2:
            raise TrainingDataError(
                f"dne: a task needs at least 2 good training images to estimate its Gaussian, got {z.shape[0]}"
            )
        mean = z.mean(0)
        cov = ledoit_wolf(z)
        dev = self.means_.device
        self.means_ = torch.cat([self.means_, mean[None].to(self.means_)])
        self.covariances_ = torch.cat([self.covariances_, cov[None].to(self.covariances_)])
        self.counts_ = torch.cat([self.counts_, torch.tensor([z.shape[0]], device=dev)])
        joint_mean, joint_white = self._joint_gaussian(z)
        self.joint_mean_ = joint_mean.to(dev, torch.float32)
        self.joint_whitening_ = joint_white.to(dev, torch.float32)

    def _joint_gaussian(self, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DNE's evaluation density: replay each earlier task from its Gaussian, add the
        current task's embeddings, re-normalise, fit Ledoit-Wolf -> (mean, whitening)."""
        g = torch.Generator().manual_seed(int(self.seed) * 1000 + self.n_tasks)
        parts = []
        for t in range(self.n_tasks - 1):
            mean = self.means_[t].double().cpu()
            cov = self.covariances_[t].double().cpu()
            chol = torch.linalg.cholesky(cov + 1e-12 * torch.eye(cov.shape[0], dtype=cov.dtype))
            eps = torch.randn(int(self.counts_[t]), cov.shape[0], generator=g, dtype=torch.float64)
            parts.append(mean + eps @ chol.T)
        parts.append(current.double())
        union = F.normalize(torch.cat(parts), p=2, dim=1)
        cov = ledoit_wolf(union)
        with torch_threads(1):
            white = whitening_matrices(cov[None], eps=0.0)[0]
        return union.mean(0), white

    # -- predict -------------------------------------------------------------------------------------
    def _predict(self, images: torch.Tensor) -> Prediction:
        z = self.embed(images).float()
        if self.scoring == "joint":
            diff = z - self.joint_mean_.to(z)
            scores = (diff @ self.joint_whitening_.to(z).T).norm(dim=1)
        else:
            diff = z[:, None, :] - self.means_.to(z)[None]  # [B, T, d]
            white = torch.einsum("tij,btj->bti", self.task_whitening().to(z), diff)
            scores = white.norm(dim=2).min(dim=1).values
        return Prediction(scores=scores.to(images.device), maps=None)
