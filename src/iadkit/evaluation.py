"""Run a model over a test set: per-image scores, maps, the field's metrics and timings.

Time per image follows the IM-IAD definition: wall time of the whole prediction loop over
the test set (decoding, preprocessing, the model and its post-processing) divided by the
number of images. The model-only share is reported beside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from iadkit.data.transforms import ImageSet
from iadkit.metrics import compute_all
from iadkit.metrics.efficiency import PeakMemory
from iadkit.model import Model
from iadkit.types import Sample


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
