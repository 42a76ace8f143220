"""Where a benchmark cell gets its images: dataset sources, categories and subsampling.

A dataset is named by a source string, the same one `iadkit.data.load_dataset` takes
(``"elpv"``, ``"synthetic:./synth"``, ``"mvtec:/data/mvtec"`` ...). Extra sources can be
registered here (`register_source`) by a module listed in the benchmark's ``imports``; the
test suite uses this for tiny in-memory data, and users can plug in private data without
touching the data layer.

Subsampling exists for quick runs (the demo): it keeps at most `train` training images
and at most `test` test images, the test part stratified by label so both classes stay.
It uses a fixed seed, independent of the cell's seed, so every method and every seed sees
the same subsample; the dataset's display name says it is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from iadkit.types import Sample

Loader = Callable[[str, str], tuple[list[Sample], list[Sample]]]
Lister = Callable[[str], list[str]]


@dataclass(frozen=True)
class Source:
    load: Loader  # (location, category) -> (train, test)
    categories: Lister  # location -> category names


_SOURCES: dict[str, Source] = {}


def register_source(scheme: str, load: Loader, categories: Lister) -> None:
    """Serve sources ``"<scheme>"`` and ``"<scheme>:<location>"`` with these functions."""
    _SOURCES[scheme] = Source(load=load, categories=categories)


def _split(source: str) -> tuple[str, str]:
    scheme, _, location = source.partition(":")
    return scheme, location


def list_source_categories(source: str) -> list[str]:
    scheme, location = _split(source)
    if scheme in _SOURCES:
        return list(_SOURCES[scheme].categories(location))
    from iadkit.data import list_categories

    return list(list_categories(source))


def load_split(source: str, category: str, subsample: dict[str, int | None] | None = None) -> tuple[list[Sample], list[Sample]]:
    """(train, test) samples of one category, subsampled when asked."""
    scheme, location = _split(source)
    if scheme in _SOURCES:
        train, test = _SOURCES[scheme].load(location, category)
    else:
        from iadkit.data import load_dataset

        split = load_dataset(source, category=category)
        train, test = list(split.train), list(split.test)
    if subsample:
        train = subsample_train(train, subsample.get("train"))
        test = subsample_test(test, subsample.get("test"))
    return list(train), list(test)


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
    quota = {lab: max(1, int(round(n * len(idx) / len(samples)))) for lab, idx in groups.items()}
    while sum(quota.values()) > n:  # rounding overshoot: trim the largest group
        big = max(quota, key=lambda k: quota[k])
        quota[big] -= 1
    keep = np.concatenate([rng.choice(idx, size=min(quota[lab], len(idx)), replace=False) for lab, idx in groups.items()])
    return [samples[i] for i in np.sort(keep)]
