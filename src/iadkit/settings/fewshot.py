"""The few-shot setting: a line changes product and has only k good images of it.

paper -> reference code -> ours
-------------------------------
- IM-IAD: m in {1, 2, 4, 8} normal training images per category, drawn at random; the test
  set is untouched -> ``data_io/fewshot.py``: per task, shuffle the training indices and keep
  the first k (``random.shuffle`` then a slice; k larger than the category is cut to its size)
  -> the same per category, with a generator seeded by (seed, category) (see `_common`); the
  shots keep their dataset order. A k larger than a category's good images keeps them all,
  as in the reference, and says so in a warning.
- Labelled training defects of the dataset are not part of the protocol: dropped, as in
  vanilla.
- Optional few-shot augmentation (``-fda``): each shot becomes n + 1 variants
  (`iadkit.settings.augment`), computed lazily when the method loads them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from iadkit.settings import register_setting
from iadkit.settings._common import by_category, category_rng, check_bool, check_int, draw
from iadkit.settings.augment import DEFAULT_AUGMENTATIONS, DEFAULT_N_AUGMENT, augmented_samples, check_augmentations
from iadkit.types import GOOD, Sample

log = logging.getLogger(__name__)


@register_setting("few_shot")
def few_shot(
    train: Sequence[Sample],
    test: Sequence[Sample],
    *,
    seed: int,
    k: int,
    augment: bool = False,
    n_augment: int = DEFAULT_N_AUGMENT,
    augmentations: str | Sequence[str] = DEFAULT_AUGMENTATIONS,
) -> tuple[list[Sample], list[Sample]]:
    """k good training images per category, optionally each expanded into n_augment + 1 variants.

    Parameters
    ----------
    train, test : sequences of Sample
        The dataset's split; `test` is returned unchanged.
    seed : int
        Seed of the draw (the same seed gives the same shots; a larger k keeps the smaller
        k's shots).
    k : int
        Good images per category (IM-IAD: 1, 2, 4, 8).
    augment : bool
        IM-IAD's few-shot augmentation: each shot plus `n_augment` variants of it.
    n_augment : int
        Variants per shot (IM-IAD ``-fnd``, default 4: rotations at 72-degree steps).
    augmentations : str or sequence of str
        Types applied to each variant: rotation, scale, translate, flip, color_jitter,
        perspective (a list, or names joined by '+').
    """
    k = check_int("few_shot", "k", k, 1)
    augment = check_bool("few_shot", "augment", augment)
    n_augment = check_int("few_shot", "n_augment", n_augment, 1)
    types = check_augmentations(augmentations)
    good = [s for s in train if s.label == GOOD]
    chosen: list[int] = []
    for category, positions in by_category(good).items():
        if k > len(positions):
            log.warning(
                "few_shot: category %r has %d good training images, fewer than k=%d: using all",
                category,
                len(positions),
                k,
            )
        chosen += draw(category_rng(seed, category, "few_shot"), positions, k)
    shots = [good[i] for i in sorted(chosen)]
    if augment:
        shots = [v for s in shots for v in augmented_samples(s, n_augment, types, seed)]
    return shots, list(test)
