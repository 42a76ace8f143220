"""ELPV: the fixed protocol reproduces the documented counts, from the real installed data.

Label counts of the package's labels.csv (checked by hand): mono 588 good / 117 at p=1/3 /
369 at p>=2/3; poly 920 / 178 / 452; all 1,508 / 295 / 821 (715 of them p=1).
"""

from __future__ import annotations

import numpy as np
import pytest

from iadkit.data import ELPV_LICENSE, list_categories, load_dataset, load_elpv
from iadkit.data.elpv import elpv_arrays
from iadkit.errors import DatasetLayoutError
from iadkit.types import ANOMALOUS, GOOD


@pytest.mark.parametrize(
    ("category", "n_train", "n_test", "n_test_anomalous"),
    [("all", 754, 1575, 821), ("mono", 294, 663, 369), ("poly", 460, 912, 452)],
)
def test_default_protocol_counts(category: str, n_train: int, n_test: int, n_test_anomalous: int) -> None:
    split = load_elpv(category)
    assert (len(split.train), len(split.test), len(split.test_anomalous)) == (n_train, n_test, n_test_anomalous)
    assert all(s.label == GOOD for s in split.train)
    assert not split.has_masks and split.train_anomalous == [] and split.license == ELPV_LICENSE
    train_paths = {s.path for s in split.train}
    assert not train_paths & {s.path for s in split.test}
    assert len(train_paths) == n_train
    assert "defect_p33" not in split.defect_types  # the unsure 1/3 cells are left out


def test_samples_are_in_memory_views_with_stable_ids() -> None:
    images, proba, types = elpv_arrays()
    assert images.shape == (2624, 300, 300) and images.dtype == np.uint8
    assert elpv_arrays() is elpv_arrays()  # loaded once per process
    split = load_dataset("elpv", "mono")
    s = split.test_anomalous[0]
    index = int(s.path.rsplit("/", 1)[1])
    assert s.path == f"elpv://mono/{index:04d}" and types[index] == "mono" and proba[index] >= 2 / 3 - 1e-6
    im = s.load_image()
    assert im.shape == (300, 300, 1) and im.dtype == np.uint8 and not im.flags.writeable
    np.testing.assert_array_equal(im[:, :, 0], images[index])
    assert s.defect_type in ("defect_p67", "defect_p100") and s.label == ANOMALOUS
    assert s.load_mask() is None and not s.has_mask


def test_all_is_the_union_of_mono_and_poly_and_seed_matters() -> None:
    all_, mono, poly = (load_elpv(c) for c in ("all", "mono", "poly"))
    assert {s.path for s in all_.train} == {s.path for s in mono.train} | {s.path for s in poly.train}
    assert {s.path for s in all_.test} == {s.path for s in mono.test} | {s.path for s in poly.test}
    # the documented draw: first floor(n/2) of default_rng(0).permutation over mono's good cells in file order
    _, proba, types = elpv_arrays()
    good_mono = np.flatnonzero((types == "mono") & (proba == 0))
    expected = sorted(good_mono[np.random.default_rng(0).permutation(len(good_mono))[: len(good_mono) // 2]])
    assert [int(s.path[-4:]) for s in mono.train] == expected
    other = load_elpv("all", seed=1)
    assert len(other.train) == 754 and {s.path for s in other.train} != {s.path for s in all_.train}


def test_cut_off_and_fraction_options() -> None:
    lenient = load_dataset("elpv", "all", anomalous_min_proba=1 / 3)
    assert len(lenient.test_anomalous) == 821 + 295
    strict = load_elpv("all", anomalous_min_proba=1.0)
    assert len(strict.test_anomalous) == 715 and strict.defect_types == ["defect_p100"]
    assert len(load_elpv("mono", train_fraction=0.25).train) == 147  # floor(588 / 4)


def test_source_name_defaults_and_errors() -> None:
    assert list_categories("elpv") == ["mono", "poly", "all"]
    assert load_dataset("elpv").category == "all"
    assert "CC BY-NC-SA 4.0" in ELPV_LICENSE
    with pytest.raises(DatasetLayoutError, match="'cells' unknown"):
        load_elpv("cells")
    with pytest.raises(ValueError, match="anomalous_min_proba"):
        load_elpv(anomalous_min_proba=0)
