"""The task-plan settings (continual, multi_class) end to end: the plans they make, the grid
cells, which tasks are tested after which training step, the stored accuracy matrix and the
forgetting measure derived from it, the schema 3 -> 4 migration, the report's section, and
the API that trains task after task (partial_fit, warm-started fit)."""

from __future__ import annotations

import re
import sqlite3

import numpy as np
import pytest
import torch

import tasks_support as ts
from iadkit.bench import BenchConfig, ResultsDB, run_benchmark
from iadkit.bench.config import BenchConfigError, Cell, expand
from iadkit.bench.db import SCHEMA_VERSION, CellResult, TaskEvaluation
from iadkit.bench.report import build_report_html
from iadkit.bench.summary import task_summaries, unified_comparisons
from iadkit.data.transforms import ImageSet
from iadkit.methods.base import Detector, NotContinualError, register
from iadkit.metrics.continual import forgetting_measure
from iadkit.metrics.unified import MAD_METRICS, mad
from iadkit.model import Model
from iadkit.settings import SettingError, apply_setting, apply_task_setting, setting_kind
from iadkit.types import GOOD, Prediction


def samples(categories=("flat", "dark", "light")):
    train, test = [], []
    for c in categories:
        tr, te = ts.images(c)
        train += tr
        test += te
    return train, test


# -- the plans --------------------------------------------------------------------------------------
def test_continual_plan_one_task_per_category_in_order():
    train, test = samples()
    tasks = apply_task_setting("continual", train, test, seed=0)
    assert [(t.name, t.categories, t.step) for t in tasks] == [
        ("flat", ("flat",), 0),
        ("dark", ("dark",), 1),
        ("light", ("light",), 2),
    ]
    for t in tasks:
        assert {s.category for s in t.train} == set(t.categories) == {s.category for s in t.test}
        assert all(s.label == GOOD for s in t.train) and len(t.train) == 8 and len(t.test) == 8
    reordered = apply_task_setting("continual", *samples(("light", "flat", "dark")), seed=0)
    assert [t.name for t in reordered] == ["light", "flat", "dark"]  # the order given is the order learned


def test_continual_class_incremental_split_and_its_refusals():
    train, test = samples()
    tasks = apply_task_setting("continual", train, test, seed=0, params={"split": "2+1"})
    assert [(t.name, t.categories, t.step, len(t.train), len(t.test)) for t in tasks] == [
        ("flat+dark", ("flat", "dark"), 0, 16, 16),
        ("light", ("light",), 1, 8, 8),
    ]
    with pytest.raises(SettingError, match=r"groups 4 categories, but the dataset lists 3 .*add up to 3"):
        apply_task_setting("continual", train, test, seed=0, params={"split": "3+1"})
    with pytest.raises(SettingError, match="needs at least two tasks"):
        apply_task_setting("continual", train, test, seed=0, params={"split": "3"})
    with pytest.raises(SettingError, match="positive task sizes"):
        apply_task_setting("continual", train, test, seed=0, params={"split": "2+x"})
    with pytest.raises(SettingError, match="unexpected keyword argument 'order'"):
        apply_task_setting("continual", train, test, seed=0, params={"order": "a"})


def test_multi_class_plan_learns_every_category_at_step_zero():
    train, test = samples()
    tasks = apply_task_setting("multi_class", train, test, seed=0)
    assert [(t.name, t.step) for t in tasks] == [("flat", 0), ("dark", 0), ("light", 0)]
    with pytest.raises(SettingError, match="at least two categories"):
        apply_task_setting("multi_class", *samples(("flat",)), seed=0)


def test_kinds_are_told_apart():
    assert setting_kind("continual") == setting_kind("multi_class") == "tasks"
    assert setting_kind("vanilla") == "split"
    with pytest.raises(SettingError, match="spans several categories"):
        apply_setting("continual", [], [], seed=0)
    with pytest.raises(SettingError, match="not a task plan"):
        apply_task_setting("vanilla", [], [], seed=0)


