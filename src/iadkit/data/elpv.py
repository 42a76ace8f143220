"""ELPV: real electroluminescence images of solar cells, shipped in the ``elpv-dataset`` wheel.

The set (Buerhop-Lutz et al. 2018; Deitsch et al. 2019) holds 2,624 grayscale 300x300
crops of single cells from 44 modules, each with an expert's defect probability in
{0, 1/3, 2/3, 1} and the cell type (``mono`` or ``poly``-crystalline). There are
image-level labels only: **no pixel masks**, so pixel metrics are unavailable
(``DatasetSplit.has_masks`` is False).

Protocol (fixed and seeded, so results are comparable across runs and machines):

* categories ``mono``, ``poly`` and ``all`` (= mono + poly);
* good = probability 0; anomalous = probability >= ``anomalous_min_proba`` (default 2/3);
  cells in between (1/3 by default) are left out, because the annotators themselves were
  unsure about them;
* per cell type, ``floor(n_good * train_fraction)`` good cells (default 0.5) go to
  training, chosen as the first entries of ``numpy.random.default_rng(seed).permutation(n_good)``
  (default seed 0) over that type's good cells in file order; the other good cells and all
  anomalous cells form the test set. Because the draw is per type, the ``all`` split is
  exactly the union of the ``mono`` and ``poly`` splits;
* with the defaults: ``all`` = 754 good training cells and 1,575 test cells
  (754 good + 821 anomalous); ``mono`` = 294 train, 663 test (294 + 369);
  ``poly`` = 460 train, 912 test (460 + 452).

Samples live in memory: ``Sample.image`` is an ``HxWx1`` uint8 read-only view into one
array shared by all samples; ``Sample.path`` is ``elpv://<type>/<index>`` with the
index of the cell in the package's ``labels.csv`` (4 digits). ``defect_type`` is
``good``, ``defect_p67`` (probability 2/3) or ``defect_p100`` (probability 1); with a
lower cut-off also ``defect_p33``. The arrays are loaded once per process on first use
(decoding the 2,624 PNGs takes a few seconds).
"""

from __future__ import annotations

import functools

import numpy as np

from iadkit.data.layouts import DatasetSplit
from iadkit.errors import DatasetLayoutError
from iadkit.types import ANOMALOUS, GOOD, Sample

ELPV_LICENSE = (
    "CC BY-NC-SA 4.0 (Creative Commons Attribution-NonCommercial-ShareAlike 4.0 International); "
    "ELPV dataset by Buerhop-Lutz et al. 2018 and Deitsch et al. 2019, https://github.com/zae-bayern/elpv-dataset. "
    "Non-commercial use only: fine for tests, demos and research."
)
"""Licence of the ELPV images, for the README and ``iadkit data list``."""

ELPV_CATEGORIES: tuple[str, ...] = ("mono", "poly", "all")
ELPV_TYPES: tuple[str, ...] = ("mono", "poly")
ELPV_SIZE = (300, 300)


@functools.lru_cache(maxsize=1)
def elpv_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images [N,300,300] uint8 read-only, probabilities [N] float, types [N] str), cached.

    Loaded from the installed ``elpv-dataset`` package; nothing is downloaded.
    """
    try:
        from elpv_dataset.utils import load_dataset as _elpv_load
    except ImportError:
        raise DatasetLayoutError(
            "ELPV needs the 'elpv-dataset' package (pip install elpv-dataset); it ships the images in its wheel."
        ) from None
    images, proba, types = _elpv_load()
    images = np.ascontiguousarray(images)
    images.setflags(write=False)
    proba = np.asarray(proba, dtype=np.float64)
    types = np.asarray(types).astype(str)
    proba.setflags(write=False)
    types.setflags(write=False)
    return images, proba, types


def _defect_type(p: float) -> str:
    return f"defect_p{round(float(p) * 100)}"


def load_elpv(
    category: str = "all",
    *,
    anomalous_min_proba: float = 2 / 3,
    train_fraction: float = 0.5,
    seed: int = 0,
) -> DatasetSplit:
    """The ELPV split of the module docstring's protocol for ``category`` mono, poly or all."""
    if category not in ELPV_CATEGORIES:
        raise DatasetLayoutError(f"ELPV category {category!r} unknown; choose one of {', '.join(ELPV_CATEGORIES)}.")
    if not 0.0 < anomalous_min_proba <= 1.0:
        raise ValueError(f"anomalous_min_proba must be in (0, 1] (e.g. 1/3, 2/3 or 1), got {anomalous_min_proba}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    images, proba, types = elpv_arrays()
    cut = anomalous_min_proba - 1e-6  # probabilities are stored as 0.3333.., 0.6666..
    wanted = ELPV_TYPES if category == "all" else (category,)

    train_idx: list[int] = []
    test_idx: list[int] = []
    for cell_type in wanted:
        of_type = types == cell_type
        good = np.flatnonzero(of_type & (proba == 0.0))
        bad = np.flatnonzero(of_type & (proba >= cut))
        n_train = int(np.floor(len(good) * train_fraction + 1e-9))
        chosen = np.zeros(len(good), dtype=bool)
        chosen[np.random.default_rng(seed).permutation(len(good))[:n_train]] = True
        train_idx += good[chosen].tolist()
        test_idx += good[~chosen].tolist() + bad.tolist()

    def sample(i: int) -> Sample:
        p = float(proba[i])
        is_good = p == 0.0
        return Sample(
            path=f"elpv://{types[i]}/{i:04d}",
            label=GOOD if is_good else ANOMALOUS,
            category=category,
            defect_type="good" if is_good else _defect_type(p),
            image=images[i][:, :, None],
        )

    return DatasetSplit(
        name="elpv",
        category=category,
        train=[sample(i) for i in sorted(train_idx)],
        test=[sample(i) for i in sorted(test_idx)],
        layout="elpv",
        root="elpv",
        license=ELPV_LICENSE,
        notes=(
            f"good = p 0; anomalous = p >= {anomalous_min_proba:.3g}; train = floor({train_fraction:g} x good) per "
            f"cell type, seed {seed}; image-level labels only (no masks)"
        ),
    )
