"""Faults (issue 14): processes killed at random points, two runs on one output, Ctrl-C.

- A benchmark SIGKILLed at random moments, several times, then rerun: the database holds
  every finished cell exactly once, whole (its scores and overlays with it), and a cell
  finished before a kill is never run again.
- Two benchmark processes on one database: every cell is run exactly once, and the run
  that finishes its own cells waits for the ones the other holds.
- `iadkit predict` SIGKILLed mid-run, then ``--resume``: every image has exactly one row,
  the rows kept are the ones scored before the kill, and the scores equal a clean run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

import _hostile_support as hs
import test_bench_support as bench_support
from iadkit.bench import BenchConfig, ResultsDB, run_benchmark

TESTS_DIR = Path(__file__).parent
SEEDS = [0, 1, 2]
N_TEST = 6  # tinybench: 2 good + 4 defective test images per category
N_OVERLAYS = 4  # gallery 2: the top 2 defects and the 2 worst false alarms


def grid() -> dict:
    g = bench_support.grid(["test_hostile_logged"], seeds=SEEDS)
    g["imports"] = ["test_bench_support", "_hostile_support"]
    return g


def cell_key(line: str) -> str:
    category, seed, _ = line.split()
    return f"{category} {seed}"


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _start_benchmark(db: Path, log: Path, sleep: float) -> subprocess.Popen:
    script = textwrap.dedent(
        f"""
        import _hostile_support
        from iadkit.bench import BenchConfig, run_benchmark
        import test_hostile_faults as t
        run_benchmark(BenchConfig.parse(t.grid()), {str(db)!r}, progress=False, poll_seconds=0.2)
        """
    )
    env = _env(**{hs.FIT_LOG_ENV: str(log), hs.FIT_SLEEP_ENV: str(sleep)})
    return subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll until `predicate()`; False when the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the subprocess")


def check_database(db: Path) -> dict[str, dict]:
    """Integrity, and every 'done' cell whole: JSON that parses, all its scores and overlays.
    Returns the done rows by cell id."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        runs = con.execute("SELECT * FROM runs").fetchall()
        ids = [r["cell_id"] for r in runs]
        assert len(ids) == len(set(ids))
        done = {}
        for r in runs:
            if r["status"] != "done":
                n_scores = con.execute("SELECT COUNT(*) FROM scores WHERE cell_id = ?", (r["cell_id"],)).fetchone()[0]
                assert n_scores == 0, "an unfinished cell has scores"
                continue
            metrics = json.loads(r["metrics"])
            assert 0.0 <= metrics["image_auroc"] <= 1.0 and r["finished"]
            n_scores = con.execute("SELECT COUNT(*) FROM scores WHERE cell_id = ?", (r["cell_id"],)).fetchone()[0]
            n_overlays = con.execute("SELECT COUNT(*) FROM overlays WHERE cell_id = ?", (r["cell_id"],)).fetchone()[0]
            assert (n_scores, n_overlays) == (N_TEST, N_OVERLAYS), f"half-written cell {r['cell_id']}"
            done[r["cell_id"]] = dict(r)
        orphans = con.execute("SELECT COUNT(*) FROM scores WHERE cell_id NOT IN (SELECT cell_id FROM runs)").fetchone()[
            0
        ]
        assert orphans == 0
        return done
    finally:
        con.close()


def _key_of(row: dict) -> str:
    return f"{row['category']} seed={row['seed']}"


