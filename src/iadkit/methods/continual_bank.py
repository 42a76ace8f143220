"""A continual memory bank: one compact PatchCore bank and one task key per task, and a test
image routed to the task whose key it matches best (no task id at test time). UCAD-style.

Paper: J. Liu, K. Wu, Q. Nie, Y. Chen, B.-B. Gao, Y. Liu, J. Wang, C. Wang, F. Zheng,
"Unsupervised Continual Anomaly Detection with Contrastively-learned Prompt", AAAI 2024
(UCAD); code: github.com/shirowalker/UCAD (``run_ucad.py``, ``patchcore/patchcore.py``).

UCAD keeps, for every task, a *key* (a small coreset of the frozen ViT's patch features of
the task's training images: ``fit_with_limit_size(train, key_size=196)``), a learned prompt
and a *knowledge* memory (a PatchCore bank of the prompted features, 196 patches per task).
At test time the image is compared with every task's key by PatchCore's nearest-neighbour
scorer and the task with the smallest score is selected; the image is then scored by
PatchCore against that task's knowledge bank.

Paper -> reference code (the authors' shirowalker/UCAD: ``run_ucad.py``,
``patchcore/patchcore.py``, README command) -> ours:

=============================  ============================================  ================================================
paper                          reference code                                ours
=============================  ============================================  ================================================
ViT-B/16 patch tokens          timm ``vit_base_patch16_224`` ``seg_feat``    PatchCore's locally aware patch features on
                               (14 x 14 x 768; the run name says layer 5,    EfficientNet-Lite0 (this class *is* a PatchCore:
                               not checked in the model code), PatchCore's   `methods.patchcore` builds the features, the
                               ``--patchsize 1`` (no neighbourhood           coreset and the scoring); ``paper=True``:
                               aggregation), projected to 1024; 224 px       PatchCore's paper configuration
                               resize, no crop
prompts, contrastive (SCL)     a prompted ViT (e-prompts in all 12 layers)   not done: no SAM or ViT prompt weights offline,
                               trained 25 epochs per task, lr 5e-4, with     so the banks hold the frozen features (UCAD's
                               SAM masks; each task keeps the epoch with     own "no prompt" baseline); the task routing and
                               the **best test image AUROC**                 per-task banks, which keep earlier tasks from
                                                                             being forgotten, are kept
task key: 196 patches          ``fit_with_limit_size(train,                  greedy k-center
                               key_size=196)``: approximate greedy coreset   (`components.memory_bank.greedy_kcenter`) of
                               of the un-prompted features, limited to 196   ``key_size`` 196 over the task's bank (a coreset
                                                                             of a coreset)
knowledge: 196 (or 1960)       ``memory_size`` 196 ("limited"),              PatchCore's coreset of ``coreset_ratio`` of the
                               ``basic_size`` 1960 ("no limit"), of the      task's patches, optionally cut to ``bank_size``
                               prompted features                             (``paper=True``: 196)
task selection: min score      the task-agnostic inference block of          per image: ``routing="max"`` (default; PatchCore
                               ``run_ucad.py`` sits inside a string literal  image score against each key, smallest wins), a
                               (not run); as written it sums each key's      test set may mix products; ``"mean"``: mean
                               PatchCore scores over a whole test loader     patch distance (less swayed by the defect)
                               and picks one task for all of it
scoring in the task            PatchCore ``NearestNeighbourScorer`` with     PatchCore's: Euclidean nearest-neighbour patch
                               ``--anomaly_scorer_num_nn 1``; scores and     scores, Eq. 7 image score (b = 9), map upsampled
                               maps min-max normalised over the test set     and blurred (σ 4 at 224 px, scaled)
=============================  ============================================  ================================================
"""

from __future__ import annotations

import torch

from iadkit.components.memory_bank import MemoryBankError, NearestNeighborIndex, greedy_kcenter, knn_exact
from iadkit.components.tracing import is_tracing
from iadkit.data.transforms import ImageSet
from iadkit.methods.base import register
from iadkit.methods.params import OneOf, at_least, param
from iadkit.methods.patchcore import PatchCore, reweighted_image_scores
from iadkit.types import Prediction

