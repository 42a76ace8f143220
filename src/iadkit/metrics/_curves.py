"""Exact ROC-AUC, average precision and F1-max from the sorted scores of the two classes.

Why not sklearn: at pixel level there are tens of millions of scores, and sklearn's curves
sort them with an int64 argsort and build several float64 arrays of the same length (over a
gigabyte for 300 maps of 256x256). Every quantity here is instead derived from two sorted
score arrays - normal and anomalous - with binary searches, in chunks, so the only
full-length allocation is the sorted copy of the normal scores (4 bytes a pixel in float32).
The results are the same numbers sklearn computes (checked in the tests), ties included.

Notation: P positives (anomalous) with scores y, N negatives (normal) with scores x. An
item is flagged anomalous at threshold t when score >= t, as in sklearn's curves. Only
thresholds at distinct score values matter.

- AUROC (sklearn `roc_auc_score`, trapezoid over the ROC points of all distinct thresholds;
  a tie between classes is a diagonal segment, i.e. counts one half):
      AUROC = (#{(x, y): x < y} + 0.5 #{(x, y): x == y}) / (P N)
            = sum_y (#{x < y} + #{x <= y}) / (2 P N),
  summed in int64, so it is exact up to the final division.
- AP (sklearn `average_precision_score`): AP = sum_n (R_n - R_{n-1}) P_n over distinct
  thresholds in decreasing order. Recall changes only at thresholds equal to a positive
  score, by (#positives with that score)/P, so AP = (1/P) sum_y precision(y), where
  precision(y) = TP(>= y) / (TP(>= y) + FP(>= y)): every positive contributes the
  precision of the threshold at its own score.
- F1-max: max over thresholds of 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + P), the same
  value as 2PR/(P+R). The maximum is always attained at a positive's score (lowering the
  threshold to a normal-only score adds false positives and no true positive), so only
  those are searched. Among equal maxima the lowest threshold is returned, as the usual
  `argmax` over sklearn's increasing `precision_recall_curve` thresholds does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iadkit.metrics._inputs import iter_chunks

# Queries are processed in chunks so that temporaries stay a few tens of MB whatever the size.
CHUNK = 1 << 18


@dataclass(frozen=True)
class BinarySummary:
    """Counts and exact metrics of one scored, labelled set; NaN where undefined."""

    n_pos: int
    n_neg: int
    auroc: float
    ap: float
    f1_max: float
    f1_threshold: float


def summarize_sorted(neg: np.ndarray, pos: np.ndarray) -> BinarySummary:
    """Exact metrics from ascending-sorted negative and positive scores of one dtype.

    AUROC is NaN without both classes; AP and F1 are NaN without positives (with positives
    but no negatives they are 1, as sklearn's definitions give). Callers raise on NaN.
    """
    n_pos, n_neg = int(pos.size), int(neg.size)
    nan = float("nan")
    if n_pos == 0:
        return BinarySummary(n_pos, n_neg, nan, nan, nan, nan)
    auc2 = 0  # python int: sum_y (#{x < y} + #{x <= y}), exact
    prec_sum = 0.0
    best_f1, best_thr = -1.0, nan
    for sl in iter_chunks(n_pos, CHUNK):
        q = pos[sl]
        n_lt = np.searchsorted(neg, q, side="left")  # negatives strictly below each positive
        n_le = np.searchsorted(neg, q, side="right")  # negatives at or below
        auc2 += int(n_lt.sum(dtype=np.int64)) + int(n_le.sum(dtype=np.int64))
        tp = n_pos - np.searchsorted(pos, q, side="left")  # positives >= y (ties included)
        fp = n_neg - n_lt  # negatives >= y
        prec_sum += float(np.sum(tp / (tp + fp)))
        f1 = (2.0 * tp) / (tp + fp + n_pos)
        i = int(np.argmax(f1))  # first maximum = lowest threshold in this ascending chunk
        if f1[i] > best_f1:  # strict: an earlier (lower) threshold keeps a tie
            best_f1, best_thr = float(f1[i]), float(q[i])
    auroc = auc2 / (2.0 * n_pos * n_neg) if n_neg else nan
    return BinarySummary(n_pos, n_neg, auroc, prec_sum / n_pos, best_f1, best_thr)
