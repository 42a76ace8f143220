"""The field's evaluation metrics, computed exactly (definitions: FIELD.md section 3).

- image level (`image.py`): AUROC, AP, F1-max (+ its threshold) of one score per image;
- pixel level (`pixel.py`): AUROC, AP, F1-max over all test pixels pooled, good images
  included - exact, with one sort of the pixels and no float64 copies;
- AUPRO (`aupro.py`): exact over every threshold (key ``aupro``), or IM-IAD's
  100-threshold procedure (key ``aupro_100``) for comparison with published tables;
- sPRO (`spro.py`): MVTec LOCO's saturated per-region overlap, AUC-sPRO exact over every
  threshold, overall and per anomaly type; per-type image AUROC (`image_auroc_by_type`);
- continual (`continual.py`): forgetting measure;
- efficiency (`efficiency.py`): time per image, peak host / CUDA memory.

Labels: 1 = anomalous, 0 = good; a higher score is more anomalous; thresholds flag
``score >= threshold``. Undefined metrics (one class only, no defect pixels, NaN scores)
raise `iadkit.errors.MetricUndefinedError`; malformed inputs raise ValueError.
"""

from __future__ import annotations

from iadkit.metrics._inputs import ArrayLike
from iadkit.metrics.aupro import (
    AUPRO_VARIANTS,
    aupro,
    aupro_exact,
    aupro_thresholds,
    pro_curve_thresholds,
    trapezoid_to,
)
from iadkit.metrics.continual import final_average, forgetting_measure, forgetting_per_task
from iadkit.metrics.efficiency import (
    PeakMemory,
    Timer,
    TimingResult,
    current_rss_mb,
    measure_time_per_image,
    peak_rss_mb,
    time_per_image,
)
from iadkit.metrics.image import (
    F1Max,
    image_ap,
    image_auroc,
    image_auroc_by_type,
    image_f1_max,
    image_metrics,
)
from iadkit.metrics.pixel import PixelScores, pixel_ap, pixel_auroc, pixel_f1_max, pixel_metrics
from iadkit.metrics.spro import (
    DEFAULT_SPRO_FPR_LIMIT,
    LOCO_FPR_LIMITS,
    SaturatedRegion,
    auc_spro,
    auc_spro_by_type,
    auc_spro_limits,
    saturation_area,
    spro_curve_at,
    spro_metrics,
    spro_scores,
)

IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1_max", "image_f1_threshold")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_f1_threshold")


def compute_all(
    labels: ArrayLike,
    scores: ArrayLike,
    masks: ArrayLike | None = None,
    maps: ArrayLike | None = None,
    aupro_variant: str = "exact",
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All metrics of one test set as plain floats, under stable keys.

    labels [N] (0/1), scores [N]; masks and maps [N,H,W] (or lists of [H,W]; numpy or torch).
    Always: image_auroc, image_ap, image_f1_max, image_f1_threshold. When masks are given
    (maps then required): pixel_auroc, pixel_ap, pixel_f1_max, pixel_f1_threshold, plus
    ``aupro`` (aupro_variant="exact"), ``aupro_100`` ("100"), both ("both") or none
    ("none"). Without masks the pixel keys are absent, not NaN, so a missing metric can
    never be averaged or plotted by mistake; maps without masks are ignored.
    Raises MetricUndefinedError when a requested metric is undefined (e.g. an all-good test
    set); the message says why.
    """
    if aupro_variant not in AUPRO_VARIANTS:
        raise ValueError(f"aupro_variant must be one of {AUPRO_VARIANTS}, got {aupro_variant!r}")
    out = image_metrics(labels, scores)
    if masks is not None:
        if maps is None:
            raise ValueError("masks were given without anomaly maps: pass maps=... for pixel metrics")
        out.update(pixel_metrics(maps, masks, aupro_variant=aupro_variant, fpr_limit=fpr_limit))
    return {k: float(v) for k, v in out.items()}


__all__ = [
    "AUPRO_VARIANTS",
    "DEFAULT_SPRO_FPR_LIMIT",
    "IMAGE_KEYS",
    "LOCO_FPR_LIMITS",
    "PIXEL_KEYS",
    "F1Max",
    "PeakMemory",
    "PixelScores",
    "SaturatedRegion",
    "Timer",
    "TimingResult",
    "auc_spro",
    "auc_spro_by_type",
    "auc_spro_limits",
    "aupro",
    "aupro_exact",
    "aupro_thresholds",
    "compute_all",
    "current_rss_mb",
    "final_average",
    "forgetting_measure",
    "forgetting_per_task",
    "image_ap",
    "image_auroc",
    "image_auroc_by_type",
    "image_f1_max",
    "image_metrics",
    "measure_time_per_image",
    "peak_rss_mb",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1_max",
    "pixel_metrics",
    "pro_curve_thresholds",
    "saturation_area",
    "spro_curve_at",
    "spro_metrics",
    "spro_scores",
    "time_per_image",
    "trapezoid_to",
]