# -- the grid --------------------------------------------------------------------------------------
def test_a_tasks_setting_is_one_cell_per_dataset_after_the_category_cells():
    cfg = BenchConfig.parse(
        ts.grid(["test_task_means"], ["vanilla", "continual", {"continual": {"split": "2+1"}}, "multi_class"])
    )
    cells = expand(cfg)
    assert [(c.category, c.setting, c.setting_params) for c in cells] == [
        ("flat", "vanilla", {}),
        ("dark", "vanilla", {}),
        ("light", "vanilla", {}),
        ("flat,dark,light", "continual", {}),
        ("flat,dark,light", "continual", {"split": "2+1"}),
        ("flat,dark,light", "multi_class", {}),
    ]
    assert cells[3].categories == ["flat", "dark", "light"]
    # the order is part of the experiment: another order is another cell
    other = expand(BenchConfig.parse(ts.grid(["test_task_means"], ["continual"], categories=["dark", "flat", "light"])))
    assert other[-1].cell_id != cells[3].cell_id


def test_the_grid_refuses_plans_that_cannot_run_before_any_cell():
    from iadkit.bench.runner import validate_grid

    cfg = BenchConfig.parse(
        ts.grid(["test_task_means", "musc"], [{"continual": {"split": "1+1"}}, "multi_class"], categories=["flat"])
    )
    with pytest.raises(BenchConfigError) as err:
        validate_grid(cfg)
    text = str(err.value)
    assert "method musc is zero-shot: it learns nothing from the tasks" in text
    assert "split '1+1' groups 2 categories, but the dataset lists 1 (flat)" in text
    assert "'multi_class' needs at least two categories" in text


# -- running the protocol --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tasks_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("tasks") / "r.db"
    ts.FITS.clear()
    cfg = BenchConfig.parse(
        ts.grid(
            ["test_task_means", "test_pixel_zscore"],
            ["vanilla", "continual", {"continual": {"split": "2+1"}}, "multi_class"],
        )
    )
    summary = run_benchmark(cfg, path, progress=False)
    assert not summary.failed, [f.error for f in summary.failed]
    return path, list(ts.FITS)


def _rows(path, setting, params="{}"):
    con = sqlite3.connect(path)
    got = con.execute(
        "SELECT r.method, t.step, t.task, t.task_name FROM task_metrics t JOIN runs r USING (cell_id) "
        "WHERE r.setting = ? AND r.setting_params = ? AND t.metric = 'image_auroc' ORDER BY r.method, t.step, t.task",
        (setting, params),
    ).fetchall()
    con.close()
    return got


def test_after_each_step_every_task_learned_so_far_is_tested(tasks_db):
    path, _ = tasks_db
    expected = [(0, 0, "flat"), (1, 0, "flat"), (1, 1, "dark"), (2, 0, "flat"), (2, 1, "dark"), (2, 2, "light")]
    for method in ("test_pixel_zscore", "test_task_means"):
        assert [r[1:] for r in _rows(path, "continual") if r[0] == method] == expected
    assert [r[1:] for r in _rows(path, "continual", '{"split":"2+1"}') if r[0] == "test_task_means"] == [
        (0, 0, "flat+dark"),
        (1, 0, "flat+dark"),
        (1, 1, "light"),
    ]
    assert [r[1:] for r in _rows(path, "multi_class") if r[0] == "test_task_means"] == [
        (0, 0, "flat"),
        (0, 1, "dark"),
        (0, 2, "light"),
    ]


def test_the_matrix_holds_every_metric_and_the_run_its_final_means(tasks_db):
    path, _ = tasks_db
    with ResultsDB(path, writable=False) as db:
        runs = db.runs()
        run = next(
            r
            for r in runs
            if r["setting"] == "continual" and not r["setting_params"] and r["method"] == "test_pixel_zscore"
        )
        m = db.task_matrix(run["cell_id"])
        assert m.tasks == ["flat", "dark", "light"] and m.n_steps == 3
        assert {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"} <= set(
            m.values
        )
        grid = m.metric("image_auroc")
        assert (
            grid.shape == (3, 3)
            and np.isnan(grid[np.triu_indices(3, 1)]).all()
            and np.isfinite(grid[np.tril_indices(3)]).all()
        )
        for k, v in run["metrics"].items():  # the cell's metrics: the last row's mean over tasks
            assert v == pytest.approx(np.nanmean(m.metric(k)[-1])), k
        assert len(db.image_scores(run["cell_id"])["scores"]) == 24  # the final model on every task
        assert run["setting_info"]["training"].startswith("sequential fine-tuning")
        assert [t["name"] for t in run["setting_info"]["tasks"]] == ["flat", "dark", "light"]
        vanilla = next(r for r in runs if r["setting"] == "vanilla")
        assert db.task_matrix(vanilla["cell_id"]) is None


