"""The benchmark runner: results equal a direct evaluation, failures are recorded, runs resume."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from sklearn.metrics import roc_auc_score

import test_bench_support as support
from iadkit.bench import BenchConfig, ResultsDB, run_benchmark
from iadkit.bench.config import expand
from iadkit.bench.summary import leaderboard, metric_tables
from iadkit.evaluation import evaluate
from iadkit.model import Model

TESTS_DIR = Path(__file__).parent


def cfg(methods, **kw) -> BenchConfig:
    return BenchConfig.parse(support.grid(methods, **kw))


def test_cell_results_equal_a_direct_fit_and_evaluate(tmp_path):
    run_benchmark(cfg(["test_pixel_zscore"], categories=["flat"]), tmp_path / "r.db", progress=False)
    with ResultsDB(tmp_path / "r.db") as db:
        (run,) = db.runs()
        scores = db.image_scores(run["cell_id"])
    train, test = support._images("flat")
    model = Model.create("test_pixel_zscore", image_size=16, seed=0)
    model.fit(train, seed=0, progress=False)  # as the runner does
    direct = evaluate(model, test, batch_size=4)
    assert run["status"] == "done" and run["n_train"] == 8 and run["n_test"] == 6
    for key, value in direct.metrics.items():
        assert run["metrics"][key] == value, key
    assert 0.5 < run["metrics"]["image_auroc"] < 1.0  # the faint defect loses to the hot pixel
    np.testing.assert_array_equal(scores["scores"], direct.scores.astype(np.float64))
    assert scores["paths"] == [s.path for s in test] and scores["labels"].tolist() == [0, 0, 1, 1, 1, 1]
    # Any image metric can be recomputed from the stored per-image scores.
    assert roc_auc_score(scores["labels"], scores["scores"]) == pytest.approx(run["metrics"]["image_auroc"], abs=1e-12)
    for key in ("fit_seconds", "seconds_per_image", "model_seconds_per_image", "fit_peak_rss_mb", "peak_rss_mb"):
        assert run["timings"][key] > 0, key
    assert run["iadkit_version"] and run["started"] <= run["finished"]


def test_gallery_overlays_are_the_top_defects_and_worst_false_alarms(tmp_path):
    run_benchmark(cfg(["test_pixel_zscore"], categories=["flat"], gallery=2), tmp_path / "r.db", progress=False)
    with ResultsDB(tmp_path / "r.db") as db:
        (run,) = db.runs()
        overlays = db.overlays(run["cell_id"])
        s = db.image_scores(run["cell_id"])
    order = np.argsort(-s["scores"])
    top_defects = [s["paths"][i] for i in order if s["labels"][i] == 1][:2]
    top_good = [s["paths"][i] for i in order if s["labels"][i] == 0][:2]
    assert [o.path for o in overlays if o.kind == "defect"] == top_defects
    assert [o.path for o in overlays if o.kind == "false_alarm"] == top_good
    assert top_good[0] == "mem://flat/09.png"  # the hot pixel
    img = np.asarray(Image.open(io.BytesIO(overlays[0].png)))
    assert img.shape == (128, 128 + 4 + 128, 3)  # [photo | gap | overlay], tiny inputs enlarged to 128


def test_failing_cell_is_recorded_and_the_grid_goes_on(tmp_path):
    summary = run_benchmark(cfg(["test_bench_fail", "test_pixel_zscore"]), tmp_path / "r.db", progress=False)
    assert summary.ran == 4 and len(summary.failed) == 2
    with ResultsDB(tmp_path / "r.db") as db:
        runs = db.runs()
        failed = [r for r in runs if r["status"] == "failed"]
        assert {r["method"] for r in failed} == {"test_bench_fail"}
        assert all(r["error"] == "RuntimeError: deliberate failure in fit (test)" for r in failed)
        assert all("Traceback" in r["traceback"] and "deliberate failure" in r["traceback"] for r in failed)
        assert all(db.image_scores(r["cell_id"])["paths"] == [] for r in failed)
        assert sum(r["status"] == "done" for r in runs) == 2
    # A rerun skips the failed cells unless asked to retry them.
    support.FIT_CALLS.clear()
    again = run_benchmark(cfg(["test_bench_fail", "test_pixel_zscore"]), tmp_path / "r.db", progress=False)
    assert again.ran == 0 and again.skipped == 4 and support.FIT_CALLS == []
    retry = run_benchmark(
        cfg(["test_bench_fail", "test_pixel_zscore"]), tmp_path / "r.db", progress=False, retry_failed=True
    )
    assert retry.ran == 2 and support.FIT_CALLS == ["test_bench_fail/flat", "test_bench_fail/dark"]


def test_keyboard_interrupt_mid_grid_then_resume_loses_nothing(tmp_path, monkeypatch):
    grid = cfg(["test_bench_seeded", "test_bench_interrupt"])
    monkeypatch.setitem(support.INTERRUPT, "on", True)
    support.FIT_CALLS.clear()
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(grid, tmp_path / "r.db", progress=False)
    with ResultsDB(tmp_path / "r.db") as db:
        first = {(r["method"], r["category"]): r for r in db.runs()}
    assert {k: r["status"] for k, r in first.items()} == {
        ("test_bench_seeded", "flat"): "done",
        ("test_bench_interrupt", "flat"): "running",  # the cell that was interrupted
    }
    monkeypatch.setitem(support.INTERRUPT, "on", False)
    support.FIT_CALLS.clear()
    summary = run_benchmark(grid, tmp_path / "r.db", progress=False)
    assert summary.skipped == 1 and summary.ran == 3
    assert "test_bench_seeded/flat" not in support.FIT_CALLS  # the finished cell was not redone
    with ResultsDB(tmp_path / "r.db") as db:
        runs = {(r["method"], r["category"]): r for r in db.runs()}
    assert len(runs) == 4 and all(r["status"] == "done" for r in runs.values())
    kept = runs[("test_bench_seeded", "flat")]
    assert kept["finished"] == first[("test_bench_seeded", "flat")]["finished"]
    assert kept["metrics"] == first[("test_bench_seeded", "flat")]["metrics"]


def test_sigkill_mid_grid_then_resume(tmp_path):
    """A process killed outright (OOM killer, power cut) leaves a usable database."""
    db_path = tmp_path / "r.db"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        import test_bench_support as s
        from iadkit.bench import BenchConfig, run_benchmark
        cfg = BenchConfig.parse(s.grid(["test_bench_seeded", "test_bench_sigkill"]))
        run_benchmark(cfg, {str(db_path)!r}, progress=False)
        """
    )
    env = {**os.environ, "IADKIT_TEST_SIGKILL": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = dict(conn.execute("SELECT method, status FROM runs WHERE category = 'flat'").fetchall())
    conn.close()
    assert rows == {"test_bench_seeded": "done", "test_bench_sigkill": "running"}

    support.FIT_CALLS.clear()
    summary = run_benchmark(cfg(["test_bench_seeded", "test_bench_sigkill"]), db_path, progress=False)
    assert summary.skipped == 1 and summary.ran == 3
    assert support.FIT_CALLS == ["test_bench_sigkill/flat", "test_bench_seeded/dark", "test_bench_sigkill/dark"]
    with ResultsDB(db_path) as db:
        assert sorted(r["status"] for r in db.runs()) == ["done"] * 4


def test_seeds_reach_the_method_and_results_are_deterministic(tmp_path):
    grid = cfg(["test_bench_seeded"], categories=["flat"], seeds=[0, 1])
    run_benchmark(grid, tmp_path / "a.db", progress=False)
    run_benchmark(grid, tmp_path / "b.db", progress=False)
    with ResultsDB(tmp_path / "a.db") as a, ResultsDB(tmp_path / "b.db") as b:
        ra, rb = a.runs(), b.runs()
        sa = [a.image_scores(r["cell_id"])["scores"] for r in ra]
        sb = [b.image_scores(r["cell_id"])["scores"] for r in rb]
    assert [r["metrics"] for r in ra] == [r["metrics"] for r in rb]
    np.testing.assert_array_equal(sa[0], sb[0])
    assert not np.array_equal(sa[0], sa[1])  # seed 0 and seed 1 differ


def test_leaderboard_has_category_rows_and_a_mean_row(tmp_path):
    run_benchmark(cfg(["test_pixel_zscore", "test_bench_seeded", "test_bench_fail"]), tmp_path / "r.db", progress=False)
    with ResultsDB(tmp_path / "r.db") as db:
        runs = db.runs()
    (t,) = [t for t in metric_tables(runs) if t.metric == "image_auroc"]
    assert [label for label, _ in t.rows] == ["tinybench / flat", "tinybench / dark"]
    by = {(r["method"], r["category"]): r["metrics"]["image_auroc"] for r in runs if r["status"] == "done"}
    assert t.mean["test_pixel_zscore"] == pytest.approx(
        (by[("test_pixel_zscore", "flat")] + by[("test_pixel_zscore", "dark")]) / 2
    )
    assert "test_bench_fail" not in t.methods
    console = Console(width=200, record=True, file=io.StringIO())
    for table in leaderboard(runs):
        console.print(table)
    text = console.export_text()
    assert "I-AUROC" in text and "mean" in text and "AUPRO" in text
    assert "columns: tinybench: flat, dark" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("test_pixel_zscore"))
    flat, dark = (by[("test_pixel_zscore", c)] for c in ("flat", "dark"))
    assert row.split()[1:] == [f"{t.mean['test_pixel_zscore']:.3f}", f"{flat:.3f}", f"{dark:.3f}"]


