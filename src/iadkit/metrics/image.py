"""Image-level metrics: AUROC, AP and F1-max of one score per test image.

Definitions (FIELD.md section 3, IM-IAD's `cal_metric.py`): label 1 = anomalous, 0 = good;
a higher score means more anomalous; AUROC is sklearn's `roc_auc_score`, AP sklearn's
`average_precision_score` (AP = sum_n (R_n - R_{n-1}) P_n, no interpolation); F1-max is the
best F1 over all thresholds, an image being flagged when its score >= the threshold. The
exact computation is in `_curves.py`; these functions validate inputs and name the problem
when a metric is undefined (e.g. a test set with good images only), where sklearn would
raise a bare ValueError or return a warning-laden 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from iadkit.errors import MetricUndefinedError
from iadkit.metrics._curves import BinarySummary, summarize_sorted
from iadkit.metrics._inputs import ArrayLike, image_inputs


class F1Max(NamedTuple):
    """The best F1 and the threshold attaining it (flag anomalous when score >= threshold)."""

    f1: float
    threshold: float


def summarize(labels: ArrayLike, scores: ArrayLike) -> BinarySummary:
    """All image-level numbers at once (one sort); NaN fields where undefined."""
    y, s = image_inputs(labels, scores)
    neg = np.sort(s[~y])
    pos = np.sort(s[y])
    return summarize_sorted(neg, pos)


def require_defined(summary: BinarySummary, metric: str, level: str) -> None:
    """Raise MetricUndefinedError when `metric` cannot be computed from these classes."""
    unit = "images" if level == "image" else "pixels"
    if summary.n_pos == 0:
        raise MetricUndefinedError(
            f"{level} {metric} is undefined: there are no anomalous {unit} (label 1) among "
            f"{summary.n_neg} {unit}; evaluate on a test set that contains anomalies"
        )
    if metric == "AUROC" and summary.n_neg == 0:
        raise MetricUndefinedError(
            f"{level} AUROC is undefined: all {summary.n_pos} {unit} are anomalous (label 1); "
            f"it needs good {unit} (label 0) too"
        )


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve; ties between a good and an anomalous image count one half."""
    summary = summarize(labels, scores)
    require_defined(summary, "AUROC", "image")
    return summary.auroc


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision, sum_n (R_n - R_{n-1}) P_n over thresholds in decreasing order."""
    summary = summarize(labels, scores)
    require_defined(summary, "AP", "image")
    return summary.ap


def image_f1_max(labels: ArrayLike, scores: ArrayLike) -> F1Max:
    """Best F1 over thresholds, and the lowest threshold attaining it (score >= threshold)."""
    summary = summarize(labels, scores)
    require_defined(summary, "F1-max", "image")
    return F1Max(summary.f1_max, summary.f1_threshold)


def image_metrics(labels: ArrayLike, scores: ArrayLike) -> dict[str, float]:
    """image_auroc, image_ap, image_f1_max, image_f1_threshold; raises if any is undefined."""
    summary = summarize(labels, scores)
    require_defined(summary, "AUROC", "image")
    return {
        "image_auroc": summary.auroc,
        "image_ap": summary.ap,
        "image_f1_max": summary.f1_max,
        "image_f1_threshold": summary.f1_threshold,
    }


def image_auroc_by_type(
    labels: ArrayLike, scores: ArrayLike, defect_types: Sequence[str], *, good_type: str = "good"
) -> dict[str, float]:
    """Image AUROC of each anomaly type against the good images, and their mean.

    MVTec LOCO reports classification AUROC separately for structural and logical anomalies
    (the official ``get_image_level_detection_metrics_aggregated``: good test images vs the
    images of one type) and their mean; IM-IAD's LOCO table has the same three columns.

    Parameters
    ----------
    labels
        0 (good) / 1 (anomalous) per image.
    scores
        One anomaly score per image (higher = more anomalous).
    defect_types
        The type of each image, e.g. ``Sample.defect_type``; good images must carry
        `good_type`, anomalous ones any other name.
    good_type
        The type name of good images.

    Returns
    -------
    dict
        ``{type: AUROC}`` for every anomalous type (sorted), plus ``"mean"``: the unweighted
        mean over the types (LOCO's 0.5 * (structural + logical)).

    Raises
    ------
    ValueError
        A label contradicts its type (a good image with a defect type or the reverse).
    MetricUndefinedError
        No good image, or no anomalous image.
    """
    y, s = image_inputs(labels, scores)
    types = list(defect_types)
    if len(types) != y.size:
        raise ValueError(f"got {len(types)} defect types for {y.size} images; pass one per image")
    is_good_type = np.array([t == good_type for t in types], dtype=bool)
    bad = np.flatnonzero(is_good_type == y)[:5]
    if bad.size:
        raise ValueError(
            f"labels and defect types disagree at images {bad.tolist()}: good images (label 0) must have type "
            f"{good_type!r} and anomalous ones (label 1) another type"
        )
    neg = np.sort(s[~y])
    if neg.size == 0:
        raise MetricUndefinedError("per-type image AUROC is undefined: there is no good image to compare with")
    out: dict[str, float] = {}
    for kind in sorted(set(types) - {good_type}):
        pos = np.sort(s[np.array([t == kind for t in types])])
        out[kind] = float(summarize_sorted(neg, pos).auroc)
    if not out:
        raise MetricUndefinedError("per-type image AUROC is undefined: there is no anomalous image")
    out["mean"] = float(np.mean(list(out.values())))
    return out
