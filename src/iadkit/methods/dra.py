"""DRA — disentangled representations of abnormalities: seen, pseudo and latent-residual heads.

Paper: C. Ding, G. Pang, C. Shen, "Catching Both Gray and Black Swans: Open-set Supervised
Anomaly Detection", CVPR 2022 (arXiv:2203.14506); code: github.com/Choubo/DRA (also in
open-iad, arch/dra.py and models/dra/).

Setting: semi-supervised, like DevNet (whose backbone, balanced batches, deviation loss and
schedule it shares: `methods.devnet.DeviationNetwork`). The few labelled defects illustrate
some anomaly classes ("gray swans"); DRA also wants to catch unseen ones ("black swans"), so it
learns four heads on one shared, fine-tuned feature map (paper §3.2):

- **seen-abnormality head** g_s: top-K MIL scorer (`components.deviation.PlainHead`) trained on
  normal images (target 0) and the labelled defects (target 1);
- **pseudo-abnormality head** g_p: the same scorer, separate weights, trained on normal images
  and pseudo anomalies made from normal images (target 1). The paper's Eq. 4 (called CutMix
  there) pastes a colour-jittered rectangle of the image at a translated place — what CutPaste
  does, so `components.synthesis.cutpaste` makes them (area 2-15 %, aspect 0.3-3.3, jitter 0.1);
  each normal image of a batch becomes one with probability 1/2 (the code's ``rnd == 0``);
- **latent-residual head** g_r (`CompositeHead`): scores ``M_r - M_x``, the difference between
  the mean feature map M_r of `n_reference` normal reference images and the image's map, after
  a 3x3 conv-BN-ReLU; target 1 for seen and pseudo anomalies;
- **normality head** g_n (`HolisticHead`): an MLP on the average-pooled map; in the code its
  target is 1 for *normal* images (``target == 0``) and 0 for anomalies, so it learns a
  normality score.

Training loss: the sum of the four heads' deviation losses (each a batch mean). Every head is
computed at `n_scales` image scales and averaged. Anomaly score (paper §3.2, code's
``prediction``): ``g_s + g_p + g_r - g_n``. The reference images are drawn once (seeded) from
the normal training images; M_r is computed with the network in its current state, during
training and after it (the code feeds them through the network with every batch).

Map: DRA reports image scores only. For inspection we return the sum of the three abnormality
heads' position scores at full scale (|conv1x1| maps, feature resolution), upsampled and
smoothed by the model; the image score is the formula above, not the map maximum.

paper -> reference code -> ours:

=============================  ======================================  =====================================
paper                          reference code                          ours
=============================  ======================================  =====================================
ResNet-18, fine-tuned          ResNet-18 conv1..layer4, all trained    Lite0: blocks.5-6 fine-tuned on frozen
                                                                       earlier stages, BN statistics frozen
                                                                       (see DevNet)
4 heads, deviation loss        Holistic/Plain/Plain/Composite heads,   same heads and targets
                               targets as above
top-K 10 %, 2 scales           topk 0.1, n_scales 2                    ``topk`` 0.1, ``n_scales`` 2
pseudo anomalies: CutMix       CutMix on a random normal image,        `cutpaste` on the normal image itself,
(Eq. 4)                        p = 1/2, before RandomRotation(180)     p = ``pseudo_probability`` 0.5, then
                                                                       the rotation
N_r = 5 reference images,      5 reference images per batch from a     ``n_reference`` 5 fixed normal images,
M_r fixed                      reference loader (test: also)           M_r from the current network
30 epochs x 20 iterations,     open-iad: lr 2e-4, wd 1e-5, StepLR      ``epochs`` 10 (CPU-sized), 20 steps,
batch 48, Adam lr 1e-3,        (10, 0.1), grad-norm clip 1            batch 48, Adam ``lr`` 2e-4,
weight decay 1e-2                                                      ``weight_decay`` 1e-5, as the code
score: g_s + g_p + g_r - g_n   same (class_pred[0] negated)            same
=============================  ======================================  =====================================

The paper's configuration: ``Model.create("dra", paper=True, weights_path=<resnet18 file>)`` —
ResNet-18 fine-tuned from its stem, 30 epochs, Adam lr 1e-3 and weight decay 1e-2 as the paper
states, 448 px (the code's img_size).
"""

from __future__ import annotations

import torch

from iadkit.components.deviation import CompositeHead, HolisticHead, PlainHead
from iadkit.components.synthesis import cutpaste
from iadkit.data.transforms import ImageSet
from iadkit.errors import TrainingDataError
from iadkit.methods.base import register
from iadkit.methods.devnet import DeviationNetwork
from iadkit.methods.params import Interval, at_least, param
from iadkit.types import Prediction

SEEN, PSEUDO = 1, 2  # batch labels: 0 normal, 1 labelled defect, 2 pseudo anomaly


