"""Pieces the data settings share: per-category draws, IM-IAD's cap, parameter checks.

IM-IAD (``data_io/fewshot.py``, ``noisy.py``, ``semi.py``) draws every category ("task") on
its own, with Python's global `random`. Here each category gets its own generator, seeded by
(seed, category, setting), so that a category's draw does not depend on which other
categories are in the split, and a draw is reproducible from the cell alone. The draw is a
permutation whose first n entries are taken: with one seed, the 2-shot set contains the
1-shot set, the images injected at noise 0.10 contain those at 0.05, and so on, which keeps
the curves over k or the ratio free of re-drawing noise.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from iadkit.types import ANOMALOUS, Sample

# IM-IAD's `upper_ratio`: at most this share of a category's test anomalies leaves the test
# set (for the noisy and semi-supervised settings), so that the test set keeps most of them.
UPPER_RATIO = 0.75


def by_category(samples: Sequence[Sample]) -> dict[str, list[int]]:
    """Positions of the samples of each category, categories in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.category, []).append(i)
    return groups


def category_rng(seed: int, category: str, setting: str) -> np.random.Generator:
    """The generator of one (seed, category, setting) draw."""
    return np.random.default_rng([int(seed) % 2**63, zlib.crc32(category.encode()), zlib.crc32(setting.encode())])


def draw(rng: np.random.Generator, positions: list[int], n: int) -> list[int]:
    """`n` of `positions`, drawn without replacement, returned in their original order."""
    order = rng.permutation(len(positions))[:n]
    return [positions[i] for i in sorted(order)]


def capped_anomaly_count(wanted: int, n_anomalies: int, upper_ratio: float) -> int:
    """IM-IAD's cap: ``min(wanted, int(n_anomalies * upper_ratio))`` (int() truncates)."""
    return min(wanted, int(n_anomalies * upper_ratio))


def anomalies_by_category(test: Sequence[Sample]) -> dict[str, list[int]]:
    """Positions of the labelled anomalous test images of each category."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(test):
        if s.label == ANOMALOUS:
            groups.setdefault(s.category, []).append(i)
    return groups


# -- parameter checks: a wrong value is a SettingError naming the setting and the parameter --
def check_int(setting: str, name: str, value: Any, minimum: int) -> int:
    from iadkit.settings import SettingError

    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SettingError(f"setting {setting!r}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_fraction(setting: str, name: str, value: Any, *, low: float = 0.0, high: float = 1.0) -> float:
    from iadkit.settings import SettingError

    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not low <= value <= high:
        raise SettingError(f"setting {setting!r}: {name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def check_bool(setting: str, name: str, value: Any) -> bool:
    from iadkit.settings import SettingError

    if not isinstance(value, (bool, np.bool_)):
        raise SettingError(f"setting {setting!r}: {name} must be true or false, got {value!r}")
    return bool(value)
