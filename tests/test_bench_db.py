"""The results database: documented schema, atomic writes, NaN handling, version check."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from iadkit.bench.config import Cell
from iadkit.bench.db import SCHEMA_VERSION, CellResult, Overlay, ResultsDB, ResultsDBError

CELL = Cell("m", {"k": 3}, "tinybench", "flat", "vanilla", 0, (16, 16), subsample={"train": 4, "test": None})

COLUMNS = {
    "runs": [
        "cell_id",
        "method",
        "params",
        "dataset",
        "dataset_label",
        "subsample",
        "category",
        "setting",
        "setting_params",
        "seed",
        "image_size",
        "status",
        "metrics",
        "timings",
        "operating_point",
        "setting_info",
        "n_train",
        "n_test",
        "iadkit_version",
        "host",
        "error",
        "traceback",
        "started",
        "finished",
    ],
    "scores": ["cell_id", "idx", "path", "label", "defect_type", "score"],
    "overlays": ["cell_id", "kind", "rank", "path", "label", "defect_type", "score", "png"],
    "meta": ["key", "value"],
    "task_metrics": ["cell_id", "step", "task", "task_name", "metric", "value"],
}


def done_result(**kw) -> CellResult:
    base = dict(
        cell=CELL,
        status="done",
        metrics={"image_auroc": 0.75, "pixel_auroc": float("nan")},
        timings={"fit_seconds": 1.5},
        n_train=4,
        n_test=3,
        paths=["a.png", "b.png", "c.png"],
        labels=[0, 1, 1],
        defect_types=["good", "spot", "spot"],
        scores=[0.1, 0.9, 0.05],
        overlays=[Overlay("defect", 0, "b.png", 1, "spot", 0.9, b"\x89PNG fake")],
        started="2026-01-01T00:00:00+00:00",
    )
    base.update(kw)
    return CellResult(**base)


def test_schema_matches_the_documentation(tmp_path):
    with ResultsDB(tmp_path / "r.db") as db:
        for table, cols in COLUMNS.items():
            assert [r[1] for r in db.conn.execute(f"PRAGMA table_info({table})")] == cols, table
        assert db.meta()["schema_version"] == str(SCHEMA_VERSION)
    import iadkit.bench.db as module

    for table, cols in COLUMNS.items():  # the docstring names every column
        assert f"{table}(" in module.__doc__
        for c in cols:
            assert c in module.__doc__, c


def test_record_and_read_back(tmp_path):
    with ResultsDB(tmp_path / "r.db") as db:
        db.mark_running(CELL)
        assert db.statuses() == {CELL.cell_id: "running"}
        db.record(done_result())
        (run,) = db.runs()
        assert run["status"] == "done" and run["params"] == {"k": 3} and run["image_size"] == [16, 16]
        assert run["subsample"] == {"train": 4, "test": None}
        assert run["dataset_label"] == "tinybench (subsample train≤4)"
        assert run["metrics"]["image_auroc"] == 0.75 and np.isnan(run["metrics"]["pixel_auroc"])
        raw = db.conn.execute("SELECT metrics FROM runs").fetchone()[0]
        assert '"pixel_auroc":null' in raw  # JSON has no NaN
        s = db.image_scores(CELL.cell_id)
        assert s["paths"] == ["a.png", "b.png", "c.png"] and s["labels"].tolist() == [0, 1, 1]
        np.testing.assert_array_equal(s["scores"], [0.1, 0.9, 0.05])
        (o,) = db.overlays(CELL.cell_id)
        assert o.png == b"\x89PNG fake" and o.kind == "defect" and o.score == 0.9


def test_rerecording_a_cell_replaces_its_rows(tmp_path):
    with ResultsDB(tmp_path / "r.db") as db:
        db.record(
            done_result(
                status="failed", metrics={}, paths=[], labels=[], defect_types=[], scores=[], overlays=[], error="X: y"
            )
        )
        db.record(done_result())
        db.record(done_result(scores=[0.2, 0.8, 0.3]))
        assert db.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1
        assert db.conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == 3
        assert db.conn.execute("SELECT COUNT(*) FROM overlays").fetchone()[0] == 1
        np.testing.assert_array_equal(db.image_scores(CELL.cell_id)["scores"], [0.2, 0.8, 0.3])


def test_a_write_that_fails_midway_leaves_nothing_half_done(tmp_path):
    with ResultsDB(tmp_path / "r.db") as db:
        db.mark_running(CELL)
        bad = done_result(overlays=[Overlay("not-a-kind", 0, "b.png", 1, "spot", 0.9, b"x")])
        with pytest.raises(sqlite3.IntegrityError):
            db.record(bad)  # the overlay violates the CHECK after runs and scores were written
        assert db.statuses() == {CELL.cell_id: "running"}  # rolled back to before the write
        assert db.conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == 0


def test_newer_schema_is_refused_and_junk_is_reported(tmp_path):
    path = tmp_path / "r.db"
    with ResultsDB(path) as db:
        db.set_meta("schema_version", str(SCHEMA_VERSION + 1))
    with pytest.raises(ResultsDBError, match="newer"):
        ResultsDB(path)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ResultsDBError, match="not a usable results database"):
        ResultsDB(junk)
    with pytest.raises(ResultsDBError, match="iadkit benchmark"):
        ResultsDB(tmp_path / "missing.db", create=False)


def test_schema_1_database_migrates_in_place_and_reads_read_only(tmp_path):
    """A results database of schema 1 (no operating_point column) is read as it is and gains
    the columns, and the current schema, when opened for writing."""
    path = tmp_path / "old.db"
    old_schema = _SCHEMA_1
    con = sqlite3.connect(path)
    con.executescript(old_schema)
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute(
        "INSERT INTO runs (cell_id, method, params, dataset, dataset_label, category, setting, setting_params, seed, "
        "image_size, status, metrics, timings, iadkit_version) VALUES ('c1', 'm', '{}', 'd', 'd', 'cat', 'vanilla', "
        "'{}', 0, '[16, 16]', 'done', '{\"image_auroc\": 0.5}', '{}', '0.1.0')"
    )
    con.commit()
    con.close()
    before = path.read_bytes()
    with ResultsDB(path, writable=False) as db:
        (run,) = db.runs()
        assert run["operating_point"] is None and run["metrics"]["image_auroc"] == 0.5
    assert path.read_bytes() == before
    with ResultsDB(path) as db:
        assert db.meta()["schema_version"] == str(SCHEMA_VERSION) == "4"
        assert "operating_point" in {r[1] for r in db.conn.execute("PRAGMA table_info(runs)")}
        assert db.runs()[0]["cell_id"] == "c1"


def test_someone_elses_database_is_refused_untouched(tmp_path):
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE customers (id INTEGER)")
    con.commit()
    con.close()
    before = path.read_bytes()
    for writable in (False, True):
        with pytest.raises(ResultsDBError, match="not an iadkit results database"):
            ResultsDB(path, writable=writable)
    assert path.read_bytes() == before
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(ResultsDBError):
        ResultsDB(empty, writable=False)
    assert empty.read_bytes() == b""


_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE runs (
    cell_id TEXT PRIMARY KEY, method TEXT NOT NULL, params TEXT NOT NULL, dataset TEXT NOT NULL,
    dataset_label TEXT NOT NULL, subsample TEXT, category TEXT NOT NULL, setting TEXT NOT NULL,
    setting_params TEXT NOT NULL, seed INTEGER NOT NULL, image_size TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')), metrics TEXT, timings TEXT,
    n_train INTEGER, n_test INTEGER, iadkit_version TEXT NOT NULL, host TEXT, error TEXT, traceback TEXT,
    started TEXT, finished TEXT
);
CREATE TABLE scores (cell_id TEXT NOT NULL, idx INTEGER NOT NULL, path TEXT NOT NULL, label INTEGER NOT NULL,
    defect_type TEXT NOT NULL, score REAL NOT NULL, PRIMARY KEY (cell_id, idx));
CREATE TABLE overlays (cell_id TEXT NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL, path TEXT NOT NULL,
    label INTEGER NOT NULL, defect_type TEXT NOT NULL, score REAL NOT NULL, png BLOB NOT NULL,
    PRIMARY KEY (cell_id, kind, rank));
"""
