"""Continual-learning metrics: how much a model forgets earlier tasks as it learns new ones.

IM-IAD (FIELD.md section 3) reports, for every metric a (image AUROC, pixel AP, ...), the
Forgetting Measure of Chaudhry et al. (2018):

    FM = 1/(T-1) * sum_{j<T} max_{l<T} (a_{l,j} - a_{T,j})

with tasks numbered 1..T in training order and a_{l,j} the metric on task j's test set after
training on task l. a_{l,j} with l < j (a task not yet seen) is undefined and not used, so
the max runs over l = j..T-1: the best the model ever was on task j before the last task,
minus where it ended. FM > 0 means forgetting; FM can be negative when the final model is
better on every old task than it ever was (backward transfer).

In code the matrix is 0-based: `acc[l][j]`, rows = after training task l, columns = task j.
"""

from __future__ import annotations

import numpy as np

from iadkit.errors import MetricUndefinedError
from iadkit.metrics._inputs import ArrayLike, to_numpy


def _matrix(acc: ArrayLike) -> np.ndarray:
    a = np.asarray(to_numpy(acc), dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(
            f"the continual metric matrix must be square T x T (row l = after training task l, "
            f"column j = evaluated on task j), got shape {a.shape}"
        )
    t = a.shape[0]
    if t < 2:
        raise MetricUndefinedError("forgetting is undefined for fewer than two tasks")
    rows, cols = np.tril_indices(t)  # l >= j: the entries the measure uses
    bad = ~np.isfinite(a[rows, cols])
    if bad.any():
        where = [(int(r), int(c)) for r, c in zip(rows[bad], cols[bad])][:5]
        raise MetricUndefinedError(
            f"the metric matrix has non-finite entries where a task had been seen (l >= j) at {where}; "
            "every task must be evaluated after every training step from its own onwards"
        )
    return a


def forgetting_per_task(acc: ArrayLike) -> np.ndarray:
    """f_j = max_{l in [j, T-2]} (a[l, j] - a[T-1, j]) for each old task j = 0..T-2 (0-based)."""
    a = _matrix(acc)
    t = a.shape[0]
    final = a[t - 1]
    out = np.empty(t - 1, dtype=np.float64)
    for j in range(t - 1):
        out[j] = np.max(a[j : t - 1, j]) - final[j]
    return out


def forgetting_measure(acc: ArrayLike) -> float:
    """FM = mean of `forgetting_per_task` over the T-1 tasks before the last one."""
    return float(np.mean(forgetting_per_task(acc)))


def final_average(acc: ArrayLike) -> float:
    """Mean of the last row: the metric averaged over all tasks after training the last one."""
    a = _matrix(acc)
    return float(np.mean(a[-1]))
