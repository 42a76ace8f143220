"""Run a model over a test set: per-image scores, maps, the field's metrics and timings.

Time per image follows the IM-IAD definition: wall time of the whole prediction loop over
the test set (decoding, preprocessing, the model and its post-processing) divided by the
number of images. The model-only share is reported beside it.

MVTec LOCO (test samples are `LocoSample`s, e.g. from ``load_dataset`` on a LOCO folder or
the synthetic generator's ``layout="loco"``): `loco_metrics` adds the image AUROC of each
anomaly kind against the good images (``image_auroc_logical``, ``image_auroc_structural``
and their mean ``image_auroc_loco_mean``) and AUC-sPRO at LOCO's integration limits
(``auc_spro_0.05`` etc.: the mean over the kinds, as LOCO reports it; ``auc_spro_0.05_logical``
etc. per kind). As the official evaluation does, the maps are resized (bilinear) to each
image's native size, where the absolute saturation thresholds of ``defects_config.json`` are
defined; a centre crop's maps are placed back in their window of the image (the rest scores
the map's minimum). When the native pixels of the whole test set exceed `SPRO_MAX_PIXELS`,
maps and regions are scaled down together by one factor (regions by "any pixel", absolute
saturation areas by the area ratio) and ``spro_scale`` (1 = native) says by how much.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from iadkit.data.transforms import ImageSet, Preprocess
from iadkit.errors import InvalidParameterError
from iadkit.metrics import compute_all
from iadkit.metrics.efficiency import PeakMemory
from iadkit.model import Model
from iadkit.types import Sample

# sPRO sorts every test pixel at native resolution (MVTec LOCO's test set: ~3e9 pixels); above
# this many (~0.5 GB per float32 copy) maps and masks are scaled down together.
SPRO_MAX_PIXELS = 2**27


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    paths: list[str]
    labels: np.ndarray
    scores: np.ndarray
    defect_types: list[str]
    maps: np.ndarray | None = None  # [N, H, W] when kept
    masks: np.ndarray | None = None  # [N, H, W] bool when the set has masks and maps were kept
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {**self.metrics, **self.timings, "n_images": len(self.paths)}


def evaluate(
    model: Model,
    test: Sequence[Sample] | ImageSet,
    *,
    batch_size: int = 16,
    pixel_metrics: bool | None = None,
    keep_maps: bool = False,
    progress: bool = False,
) -> EvaluationResult:
    """Score every test image and compute image metrics, plus pixel metrics where masks exist.

    `pixel_metrics=None` means: when every anomalous image has a ground-truth mask. A
    transductive method (``detector.transductive``) is given the whole set as one batch,
    whatever `batch_size` says.
    """
    if getattr(model, "tiling", None) is not None:
        raise InvalidParameterError(
            "evaluate does not tile yet, and this model was fitted on tiles (scoring whole resized images would "
            "measure something else): score the test images with model.predict(test) (tiled) and compute "
            "image metrics from result.scores with iadkit.metrics"
        )
    dataset = test if isinstance(test, ImageSet) else ImageSet(list(test), model.preprocess, cache=False)
    samples = dataset.samples
    if pixel_metrics is None:
        pixel_metrics = dataset.has_all_masks() and any(s.label == 1 for s in samples)
    if model.detector.transductive:
        # Scores relative to the other images (MuSc): the whole test set is one batch, and
        # the time per image then grows with the size of the set.
        batch_size = max(1, len(samples))
    need_maps = pixel_metrics or keep_maps
    scores, maps, masks = [], [], []
    model_seconds = 0.0
    batches = dataset.batches(batch_size, with_masks=pixel_metrics)
    if progress:
        from iadkit.progress import track

        batches = track(batches, total=dataset.num_batches(batch_size), description="evaluate")
    with PeakMemory() as memory:
        start = time.perf_counter()
        for batch in batches:
            t0 = time.perf_counter()
            pred = model.predict_tensor(batch.images)
            model_seconds += time.perf_counter() - t0
            assert pred.scores is not None  # predict_tensor always sets them
            scores.append(pred.scores.numpy())
            if need_maps and pred.maps is not None:
                maps.append(pred.maps.numpy().astype(np.float32))
            if batch.masks is not None:
                masks.append(batch.masks.numpy())
        total_seconds = time.perf_counter() - start
    n = max(len(samples), 1)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    score_arr = np.concatenate(scores) if scores else np.zeros(0)
    map_arr = np.concatenate(maps) if maps else None
    mask_arr = np.concatenate(masks) if masks else None
    # A method may score images without drawing maps (e.g. image-level CutPaste): then only
    # image metrics exist.
    with_pixels = pixel_metrics and map_arr is not None
    metrics = compute_all(
        labels,
        score_arr,
        masks=mask_arr if with_pixels else None,
        maps=map_arr if with_pixels else None,
    )
    if _is_loco(samples):
        metrics.update(loco_metrics(samples, labels, score_arr, map_arr if with_pixels else None, model.preprocess))
    timings = {
        "seconds_per_image": total_seconds / n,
        "model_seconds_per_image": model_seconds / n,
        "images_per_second": n / total_seconds if total_seconds > 0 else float("inf"),
        "peak_rss_mb": memory.peak_rss_mb,
    }
    if torch.cuda.is_available() and model.detector.device.type == "cuda":
        timings["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return EvaluationResult(
        metrics=metrics,
        paths=[s.path for s in samples],
        labels=labels,
        scores=score_arr,
        defect_types=[s.defect_type for s in samples],
        maps=map_arr if keep_maps else None,
        masks=mask_arr if keep_maps else None,
        timings=timings,
    )


def _is_loco(samples: Sequence[Sample]) -> bool:
    from iadkit.data.loco import LocoSample

    return bool(samples) and all(isinstance(s, LocoSample) for s in samples) and len({s.label for s in samples}) == 2


def _kind_key(kind: str) -> str:
    """'logical_anomalies' -> 'logical' (LOCO's folder names, shortened for metric keys)."""
    return kind.removesuffix("_anomalies")


def _native_shape(sample: Sample) -> tuple[int, int]:
    if sample.image is not None:
        return int(sample.image.shape[0]), int(sample.image.shape[1])
    from iadkit.data.io import image_shape

    return image_shape(sample.path)


def map_to_native(amap: np.ndarray, shape: tuple[int, int], preprocess: Preprocess) -> np.ndarray:
    """An input-size anomaly map [h, w] -> the image's native `shape` (bilinear); with a centre
    crop the map fills the crop's window and the rest gets the map's minimum."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    h, w = shape
    if preprocess.crop_size is None:
        return torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    (ih, iw), (ch, cw) = preprocess.image_size, preprocess.crop_size
    top, left = (ih - ch) // 2, (iw - cw) // 2
    y0, y1 = round(top * h / ih), round((top + ch) * h / ih)
    x0, x1 = round(left * w / iw), round((left + cw) * w / iw)
    out = np.full((h, w), float(amap.min()), dtype=np.float32)
    if y1 > y0 and x1 > x0:
        window = torch.nn.functional.interpolate(t, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
        out[y0:y1, x0:x1] = window[0, 0].numpy()
    return out


def _shrink_region(region: Any, shape: tuple[int, int]) -> Any:
    """A region at a lower resolution: a pixel is in it when any pixel it covers was (never
    empties a region); the saturation area scales with the area."""
    from iadkit.metrics.spro import SaturatedRegion

    m = torch.from_numpy(np.ascontiguousarray(region.mask, dtype=np.float32))[None, None]
    small = torch.nn.functional.adaptive_max_pool2d(m, shape)[0, 0].numpy() > 0
    ratio = (shape[0] * shape[1]) / float(region.mask.size)
    sat = min(int(small.sum()), max(1, round(region.saturation_area * ratio)))
    return SaturatedRegion(small, sat, region.name)


def loco_metrics(
    samples: Sequence[Sample],
    labels: np.ndarray,
    scores: np.ndarray,
    maps: np.ndarray | None,
    preprocess: Preprocess,
    *,
    max_pixels: int = SPRO_MAX_PIXELS,
) -> dict[str, float]:
    """MVTec LOCO's numbers for a test set of `LocoSample`s (see the module docstring).

    Parameters
    ----------
    samples, labels, scores
        The test images, their labels and image scores.
    maps
        Anomaly maps at the model's input size [N, h, w]; None: image AUROC per kind only.
    preprocess
        The model's preprocessing (its crop places the maps in the native image).
    max_pixels
        Native pixels of the whole test set above which maps and regions are scaled down.
    """
    from iadkit.metrics.image import image_auroc_by_type
    from iadkit.metrics.spro import LOCO_FPR_LIMITS, auc_spro_by_type

    types = [s.defect_type for s in samples]
    out: dict[str, float] = {}
    for kind, value in image_auroc_by_type(labels, scores, types).items():
        out["image_auroc_loco_mean" if kind == "mean" else f"image_auroc_{_kind_key(kind)}"] = float(value)
    if maps is None:
        return out
    shapes = [_native_shape(s) for s in samples]
    total = sum(h * w for h, w in shapes)
    scale = min(1.0, math.sqrt(max_pixels / total)) if total else 1.0
    native_maps, regions = [], []
    for s, amap, (h, w) in zip(samples, maps, shapes):
        target = (max(1, round(h * scale)), max(1, round(w * scale))) if scale < 1 else (h, w)
        regs = s.load_regions((h, w))  # type: ignore[attr-defined]
        if scale < 1:
            regs = [_shrink_region(r, target) for r in regs]
        regions.append(regs)
        native_maps.append(map_to_native(amap, target, preprocess))
    per_kind = auc_spro_by_type(native_maps, regions, types, fpr_limits=LOCO_FPR_LIMITS)
    for kind, values in per_kind.items():
        suffix = "" if kind == "mean" else f"_{_kind_key(kind)}"
        for limit, value in values.items():
            out[f"auc_spro_{limit:g}{suffix}"] = float(value)
    out["spro_scale"] = float(scale)
    return out