def test_benchmark_killed_at_random_points_resumes_with_every_cell_once(tmp_path, monkeypatch):
    db, log = tmp_path / "results.db", tmp_path / "fits.log"
    rng = random.Random(14)
    n_cells = 2 * len(SEEDS)
    finished: dict[str, dict] = {}  # cell id -> its done row, as first seen
    for round_ in range(3):
        fits_before = len(_lines(log))
        left = n_cells - len(finished)
        if left <= 1:
            break
        # Kill after a random number of this run's fits, then a random moment more: inside
        # a fit, in evaluation, while overlays render or while the result is written.
        k = min(rng.randint(1, left - 1), 2)  # at most 2: leaves work for three rounds
        proc = _start_benchmark(db, log, sleep=0.15)
        target = fits_before + k
        reached = _wait_for(lambda: len(_lines(log)) >= target, proc)  # noqa: B023 - called in this iteration
        assert reached, (
            f"the benchmark ended early: {proc.returncode}\n{proc.stderr.read()[-3000:] if proc.stderr else ''}"
        )
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        done = check_database(db)
        for cid, row in finished.items():  # finished cells are never redone nor rewritten
            assert done[cid]["finished"] == row["finished"] and done[cid]["metrics"] == row["metrics"]
        new_fits = [cell_key(line) for line in _lines(log)[fits_before:]]
        assert not {_key_of(r) for r in finished.values()} & set(new_fits), "a finished cell was fitted again"
        finished.update({cid: row for cid, row in done.items() if cid not in finished})
        print(f"round {round_}: killed after {k} fit(s); {len(finished)} of {n_cells} cells finished")
    # The last run, in this process, completes the grid.
    monkeypatch.setenv(hs.FIT_LOG_ENV, str(log))
    monkeypatch.setenv(hs.FIT_SLEEP_ENV, "0")
    fits_before = len(_lines(log))
    summary = run_benchmark(BenchConfig.parse(grid()), db, progress=False)
    done = check_database(db)
    assert len(done) == n_cells and summary.skipped == len(finished) and summary.ran == n_cells - len(finished)
    assert not {_key_of(r) for r in finished.values()} & {cell_key(x) for x in _lines(log)[fits_before:]}
    with ResultsDB(db, writable=False) as rdb:
        assert sorted(r["status"] for r in rdb.runs()) == ["done"] * n_cells
        assert rdb.conn.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0


def test_two_benchmark_processes_run_every_cell_once(tmp_path, monkeypatch):
    """A second run on the same database works on the cells the first has not claimed and
    waits for the ones it holds; nothing is fitted twice."""
    db, log = tmp_path / "results.db", tmp_path / "fits.log"
    other = _start_benchmark(db, log, sleep=0.6)
    try:
        started = _wait_for(lambda: len(_lines(log)) >= 1, other)  # it holds a cell by now
        assert started, other.stderr.read()[-3000:] if other.stderr else ""
        monkeypatch.setenv(hs.FIT_LOG_ENV, str(log))
        monkeypatch.setenv(hs.FIT_SLEEP_ENV, "0.6")
        summary = run_benchmark(BenchConfig.parse(grid()), db, progress=False, poll_seconds=0.1)
        # This run returns only when the whole grid is finished, the other's cells included.
        done = check_database(db)
        assert len(done) == 2 * len(SEEDS)
        assert other.wait(timeout=120) == 0, other.stderr.read()[-3000:] if other.stderr else ""
    finally:
        if other.poll() is None:
            other.kill()
    fits = Counter(cell_key(line) for line in _lines(log))
    assert len(fits) == 2 * len(SEEDS) and set(fits.values()) == {1}, fits
    by_pid = Counter(line.split()[-1] for line in _lines(log))
    print("cells fitted per process:", dict(by_pid))
    assert summary.ran == by_pid[f"pid={os.getpid()}"] and len(by_pid) <= 2
    assert check_database(db).keys() == done.keys()


