"""The noisy setting: some defective parts slipped into the "good" training images.

Defects are often tiny, so a training set labelled good by people holds a few defective
parts. The method must not know which: the injected images come with label 0 (good). They
keep their real defect type and carry ``true_label = 1``, so the benchmark can record which
images were noise and how each method scored them afterwards (`injected_noise`).

paper -> reference code -> ours
-------------------------------
- IM-IAD: noise ratio r in {0.05, 0.10, 0.15, 0.20} of the clean training count, taken from
  the test anomalies, which then leave the test set -> ``data_io/noisy.py``: per task,
  ``noise_num = int(r * n_train)``, cut to ``int(n_test_anomalies * upper_ratio)``, drawn with
  ``random.sample``; with ``noisy_overlap = False`` they are removed from the test set; the
  benchmark runs it with ``upper_ratio = 0.75`` -> the same counts (int() truncation
  included) per category, drawn with a generator seeded by (seed, category); the test set
  keeps its order.
- The dataset's own labelled training defects (if any) are not part of the protocol: dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from iadkit.settings import register_setting
from iadkit.settings._common import (
    UPPER_RATIO,
    anomalies_by_category,
    capped_anomaly_count,
    category_rng,
    check_fraction,
    draw,
)
from iadkit.types import ANOMALOUS, GOOD, Sample


@register_setting("noisy")
def noisy(
    train: Sequence[Sample],
    test: Sequence[Sample],
    *,
    seed: int,
    ratio: float,
    upper_ratio: float = UPPER_RATIO,
) -> tuple[list[Sample], list[Sample]]:
    """Move ``int(ratio * n_good_train)`` anomalous test images per category into training, as good.

    Parameters
    ----------
    train, test : sequences of Sample
        The dataset's split.
    seed : int
        Seed of the draw (a larger ratio keeps the smaller ratio's images).
    ratio : float
        Noise ratio: injected images / clean training images of the category, in [0, 1]
        (IM-IAD: 0.05 to 0.20).
    upper_ratio : float
        At most ``int(upper_ratio * n)`` of a category's n test anomalies move (IM-IAD: 0.75).
    """
    ratio = check_fraction("noisy", "ratio", ratio)
    upper_ratio = check_fraction("noisy", "upper_ratio", upper_ratio)
    good = [s for s in train if s.label == GOOD]
    clean_count: dict[str, int] = {}
    for s in good:
        clean_count[s.category] = clean_count.get(s.category, 0) + 1
    moved: list[int] = []
    for category, positions in anomalies_by_category(test).items():
        wanted = int(ratio * clean_count.get(category, 0))
        n = capped_anomaly_count(wanted, len(positions), upper_ratio)
        moved += draw(category_rng(seed, category, "noisy"), positions, n)
    taken = set(moved)
    injected = [replace(test[i], label=GOOD, true_label=ANOMALOUS) for i in sorted(moved)]
    return good + injected, [s for i, s in enumerate(test) if i not in taken]