@register
class DRA(DeviationNetwork):
    """Seen, pseudo and latent-residual abnormality heads plus a normality head on one network (Ding et al. 2022)."""

    name = "dra"
    family = "few-shot supervised"
    paper = "Ding et al., Catching Both Gray and Black Swans: Open-set Supervised Anomaly Detection, CVPR 2022"
    smoke_params = {"epochs": 2, "steps_per_epoch": 4, "batch_size": 8, "lr": 1e-3, "n_reference": 2}
    paper_params = {
        "backbone": "resnet18",
        "layer": "layer4",
        "finetune_from": "stem",
        "epochs": 30,
        "lr": 1e-3,
        "weight_decay": 1e-2,
    }
    paper_image_size = 448  # the code's default img_size

    n_reference: int = param(
        5, "Normal reference images whose mean map the residual head compares with (paper: 5).", check=at_least(1)
    )
    pseudo_probability: float = param(
        0.5, "Chance that a normal image of a batch is turned into a pseudo anomaly (code: 1/2).", check=Interval(0, 1)
    )

    def _build_heads(self, channels: int) -> None:
        self.normal_head_ = HolisticHead(channels)
        self.seen_head_ = PlainHead(channels, self.topk)
        self.pseudo_head_ = PlainHead(channels, self.topk)
        self.residual_head_ = CompositeHead(channels, self.topk)
        # The reference normal images (normalised, at the training size); M_r is recomputed
        # from them with the current network, per input size.
        self.register_buffer("reference_images_", torch.empty(0))
        self._reference_maps: dict[tuple, list[torch.Tensor]] = {}

    def _after_load(self) -> None:
        self._reference_maps = {}

    # -- the four heads ---------------------------------------------------------------------------
    def heads(
        self, frozen: list[torch.Tensor], references: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Scores of the four heads, each averaged over scales, and the abnormality map at full scale.

        `frozen` and `references` hold, per scale, the frozen stages' output for the batch and
        for the reference images. In training (`labels` given) the seen head sees only normal
        images and labelled defects, the pseudo head only normal images and pseudo anomalies.
        """
        out: dict[str, list[torch.Tensor]] = {"normal": [], "seen": [], "pseudo": [], "residual": []}
        full_map = None
        for f_in, r_in in zip(frozen, references):
            f = self.trunk_(f_in)
            m_r = self.trunk_(r_in).mean(0)
            seen_rows = slice(None) if labels is None else labels != PSEUDO
            pseudo_rows = slice(None) if labels is None else labels != SEEN
            s_seen, map_seen = self.seen_head_(f[seen_rows])
            s_pseudo, map_pseudo = self.pseudo_head_(f[pseudo_rows])
            s_res, map_res = self.residual_head_(f, m_r)
            out["normal"].append(self.normal_head_(f))
            out["seen"].append(s_seen)
            out["pseudo"].append(s_pseudo)
            out["residual"].append(s_res)
            if full_map is None and labels is None:
                full_map = map_seen + map_pseudo + map_res
        scores = {k: torch.stack(v, 1).mean(1) for k, v in out.items()}
        return scores, (full_map if full_map is not None else torch.empty(0))

    @staticmethod
    def anomaly_score(scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """The paper's score: seen + pseudo + residual abnormality minus normality."""
        return scores["seen"] + scores["pseudo"] + scores["residual"] - scores["normal"]

    # -- training ----------------------------------------------------------------------------------
    def _prepare_training(self, train: ImageSet, normal: list[int], gen: torch.Generator) -> None:
        if len(normal) < 1:
            raise TrainingDataError("DRA needs normal training images for its reference set")
        pick = torch.randperm(len(normal), generator=gen)[: self.n_reference]
        self.reference_images_ = torch.stack([train.image(normal[int(i)]) for i in pick]).to(self.device)
        self._reference_maps = {}
        self._training_references = self.frozen_scales(self.reference_images_)  # never augmented

    def _augment(
        self, pixels: torch.Tensor, labels: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pseudo anomalies from normal images (CutPaste, probability `pseudo_probability`), then
        DevNet's rotation."""
        pixels, labels = pixels.clone(), labels.clone()
        changed = torch.zeros(pixels.shape[0], dtype=torch.bool)
        for j in range(pixels.shape[0]):
            if int(labels[j]) == 0 and float(torch.rand((), generator=gen)) < self.pseudo_probability:
                pixels[j] = cutpaste(pixels[j], generator=gen)[0]
                labels[j] = PSEUDO
                changed[j] = True
        rotated, labels, turned = super()._augment(pixels, labels, gen)
        return rotated, labels, changed | turned

    def _batch_loss(self, frozen: list[torch.Tensor], labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        scores, _ = self.heads(frozen, self._training_references, labels)
        targets = {
            "normal": labels == 0,
            "seen": labels[labels != PSEUDO] != 0,
            "pseudo": labels[labels != SEEN] != 0,
            "residual": labels != 0,
        }
        return sum(self.deviation(scores[k], targets[k], gen) for k in scores)  # type: ignore[return-value]

    def _finish_training(self, train: ImageSet) -> None:
        self._reference_maps = {}
        del self._training_references

    # -- inference ----------------------------------------------------------------------------------
    def reference_frozen(self, size: tuple[int, int]) -> list[torch.Tensor]:
        """The reference images' frozen-stage outputs at each scale, for inputs of `size` (cached)."""
        key = (size, self.reference_images_.device)
        if key not in self._reference_maps:
            refs = self.reference_images_
            if tuple(refs.shape[-2:]) != size:
                refs = torch.nn.functional.interpolate(refs, size=size, mode="bilinear", align_corners=False)
            self._reference_maps[key] = self.frozen_scales(refs)
        return self._reference_maps[key]

    def _predict(self, images: torch.Tensor) -> Prediction:
        x = images.to(self.device)
        scores, maps = self.heads(self.frozen_scales(x), self.reference_frozen((int(x.shape[-2]), int(x.shape[-1]))))
        return Prediction(scores=self.anomaly_score(scores).to(images.device), maps=maps.to(images.device))


__all__ = ["DRA"]
