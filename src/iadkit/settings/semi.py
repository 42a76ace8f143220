"""The semi-supervised setting: an engineer has labelled a handful of real defects.

paper -> reference code -> ours
-------------------------------
- IM-IAD: k labelled anomalies (k = 1, 2, 4, 5, 8, 10 in the result tables) taken from the
  test split into training -> ``data_io/semi.py``: per task, ``anomaly_num = k`` cut to
  ``int(n_test_anomalies * upper_ratio)``, drawn with ``random.sample``, removed from the test
  set (``anomaly_overlap = False``); run with ``upper_ratio = 0.75`` -> the same counts per
  category (int() truncation included), drawn with a generator seeded by (seed, category);
  the moved images keep label 1 and their masks; the test set keeps its order. A k above the
  cap moves the cap (as in the reference).
- The dataset's own labelled training defects (if any) are dropped, so that k means k.
- A method that cannot use labels trains on the good images only (`check_combination` says
  so once; the benchmark and `Model.fit` drop the labelled ones for it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from iadkit.settings import register_setting
from iadkit.settings._common import (
    UPPER_RATIO,
    anomalies_by_category,
    capped_anomaly_count,
    category_rng,
    check_fraction,
    check_int,
    draw,
)
from iadkit.types import GOOD, Sample

log = logging.getLogger(__name__)


@register_setting("semi_supervised")
def semi_supervised(
    train: Sequence[Sample],
    test: Sequence[Sample],
    *,
    seed: int,
    k: int,
    upper_ratio: float = UPPER_RATIO,
) -> tuple[list[Sample], list[Sample]]:
    """Move k labelled anomalous test images per category into the training set.

    Parameters
    ----------
    train, test : sequences of Sample
        The dataset's split.
    seed : int
        Seed of the draw (a larger k keeps the smaller k's images).
    k : int
        Labelled anomalies per category (IM-IAD: 1, 2, 4, 5, 8, 10).
    upper_ratio : float
        At most ``int(upper_ratio * n)`` of a category's n test anomalies move (IM-IAD: 0.75).
    """
    k = check_int("semi_supervised", "k", k, 1)
    upper_ratio = check_fraction("semi_supervised", "upper_ratio", upper_ratio)
    moved: list[int] = []
    for category, positions in anomalies_by_category(test).items():
        n = capped_anomaly_count(k, len(positions), upper_ratio)
        if n < k:
            log.warning(
                "semi_supervised: category %r has %d test anomalies; at most %d (%.0f %%) may move: using %d, not k=%d",
                category,
                len(positions),
                n,
                100 * upper_ratio,
                n,
                k,
            )
        moved += draw(category_rng(seed, category, "semi_supervised"), positions, n)
    taken = set(moved)
    good = [s for s in train if s.label == GOOD]
    return good + [test[i] for i in sorted(moved)], [s for i, s in enumerate(test) if i not in taken]