ROUTINGS = ("max", "mean")


@register
class ContinualBank(PatchCore):
    """Per-task PatchCore banks with task keys; each test image is routed to the task whose key
    it matches best (UCAD-style, Liu et al. AAAI 2024, without prompts). Continual."""

    name = "continual_bank"
    family = "memory bank"
    paper = "Liu et al., Unsupervised Continual Anomaly Detection with Contrastively-learned Prompt, AAAI 2024"
    continual = True
    smoke_params = {"coreset_ratio": 0.1, "key_size": 32}
    paper_params = {**PatchCore.paper_params, "bank_size": 196}

    key_size: int = param(196, "Patch features in each task's key (UCAD: 196).", check=at_least(1))
    bank_size: int | None = param(
        None,
        "Cut each task's bank to this many patch features (UCAD: 196, its 'no limit' variant 1960); "
        "None: PatchCore's coreset_ratio alone.",
        check=at_least(1),
    )
    routing: str = param(
        "max",
        "How an image is matched to a task key: 'max' (the image's PatchCore score against the key, UCAD's) "
        "or 'mean' (the mean nearest-key distance of its patches).",
        check=OneOf(ROUTINGS),
        inference=True,
    )

    # learned buffers, registered in _build (declared for type checkers)
    bank_offsets_: torch.Tensor
    keys_: torch.Tensor
    key_offsets_: torch.Tensor

    def _build(self) -> None:
        super()._build()
        dim = self.embedding_.target_dim
        self.register_buffer("bank_offsets_", torch.zeros(1, dtype=torch.long))  # task t: [o[t], o[t+1])
        self.register_buffer("keys_", torch.empty(0, dim))
        self.register_buffer("key_offsets_", torch.zeros(1, dtype=torch.long))
        self.task_info_: list[dict] = []
        self._task_indexes: dict[int, tuple[tuple, NearestNeighborIndex]] = {}

    def _params_changed(self, names: list[str]) -> None:
        super()._params_changed(names)
        self._task_indexes = {}

    def _after_load(self) -> None:
        super()._after_load()
        self._task_indexes = {}

    @property
    def n_tasks(self) -> int:
        return int(self.bank_offsets_.numel()) - 1

    # -- fit -----------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        self._fit_task(train, progress=progress)

    def _fit_task(self, train: ImageSet, *, progress: bool) -> None:
        earlier = self.memory_bank_
        super()._fit(train, progress=progress)  # PatchCore: the task's coreset bank in memory_bank_
        bank = self.memory_bank_.cpu()
        if self.bank_size is not None and bank.shape[0] > self.bank_size:
            bank = bank[greedy_kcenter(bank, self.bank_size, seed=self.seed).indices]
        key = bank[greedy_kcenter(bank, min(self.key_size, bank.shape[0]), seed=self.seed).indices]
        dev = earlier.device
        self.memory_bank_ = torch.cat([earlier, bank.to(earlier)]).contiguous()
        self.bank_offsets_ = torch.cat([self.bank_offsets_, self.bank_offsets_[-1:] + bank.shape[0]]).to(dev)
        self.keys_ = torch.cat([self.keys_, key.to(self.keys_)]).contiguous()
        self.key_offsets_ = torch.cat([self.key_offsets_, self.key_offsets_[-1:] + key.shape[0]]).to(dev)
        self.task_info_.append({**self.fit_info_, "bank_size": int(bank.shape[0]), "key_size": int(key.shape[0])})
        self._index = None
        self._task_indexes = {}

    # -- predict -------------------------------------------------------------------------------------
    def task_bank(self, t: int) -> torch.Tensor:
        return self.memory_bank_[int(self.bank_offsets_[t]) : int(self.bank_offsets_[t + 1])]

    def task_key(self, t: int) -> torch.Tensor:
        return self.keys_[int(self.key_offsets_[t]) : int(self.key_offsets_[t + 1])]

    def task_index(self, t: int) -> NearestNeighborIndex:
        """The search index over task `t`'s bank (built on first use, not saved)."""
        bank = self.task_bank(t)
        key = (bank.data_ptr(), tuple(bank.shape), bank.device, self.search, self.nprobe, self.ef_search)
        cached = self._task_indexes.get(t)
        if cached is None or cached[0] != key:
            index = NearestNeighborIndex(
                bank, self.search, nprobe=self.nprobe, ef_search=self.ef_search, seed=self.seed
            )
            self._task_indexes[t] = (key, index)
        return self._task_indexes[t][1]

    def _patches(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        feats = self.embed(images)
        b, d, h, w = feats.shape
        if d != self.memory_bank_.shape[1]:
            raise MemoryBankError(
                f"patch features have {d} dimensions but the memory bank has {self.memory_bank_.shape[1]}"
            )
        return feats.permute(0, 2, 3, 1).reshape(b, h * w, d).to(self.memory_bank_.device), (h, w)

    def routing_scores(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, N, D] patch features -> [B, T]: how far each image is from each task's key."""
        b, n, d = patches.shape
        flat = patches.reshape(-1, d)
        out = []
        for t in range(self.n_tasks):
            dist, _ = knn_exact(flat, self.task_key(t), 1)
            per_patch = dist[:, 0].reshape(b, n)
            out.append(per_patch.amax(1) if self.routing == "max" else per_patch.mean(1))
        return torch.stack(out, 1)

    def route(self, images: torch.Tensor) -> torch.Tensor:
        """The task (0-based, in learning order) each image is routed to [B]."""
        self.check_fitted()
        patches, _ = self._patches(images)
        return self.routing_scores(patches).argmin(1)

    def _predict(self, images: torch.Tensor) -> Prediction:
        patches, (h, w) = self._patches(images)
        b, n, d = patches.shape
        task = self.routing_scores(patches).argmin(1)
        if is_tracing():
            return self._predict_every_task(patches, task, (h, w))
        scores = torch.empty(b, device=patches.device)
        maps = torch.empty(b, n, device=patches.device)
        for t in task.unique().tolist():
            sel = (task == t).nonzero().flatten()
            emb = patches[sel]
            index = self.task_index(t)
            dist, idx = index.search(emb.reshape(-1, d), 1)
            patch_scores = dist[:, 0].reshape(len(sel), n).to(emb.device)
            nn_idx = idx[:, 0].reshape(len(sel), n).to(emb.device)
            scores[sel] = reweighted_image_scores(
                patch_scores, nn_idx, emb, self.task_bank(t), self.num_neighbors, bank_sq=index.bank_sq
            ).to(scores)
            maps[sel] = patch_scores.to(maps)
        return Prediction(scores=scores.to(images.device), maps=maps.reshape(b, h, w).to(images.device))

    def _predict_every_task(self, patches: torch.Tensor, task: torch.Tensor, grid: tuple[int, int]) -> Prediction:
        """The traced (exported) form of `_predict`: every image is scored against every task's
        bank and its routed task's result is gathered, so the graph holds no Python branch on
        the routing (a traced loop over the tasks present would fix the tracer's routing).
        Same numbers, T times the search."""
        b, n, d = patches.shape
        all_scores, all_maps = [], []
        for t in range(self.n_tasks):
            index = self.task_index(t)
            dist, idx = index.search(patches.reshape(-1, d), 1)
            patch_scores = dist[:, 0].reshape(b, n)
            nn_idx = idx[:, 0].reshape(b, n)
            all_scores.append(
                reweighted_image_scores(
                    patch_scores, nn_idx, patches, self.task_bank(t), self.num_neighbors, bank_sq=index.bank_sq
                )
            )
            all_maps.append(patch_scores)
        scores = torch.stack(all_scores, 0).gather(0, task[None])[0]
        maps = torch.stack(all_maps, 0).gather(0, task[None, :, None].expand(1, b, n))[0]
        return Prediction(scores=scores, maps=maps.reshape(b, *grid))
