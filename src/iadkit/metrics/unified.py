"""One number for a multi-class (unified) model: ADer's mAD.

ADer (Zhang et al., "ADer: A Comprehensive Benchmark for Multi-class Visual Anomaly
Detection", 2024) summarises a method by mAD, the plain mean of seven metrics, each first
averaged over the categories: I-AUROC, I-AP, I-F1max, P-AUROC, P-AP, P-F1max and AUPRO
(here under iadkit's keys ``image_auroc`` ... ``aupro``). mAD is defined only when all seven
are: an image-level method (no maps) or a dataset without masks has none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from iadkit.errors import MetricUndefinedError

MAD_METRICS: tuple[str, ...] = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
)


def mad(metrics: Mapping[str, float]) -> float:
    """The mean of the seven `MAD_METRICS` in `metrics` (category means already taken).

    Raises `MetricUndefinedError` naming the metrics that are missing or not finite.
    """
    missing = [k for k in MAD_METRICS if k not in metrics or metrics[k] is None or not math.isfinite(float(metrics[k]))]
    if missing:
        raise MetricUndefinedError(
            f"mAD needs all seven metrics ({', '.join(MAD_METRICS)}); missing or undefined: {', '.join(missing)} "
            "(pixel metrics need anomaly maps and ground-truth masks)"
        )
    return float(sum(float(metrics[k]) for k in MAD_METRICS) / len(MAD_METRICS))


__all__ = ["MAD_METRICS", "mad"]
