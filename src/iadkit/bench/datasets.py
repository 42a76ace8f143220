"""Where a benchmark cell gets its images: a dataset source, a category, and optional subsampling.

A dataset is named by a source string, the same one `iadkit.data.load_dataset` takes
(``"elpv"``, ``"synthetic:./synth"``, ``"mvtec:/data/mvtec"`` ..., or a scheme registered
with `iadkit.data.register_source`). The training list holds the good training images and
the dataset's labelled training defects (label 1) where it has them: the cell's setting
decides what a method sees (vanilla keeps the good ones; semi-supervised adds defects).

Subsampling exists for quick runs (the demo): it keeps at most `train` training images
and at most `test` test images, the test part stratified by label so both classes stay.
It uses a fixed seed, independent of the cell's seed, so every method and every seed sees
the same subsample; the dataset's display name says it is one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from iadkit.types import Sample


def list_source_categories(source: str) -> list[str]:
    from iadkit.data import list_categories

    return list(list_categories(source))


def load_split(
    source: str,
    category: str,
    subsample: dict[str, int | None] | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """(train, test) samples of one category, subsampled when asked; train includes the
    dataset's labelled training defects. `options` go to the dataset reader."""
    from iadkit.data import load_dataset
    from iadkit.errors import DatasetLayoutError

    try:
        split = load_dataset(source, category=category, **(options or {}))
    except TypeError as exc:  # an option the reader does not take
        raise DatasetLayoutError(f"dataset {source!r}: {exc}") from None
    train, test = list(split.train) + list(split.train_anomalous), list(split.test)
    if subsample:
        train = subsample_train(train, subsample.get("train"))
        test = subsample_test(test, subsample.get("test"))
    return train, test


def subsample_train(samples: list[Sample], n: int | None, seed: int = 0) -> list[Sample]:
    """At most `n` samples, drawn without replacement, in their original order."""
    if n is None or len(samples) <= n:
        return list(samples)
    keep = np.sort(np.random.default_rng(seed).choice(len(samples), size=n, replace=False))
    return [samples[i] for i in keep]


def subsample_test(samples: list[Sample], n: int | None, seed: int = 0) -> list[Sample]:
    """At most `n` samples, stratified by label (each label keeps its share, at least one)."""
    if n is None or len(samples) <= n:
        return list(samples)
    rng = np.random.default_rng(seed)
    labels = np.array([s.label for s in samples])
    groups = {lab: np.flatnonzero(labels == lab) for lab in np.unique(labels)}
    quota = {lab: max(1, round(n * len(idx) / len(samples))) for lab, idx in groups.items()}
    while sum(quota.values()) > n:  # rounding overshoot: trim the largest group
        big = max(quota, key=lambda k: quota[k])
        quota[big] -= 1
    keep = np.concatenate(
        [rng.choice(idx, size=min(quota[lab], len(idx)), replace=False) for lab, idx in groups.items()]
    )
    return [samples[i] for i in np.sort(keep)]