def test_claims_of_live_and_dead_runs(tmp_path):
    """The claim rules one by one: another live run's cell is left alone, a dead or silent
    run's cell is taken over, a finished cell is never taken."""
    from iadkit.bench import db as dbmod
    from iadkit.bench.config import expand

    cells = expand(BenchConfig.parse(bench_support.grid(["test_pixel_zscore"])))
    me = dbmod.Claimant.here()
    host = dbmod.Claimant.here().host
    live_other = dbmod.Claimant(host, os.getppid(), "other")  # pytest's parent process exists
    dead_other = dbmod.Claimant(host, 2**22 + 12345, "dead")  # beyond pid_max: no such process
    with ResultsDB(tmp_path / "r.db") as rdb:
        assert rdb.claim(cells[0], live_other)
        assert not rdb.claim(cells[0], me)  # held by a live run
        assert rdb.claimed_elsewhere(me) == {cells[0].cell_id: live_other.id}
        rdb.conn.execute("UPDATE claims SET heartbeat = '2000-01-01T00:00:00+00:00'")
        rdb.conn.commit()
        assert rdb.claim(cells[0], me)  # its heartbeat stopped: taken over
        assert rdb.claim(cells[1], dead_other)
        assert rdb.claim(cells[1], me)  # its process is gone: taken over at once
        rdb.release(me)
        assert rdb.conn.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
        assert rdb.statuses() == {cells[0].cell_id: "running", cells[1].cell_id: "running"}  # free for any run


def _predict_cli(model: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [str(model), str(images), "--out", str(out), "--batch-size", "2", "--no-overlays", *extra]


def test_predict_killed_then_resumed_has_every_row_once(tmp_path, monkeypatch):
    from iadkit.batch import predict_folder, read_scored
    from iadkit.cli import main
    from iadkit.data import load_dataset
    from iadkit.model import Model

    tree = hs.mvtec_tree(tmp_path / "data")
    model = Model.create("test_hostile_logged", image_size=24).fit(
        load_dataset(str(tree), category="plate").train, progress=False
    )
    model_path = model.save(tmp_path / "m.iad")
    images = tmp_path / "images"
    hs.write_images(images, 24, seed=9)
    out = tmp_path / "preds"
    script = "import _hostile_support, sys; from iadkit.cli import main; main(['predict', *sys.argv[1:]])"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *_predict_cli(model_path, images, out)],
        env=_env(**{hs.PREDICT_SLEEP_ENV: "0.25"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    k = random.Random(14).randint(2, 18)
    reached = _wait_for(lambda: len(read_scored(out / "predictions.csv")) >= k, proc)
    assert reached, proc.stderr.read()[-3000:] if proc.stderr else ""
    time.sleep(random.Random(15).uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    kept = read_scored(out / "predictions.csv")
    assert k <= len(kept) < 24

    monkeypatch.setenv(hs.PREDICT_SLEEP_ENV, "0")
    with pytest.raises(SystemExit) as exit_:
        main(["predict", *_predict_cli(model_path, images, out, "--resume")])
    assert exit_.value.code == 0
    rows = json.loads((out / "predictions.json").read_text())
    paths = [r["path"] for r in rows]
    assert len(paths) == 24 and len(set(paths)) == 24 and all(r["error"] is None for r in rows)
    csv_rows = read_scored(out / "predictions.csv")
    assert set(csv_rows) == set(paths)
    by_path = {r["path"]: r for r in rows}
    for path, row in kept.items():  # rows scored before the kill are kept as they were
        assert by_path[path]["score"] == row["score"]
    clean = predict_folder(model, sorted(str(p) for p in images.glob("*.png")), None)
    np.testing.assert_allclose(
        [by_path[r["path"]]["score"] for r in clean.rows], [r["score"] for r in clean.rows], rtol=1e-6
    )


def test_benchmark_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    from iadkit.cli import main

    monkeypatch.setitem(bench_support.INTERRUPT, "on", True)
    cfg = tmp_path / "g.yaml"
    cfg.write_text(
        yaml.safe_dump(bench_support.grid(["test_pixel_zscore", "test_bench_interrupt"], categories=["flat"]))
    )
    with pytest.raises(SystemExit) as exit_:
        main(["benchmark", "--config", str(cfg), "--out", str(tmp_path / "out"), "--no-report"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 130 and "finished cells are saved" in text and "run the same command again" in text
    with ResultsDB(tmp_path / "out" / "results.db", writable=False) as rdb:
        assert sorted(r["status"] for r in rdb.runs()) == ["done", "running"]
        assert rdb.conn.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0  # released: free to resume