def test_continual_methods_get_partial_fit_and_others_a_warm_started_fit(tasks_db):
    path, fits = tasks_db
    # test_task_means records each task it learns: its 3 vanilla fits, then 3 tasks of 8 images
    # (continual), 2 steps of 16 + 8 (2+1) and one fit on the union of 24 (multi_class); a step
    # with >= 10 good images holds 10 % out to calibrate the threshold (16 -> 14, 24 -> 22)
    assert fits == [("test_task_means", 8)] * 6 + [
        ("test_task_means", 14),
        ("test_task_means", 8),
        ("test_task_means", 22),
    ]
    with ResultsDB(path, writable=False) as db:
        summaries = {(s.method, s.setting_label): s for s in task_summaries(db, db.runs())}
    keeps = summaries[("test_task_means", "continual")]
    forgets = summaries[("test_pixel_zscore", "continual")]
    assert keeps.training.startswith("continual") and keeps.forgetting["image_auroc"] == 0.0
    # the mean image of the last task alone cannot score the first two: the baseline forgets
    assert forgets.forgetting["image_auroc"] > 0.3
    assert forgets.forgetting["image_auroc"] == pytest.approx(forgetting_measure(forgets.matrix.metric("image_auroc")))


def test_forgetting_from_the_stored_matrix_equals_the_metric_on_a_hand_made_matrix(tmp_path):
    acc = np.array([[0.90, np.nan, np.nan], [0.70, 0.95, np.nan], [0.60, 0.85, 0.99]])
    # FM = mean over the two old tasks of (best before the last step - final):
    # task 0: max(0.90, 0.70) - 0.60 = 0.30; task 1: 0.95 - 0.85 = 0.10 -> 0.20
    assert forgetting_measure(acc) == pytest.approx(0.20)
    cell = Cell("hand", {}, "taskbench", "flat,dark,light", "continual", 0, (16, 16))
    entries = [
        TaskEvaluation(
            step=i, task=j, task_name=name, metrics={"image_auroc": float(acc[i, j]), "pixel_auroc": float("nan")}
        )
        for i in range(3)
        for j, name in enumerate(["flat", "dark", "light"])
        if j <= i
    ]
    with ResultsDB(tmp_path / "r.db") as db:
        db.record(CellResult(cell=cell, status="done", metrics={"image_auroc": 0.8133}, task_matrix=entries))
        (summary,) = task_summaries(db, db.runs())
        stored = db.task_matrix(cell.cell_id)
    np.testing.assert_array_equal(stored.metric("image_auroc"), acc)
    assert summary.forgetting["image_auroc"] == pytest.approx(0.20)
    assert summary.final_mean["image_auroc"] == pytest.approx((0.60 + 0.85 + 0.99) / 3)
    assert np.isnan(summary.forgetting["pixel_auroc"])  # undefined entries: no number is made up


def test_mad_is_the_mean_of_the_seven_metrics():
    values = dict(zip(MAD_METRICS, [0.9, 0.8, 0.7, 0.95, 0.5, 0.55, 0.85]))
    assert mad(values) == pytest.approx(sum(values.values()) / 7)
    from iadkit.errors import MetricUndefinedError

    with pytest.raises(MetricUndefinedError, match="pixel_ap"):
        mad({**values, "pixel_ap": float("nan")})


def test_multi_class_table_puts_the_unified_model_beside_per_class_training(tasks_db):
    path, _ = tasks_db
    with ResultsDB(path, writable=False) as db:
        runs = db.runs()
        comparisons = {c.method: c for c in unified_comparisons(db, runs)}
        c = comparisons["test_pixel_zscore"]
        assert c.categories == ["flat", "dark", "light"]
        for cat in c.categories:
            vanilla = next(
                r
                for r in runs
                if r["setting"] == "vanilla" and r["method"] == "test_pixel_zscore" and r["category"] == cat
            )
            assert c.per_class["image_auroc"][cat] == pytest.approx(vanilla["metrics"]["image_auroc"])
        assert c.unified_mad == pytest.approx(mad(c.unified_mean))
        assert c.per_class_mad == pytest.approx(mad(c.per_class_mean))


