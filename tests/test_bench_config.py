"""Benchmark grids: config files, cell identity, settings registry, subsampling."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import test_bench_support as support
from iadkit.bench.config import BenchConfig, BenchConfigError, Cell, expand
from iadkit.bench.datasets import subsample_test, subsample_train
from iadkit.settings import apply_setting, available_settings, register_setting
from iadkit.types import Sample

YAML = """
name: g
methods:
  - test_pixel_zscore
  - name: test_bench_seeded
    image_size: 16
    params: {noise: 0.1}
datasets:
  - source: tinybench
    categories: [flat]
seeds: [0, 1]
image_size: [16, 16]
imports: [test_bench_support]
"""

TOML = """
name = "g"
seeds = [0, 1]
image_size = [16, 16]
imports = ["test_bench_support"]
methods = ["test_pixel_zscore", { name = "test_bench_seeded", image_size = 16, params = { noise = 0.1 } }]
[[datasets]]
source = "tinybench"
categories = ["flat"]
"""


def test_yaml_and_toml_give_the_same_cells(tmp_path):
    (tmp_path / "g.yaml").write_text(YAML)
    (tmp_path / "g.toml").write_text(TOML)
    a = expand(BenchConfig.load(tmp_path / "g.yaml"))
    b = expand(BenchConfig.load(tmp_path / "g.toml"))
    assert [c.cell_id for c in a] == [c.cell_id for c in b]
    # dataset -> category -> setting -> seed -> method
    assert [(c.seed, c.method) for c in a] == [
        (0, "test_pixel_zscore"),
        (0, "test_bench_seeded"),
        (1, "test_pixel_zscore"),
        (1, "test_bench_seeded"),
    ]
    assert a[1].params == {"noise": 0.1} and a[1].image_size == (16, 16) and a[0].setting == "vanilla"


def test_all_categories_when_omitted():
    cfg = BenchConfig.parse({**support.grid(["test_pixel_zscore"]), "datasets": ["tinybench"]})
    assert [c.category for c in expand(cfg)] == support.CATEGORIES


def test_cell_identity_covers_exactly_the_experiment():
    base = Cell("m", {"a": 1}, "ds", "cat", "vanilla", 0, (16, 16))
    same = [
        dataclasses.replace(base, batch_size=3),
        dataclasses.replace(base, device="cuda"),
        dataclasses.replace(base, gallery_size=0),
        dataclasses.replace(base, params={"a": 1}),
    ]
    assert {c.cell_id for c in same} == {base.cell_id}
    different = [
        dataclasses.replace(base, method="n"),
        dataclasses.replace(base, params={"a": 2}),
        dataclasses.replace(base, dataset="ds2"),
        dataclasses.replace(base, category="c2"),
        dataclasses.replace(base, setting="few_shot"),
        dataclasses.replace(base, setting_params={"k": 1}),
        dataclasses.replace(base, seed=1),
        dataclasses.replace(base, image_size=(32, 32)),
        dataclasses.replace(base, subsample={"train": 5, "test": None}),
    ]
    ids = {c.cell_id for c in different}
    assert len(ids) == len(different) and base.cell_id not in ids
    assert len(base.cell_id) == 16


def test_per_dataset_image_size_override():
    cfg = BenchConfig.parse(
        {
            **support.grid([{"name": "test_pixel_zscore", "image_size": 32, "image_size_for": {"tinybench": 8}}]),
            "datasets": [{"source": "tinybench", "categories": ["flat"], "subsample": {"train": 4}}],
        }
    )
    (cell,) = expand(cfg)
    assert cell.image_size == (8, 8)
    assert cell.dataset_label == "tinybench (subsample train≤4)"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"methods": [], "datasets": ["x"]}, "methods"),
        ({"methods": ["a"], "datasets": ["x"], "sedes": [1]}, "sedes"),
        ({"methods": [{"name": "a", "parms": {}}], "datasets": ["x"]}, "parms"),
        ({"methods": ["a"], "datasets": [{"source": "x", "subsample": {"train": 0}}]}, "train"),
        ([1, 2], "expected a table"),
    ],
)
def test_invalid_configs_name_the_problem(data, message):
    with pytest.raises(BenchConfigError, match=message):
        BenchConfig.parse(data)


def test_config_file_errors(tmp_path):
    with pytest.raises(BenchConfigError, match="no such"):
        BenchConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [a\n")
    with pytest.raises(BenchConfigError, match="cannot parse"):
        BenchConfig.load(bad)
    (tmp_path / "x.ini").write_text("")
    with pytest.raises(BenchConfigError, match="yaml"):
        BenchConfig.load(tmp_path / "x.ini")


def test_unknown_setting_and_duplicate_cells_are_refused():
    with pytest.raises(Exception, match=r"unknown setting 'fewshot'.*vanilla"):
        expand(BenchConfig.parse({**support.grid(["test_pixel_zscore"]), "settings": ["fewshot"]}))
    with pytest.raises(BenchConfigError, match="same cell twice"):
        expand(BenchConfig.parse(support.grid(["test_pixel_zscore", "test_pixel_zscore"])))


@register_setting("test_first_half")
def first_half(train, test, *, seed, fraction=0.5):
    return list(train)[: int(len(train) * fraction)], list(test)


def test_a_new_setting_is_one_function():
    assert "test_first_half" in available_settings() and "vanilla" in available_settings()
    train, test = support._images("flat")
    tr, te = apply_setting("test_first_half", train, test, seed=0, params={"fraction": 0.25})
    assert tr == train[:2] and te == test
    assert apply_setting("vanilla", train, test, seed=3) == (train, test)


def _samples(labels: list[int]) -> list[Sample]:
    return [Sample(path=f"s{i}", label=lab) for i, lab in enumerate(labels)]


def test_subsample_test_is_stratified_and_deterministic():
    samples = _samples([0] * 30 + [1] * 10)
    sub = subsample_test(samples, 8)
    labels = [s.label for s in sub]
    assert len(sub) == 8 and labels.count(0) == 6 and labels.count(1) == 2  # 3:1 kept
    assert sub == subsample_test(samples, 8)  # same draw every time
    assert [s.path for s in sub] == sorted((s.path for s in sub), key=lambda p: int(p[1:]))  # order kept
    # A rare class keeps at least one image.
    rare = subsample_test(_samples([0] * 99 + [1]), 10)
    assert [s.label for s in rare].count(1) == 1 and len(rare) == 10
    assert subsample_test(samples, None) == samples and subsample_test(samples, 100) == samples


def test_subsample_train_keeps_order():
    samples = _samples([0] * 20)
    sub = subsample_train(samples, 5)
    idx = [int(s.path[1:]) for s in sub]
    assert len(sub) == 5 and idx == sorted(idx) and len(set(idx)) == 5
    np.testing.assert_array_equal(idx, [int(s.path[1:]) for s in subsample_train(samples, 5)])
