"""Operating points: turning scores into verdicts.

Two ways a production line sets its threshold:
- **False-alarm rate from good images only** (the common case: no defects at hand). The
  threshold is chosen on held-out good images so that at most `target_fpr` of them would be
  flagged. A verdict is `score > threshold`.
- **F1-optimal with labelled defects**, when a labelled validation set exists.
Both are stored with the model and can be overridden at predict time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from iadkit.errors import InvalidParameterError, MetricUndefinedError


@dataclass(frozen=True)
class Threshold:
    value: float
    rule: str  # "false_alarm_rate" | "f1_optimal" | "manual"
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "rule": self.rule, "details": self.details}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Threshold:
        return cls(value=float(d["value"]), rule=str(d["rule"]), details=dict(d.get("details", {})))


def false_alarm_threshold(good_scores: np.ndarray, target_fpr: float = 0.01) -> Threshold:
    """The smallest threshold t among the good scores with mean(good_scores > t) <= target_fpr.

    With n good scores at most floor(target_fpr * n) of them may lie above t, so t is the
    (n - floor(target_fpr * n))-th smallest score. When target_fpr * n < 1 this is the
    largest good score: no calibration image is flagged, and the achievable false-alarm
    rate is only known to be below about 1/n (reported in `details`).
    """
    s = np.sort(np.asarray(good_scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise MetricUndefinedError("no good images to calibrate the threshold on")
    if not np.isfinite(s).all():
        raise MetricUndefinedError("calibration scores contain NaN or infinity")
    if not 0.0 <= target_fpr < 1.0:
        raise InvalidParameterError(f"target_fpr must be in [0, 1), got {target_fpr}")
    n = s.size
    allowed = math.floor(target_fpr * n + 1e-9)
    t = float(s[n - 1 - allowed])
    achieved = float((s > t).mean())
    return Threshold(
        value=t,
        rule="false_alarm_rate",
        details={"target_fpr": target_fpr, "calibration_fpr": achieved, "n_good": int(n), "resolution": 1.0 / n},
    )


def resolution_note(threshold: Threshold) -> str | None:
    """Why a false-alarm threshold cannot honour its target, or None when it can.

    With n good calibration images the measurable false-alarm rates are multiples of 1/n;
    a target below 1/n (including 0) cannot be told apart from 0: the threshold is then the
    highest calibration score, and about 1/(n + 1) of new good parts score above it
    (the expected rank of a new exchangeable score among n).
    """
    d = threshold.details
    if threshold.rule != "false_alarm_rate" or "n_good" not in d:
        return None
    n, target = int(d["n_good"]), float(d["target_fpr"])
    if target * n >= 1 - 1e-9:
        return None
    return (
        f"the threshold was set from {n} good image(s): they resolve false-alarm rates in steps of "
        f"1/{n} = {1 / n:.3g}, coarser than the target {target:g}; it is the highest calibration score, "
        f"and about {1 / (n + 1):.2g} of new good parts may score above it. To honour the target, "
        f"calibrate on at least {math.ceil(1 / target) if target > 0 else 'many'} good images "
        "(more training images, a larger calibration fraction, or calibration= images)"
    )


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> Threshold:
    """The threshold maximising F1 of `score >= t` for label 1 = anomalous.

    Candidate thresholds are the distinct scores. The verdict rule `score > threshold` used at
    predict time is matched by storing the midpoint between the optimal score and the next
    lower distinct score.
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape} vs {s.shape}")
    n_pos = int((y == 1).sum())
    if n_pos == 0 or n_pos == y.size:
        raise MetricUndefinedError("F1-optimal threshold needs both good and anomalous images")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted == 1)
    fp = np.cumsum(y_sorted != 1)
    # Only the last position of each run of equal scores is a valid cut.
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp, fp, cut_scores = tp[last], fp[last], s_sorted[last]
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / n_pos
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    best = int(np.argmax(f1))
    lower = cut_scores[best + 1] if best + 1 < cut_scores.size else cut_scores[best] - 1.0
    value = float((cut_scores[best] + lower) / 2.0)
    return Threshold(
        value=value,
        rule="f1_optimal",
        details={"f1": float(f1[best]), "precision": float(precision[best]), "recall": float(recall[best])},
    )


def manual_threshold(value: float) -> Threshold:
    """A threshold the user chose. Must be a finite number: a NaN threshold would call every
    image good (no comparison with NaN is true), the worst silent failure an inspection has."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"threshold must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise InvalidParameterError(f"threshold must be a finite number, got {value!r}")
    return Threshold(value=v, rule="manual", details={})