def test_incomplete_mean_is_marked(tmp_path):
    run_benchmark(cfg(["test_pixel_zscore", "test_bench_seeded"]), tmp_path / "r.db", progress=False)
    with ResultsDB(tmp_path / "r.db") as db:
        runs = db.runs()
    runs = [r for r in runs if not (r["method"] == "test_bench_seeded" and r["category"] == "dark")]
    (t,) = [t for t in metric_tables(runs) if t.metric == "image_auroc"]
    assert t.incomplete == {"test_bench_seeded"}


def test_expand_is_what_the_runner_runs(tmp_path):
    grid = cfg(["test_pixel_zscore", "test_bench_seeded"])
    summary = run_benchmark(grid, tmp_path / "r.db", progress=False)
    with ResultsDB(tmp_path / "r.db") as db:
        assert set(db.statuses()) == {c.cell_id for c in expand(grid)} == {c.cell_id for c in summary.cells}


def test_process_workers_store_the_same_results(tmp_path):
    grid = cfg(["test_pixel_zscore", "test_bench_seeded", "test_bench_fail"])
    run_benchmark(grid, tmp_path / "one.db", progress=False)
    summary = run_benchmark(grid, tmp_path / "two.db", progress=False, workers=2)
    assert summary.ran == 6 and len(summary.failed) == 2
    with ResultsDB(tmp_path / "one.db") as a, ResultsDB(tmp_path / "two.db") as b:
        ra = {r["cell_id"]: r for r in a.runs()}
        rb = {r["cell_id"]: r for r in b.runs()}
        assert set(ra) == set(rb)
        for cid, r in ra.items():
            assert (rb[cid]["status"], rb[cid]["metrics"], rb[cid]["error"]) == (r["status"], r["metrics"], r["error"])
            np.testing.assert_array_equal(a.image_scores(cid)["scores"], b.image_scores(cid)["scores"])