def test_the_report_shows_matrices_forgetting_and_the_unified_table(tasks_db):
    path, _ = tasks_db
    page = build_report_html(path)
    section = page[page.index('<section id="tasks">') :]
    section = section[: section.index("</section>")]
    assert section.count("<svg") == 4  # I-AUROC and P-AUROC heat maps for each of the 2 continual grids
    assert "tested on task" in section and "FM " in section
    row = re.search(
        r"<tr><td class=\"l\">test_pixel_zscore</td><td class=\"l\">sequential fine-tuning[^<]*</td>(.*?)</tr>", section
    )
    assert row is not None
    assert '<table class="unified">' in section and "mAD" in section
    assert 'href="#tasks"' in page


# -- the schema ------------------------------------------------------------------------------------
def test_a_schema_3_database_is_migrated_and_read_only_readers_cope(tmp_path, tasks_db):
    path = tmp_path / "old.db"
    run_benchmark(
        BenchConfig.parse(ts.grid(["test_pixel_zscore"], ["vanilla"], categories=["flat"])), path, progress=False
    )
    con = sqlite3.connect(path)
    con.execute("DROP TABLE task_metrics")
    con.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with ResultsDB(path, writable=False) as db:
        (run,) = db.runs()
        assert db.task_matrix(run["cell_id"]) is None and db.meta()["schema_version"] == "3"
        assert task_summaries(db, db.runs()) == []
    build_report_html(path)  # an old file still makes a report
    with ResultsDB(path) as db:
        assert db.meta()["schema_version"] == str(SCHEMA_VERSION) == "4"
        assert db.conn.execute("SELECT count(*) FROM task_metrics").fetchone()[0] == 0


# -- the API ---------------------------------------------------------------------------------------
@register
class _TrainedMean(Detector):
    """A trained test detector: a few gradient steps pull a mean image toward the data."""

    name = "test_trained_mean"
    family = "test"
    map_sigma = 0.0

    def _build(self) -> None:
        self.mean_ = torch.nn.Parameter(torch.zeros(3, ts.SIZE, ts.SIZE))

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        x = torch.cat([b.images for b in train.batches(8)])
        opt = torch.optim.SGD([self.mean_], lr=0.25)
        for _ in range(3):
            opt.zero_grad()
            ((x - self.mean_) ** 2).mean().backward()
            opt.step()

    def _predict(self, images: torch.Tensor) -> Prediction:
        maps = (images - self.mean_.detach()).abs().mean(1)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)


def test_warm_start_continues_from_the_previous_state_and_partial_fit_is_for_continual_methods():
    flat, _ = ts.images("flat")
    dark, _ = ts.images("dark")
    fresh = Model.create("test_trained_mean", image_size=ts.SIZE).fit(dark, calibration_fraction=0.0, progress=False)
    seq = Model.create("test_trained_mean", image_size=ts.SIZE).fit(flat, calibration_fraction=0.0, progress=False)
    after_flat = seq.detector.mean_.detach().clone()
    seq.fit(dark, warm_start=True, calibration_fraction=0.0, progress=False)
    # 3 steps of lr 0.25 from the flat mean end elsewhere than 3 steps from zero
    assert not torch.allclose(seq.detector.mean_, fresh.detector.mean_)
    assert not torch.allclose(seq.detector.mean_, after_flat)
    again = Model.create("test_trained_mean", image_size=ts.SIZE).fit(flat, calibration_fraction=0.0, progress=False)
    again.fit(dark, calibration_fraction=0.0, progress=False)  # no warm start: from scratch
    assert torch.allclose(again.detector.mean_, fresh.detector.mean_)
    with pytest.raises(NotContinualError, match=r"fit\(train, warm_start=True\)"):
        seq.partial_fit(dark, progress=False)

    cont = Model.create("test_task_means", image_size=ts.SIZE).partial_fit(
        flat, calibration_fraction=0.0, progress=False
    )
    cont.partial_fit(dark, calibration_fraction=0.0, progress=False)
    assert cont.detector.means_.shape[0] == 2 and cont.info["n_tasks"] == 2
    cont.fit(flat, calibration_fraction=0.0, progress=False)  # fit starts over
    assert cont.detector.means_.shape[0] == 1 and cont.info["n_tasks"] == 1
