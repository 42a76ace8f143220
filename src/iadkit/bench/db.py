"""The results database: one SQLite file per benchmark, written only by the driver.

Schema (version 4)::

    meta(key TEXT PRIMARY KEY, value TEXT)          -- 'schema_version' = '4', 'created'
    runs(                                           -- one row per cell
        cell_id        TEXT PRIMARY KEY,            -- sha256(identity)[:16], see bench.config.Cell
        method         TEXT NOT NULL,
        params         TEXT NOT NULL,               -- JSON, the method's hyper-parameters as given
        dataset        TEXT NOT NULL,               -- source string, e.g. 'elpv', 'synthetic:./synth'
        dataset_label  TEXT NOT NULL,               -- display name; says "subsample" when one was used
        subsample      TEXT,                        -- JSON {"train": n, "test": n} or NULL
        category       TEXT NOT NULL,
        setting        TEXT NOT NULL,               -- registered setting name, e.g. 'vanilla'
        setting_params TEXT NOT NULL,               -- JSON
        seed           INTEGER NOT NULL,
        image_size     TEXT NOT NULL,               -- JSON [h, w]
        status         TEXT NOT NULL,               -- 'running' | 'done' | 'failed'
        metrics        TEXT,                        -- JSON {"image_auroc": ..., "pixel_auroc": ...}
        timings        TEXT,                        -- JSON {"fit_seconds", "seconds_per_image",
                                                    --   "model_seconds_per_image", "fit_peak_rss_mb",
                                                    --   "peak_rss_mb", ...}
        operating_point TEXT,                       -- JSON {"threshold", "rule", "target_fpr",
                                                    --   "n_calibration", "test_false_alarm_rate",
                                                    --   "test_miss_rate"}; null when no threshold
                                                    --   could be calibrated (schema 2)
        setting_info   TEXT,                        -- JSON, what the setting gave the cell (schema 3):
                                                    --   {"n_good", "n_labelled_anomalous",
                                                    --   "n_calibration", "note"?, "injected"?: [
                                                    --   {"path", "defect_type", "role": "train" |
                                                    --   "calibration", "score", "flagged"}]}; the
                                                    --   noisy setting's disguised defects, scored
                                                    --   by the fitted model
        n_train        INTEGER, n_test INTEGER,
        iadkit_version TEXT NOT NULL,
        host           TEXT,                        -- machine that ran the cell (Ray workers differ)
        error          TEXT,                        -- 'ExceptionType: message' when failed
        traceback      TEXT,
        started        TEXT, finished TEXT          -- ISO-8601 UTC
    )
    scores(                                         -- every test image of every finished cell
        cell_id TEXT NOT NULL REFERENCES runs(cell_id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,                       -- position in the test set
        path TEXT NOT NULL, label INTEGER NOT NULL, -- 0 good, 1 anomalous
        defect_type TEXT NOT NULL, score REAL NOT NULL,
        PRIMARY KEY (cell_id, idx))
    overlays(                                       -- a few rendered heatmaps per cell, for the report
        cell_id TEXT NOT NULL REFERENCES runs(cell_id) ON DELETE CASCADE,
        kind TEXT NOT NULL,                         -- 'defect' (highest-scored anomalous images)
                                                    -- | 'false_alarm' (highest-scored good images)
        rank INTEGER NOT NULL,                      -- 0 = highest score
        path TEXT NOT NULL, label INTEGER NOT NULL, defect_type TEXT NOT NULL, score REAL NOT NULL,
        png BLOB NOT NULL,                          -- [photo + outline | heatmap + outline]
        PRIMARY KEY (cell_id, kind, rank))

    task_metrics(                                   -- the accuracy matrix of a tasks cell (schema 4):
        cell_id   TEXT NOT NULL REFERENCES runs(cell_id) ON DELETE CASCADE,
        step      INTEGER NOT NULL,                 -- row l: after training step l (0-based)
        task      INTEGER NOT NULL,                 -- column j: the task tested (plan order)
        task_name TEXT NOT NULL,                    -- 'fabric', or 'fabric+metal' for a group
        metric    TEXT NOT NULL,                    -- every metric of evaluate(): image_auroc ...
        value     REAL,                             -- NULL when undefined
        PRIMARY KEY (cell_id, step, task, metric))
                                                    -- continual: every task j <= l after each step
                                                    -- (the lower triangle of a[l][j], from which the
                                                    -- report derives the forgetting measure);
                                                    -- multi_class: one step, one task per category;
                                                    -- such a run's `metrics` are the last row's
                                                    -- means over tasks, its scores those of the
                                                    -- final model on every task's test images

    claims(                                         -- which run is working on a 'running' cell
        cell_id    TEXT PRIMARY KEY,
        claimed_by TEXT NOT NULL,                   -- 'host|pid|token' of the claiming run
        heartbeat  TEXT NOT NULL)                   -- ISO-8601 UTC, renewed while the run lives

Several runs may share one database (two ``iadkit benchmark`` processes on the same output):
a run claims a cell in one ``BEGIN IMMEDIATE`` transaction (`ResultsDB.claim`) before it
starts it, and a cell another live run has claimed is left to that run. A claim is live
while its heartbeat is fresh (`STALE_SECONDS`) and, on this machine, its process exists;
a killed run's claims are therefore taken over at once on the same machine and after
`STALE_SECONDS` from another. Recording a result drops the cell's claim in the same
transaction. The claims table is an addition that older readers ignore (schema 2 still).

Per-image scores with labels let any image metric be recomputed later without rerunning
(`image_scores`). Each finished cell is written in one transaction (run row, scores and
overlays together), so a killed benchmark leaves either the whole cell or none of it. The
default rollback journal keeps the database a single file. An older database is migrated
when it is opened for writing: schema 1 gains the `operating_point` column, schema 2 the
`setting_info` column (NULL for the cells run before), schema 3 the `task_metrics` table
(empty for the cells run before; `task_matrix` reads an older file opened read-only as
having none). Opened for reading only
(``writable=False``, what the report does), the file is never modified, and a file that is
not an iadkit results database is refused.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import iadkit
from iadkit.bench.config import Cell, canonical_json
from iadkit.errors import IadkitError

SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    cell_id TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    params TEXT NOT NULL,
    dataset TEXT NOT NULL,
    dataset_label TEXT NOT NULL,
    subsample TEXT,
    category TEXT NOT NULL,
    setting TEXT NOT NULL,
    setting_params TEXT NOT NULL,
    seed INTEGER NOT NULL,
    image_size TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    metrics TEXT,
    timings TEXT,
    operating_point TEXT,
    setting_info TEXT,
    n_train INTEGER,
    n_test INTEGER,
    iadkit_version TEXT NOT NULL,
    host TEXT,
    error TEXT,
    traceback TEXT,
    started TEXT,
    finished TEXT
);
CREATE TABLE IF NOT EXISTS scores (
    cell_id TEXT NOT NULL REFERENCES runs(cell_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    path TEXT NOT NULL,
    label INTEGER NOT NULL,
    defect_type TEXT NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (cell_id, idx)
);
CREATE TABLE IF NOT EXISTS overlays (
    cell_id TEXT NOT NULL REFERENCES runs(cell_id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('defect', 'false_alarm')),
    rank INTEGER NOT NULL,
    path TEXT NOT NULL,
    label INTEGER NOT NULL,
    defect_type TEXT NOT NULL,
    score REAL NOT NULL,
    png BLOB NOT NULL,
    PRIMARY KEY (cell_id, kind, rank)
);
CREATE TABLE IF NOT EXISTS task_metrics (
    cell_id TEXT NOT NULL REFERENCES runs(cell_id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    task INTEGER NOT NULL,
    task_name TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (cell_id, step, task, metric)
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
CREATE TABLE IF NOT EXISTS claims (
    cell_id TEXT PRIMARY KEY,
    claimed_by TEXT NOT NULL,
    heartbeat TEXT NOT NULL
);
"""

STALE_SECONDS = 120.0
"""A claim whose heartbeat is older than this is abandoned (its run hangs or died elsewhere)."""

HEARTBEAT_SECONDS = 20.0
"""How often a running benchmark renews its claims."""


class ResultsDBError(IadkitError, ValueError):
    """A results database cannot be opened or is from a newer iadkit."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Claimant:
    """Who runs cells: a benchmark run, identified by machine, process and a random token
    (two runs in one process, one after the other, are different claimants)."""

    host: str
    pid: int
    token: str

    @classmethod
    def here(cls) -> Claimant:
        return cls(socket.gethostname(), os.getpid(), secrets.token_hex(6))

    @property
    def id(self) -> str:
        return f"{self.host}|{self.pid}|{self.token}"

    @classmethod
    def parse(cls, text: str) -> Claimant | None:
        parts = str(text).rsplit("|", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def claim_is_live(claimed_by: str, heartbeat: str, *, me: Claimant | None = None, now: datetime | None = None) -> bool:
    """Whether a claim still belongs to a running benchmark (see the module docstring)."""
    owner = Claimant.parse(claimed_by)
    if owner is None:
        return False
    try:
        age = ((now or datetime.now(UTC)) - datetime.fromisoformat(heartbeat)).total_seconds()
    except (TypeError, ValueError):
        return False
    if age > STALE_SECONDS:
        return False
    if owner.host == socket.gethostname():
        if owner.pid == os.getpid():  # an earlier run in this process (runs here are sequential)
            return me is not None and owner == me
        return _pid_alive(owner.pid)
    return True


@dataclass
class Overlay:
    kind: str  # 'defect' | 'false_alarm'
    rank: int
    path: str
    label: int
    defect_type: str
    score: float
    png: bytes = field(repr=False)


@dataclass
class TaskEvaluation:
    """One entry of a tasks cell's accuracy matrix: every metric of task `task` (column)
    after training step `step` (row)."""

    step: int
    task: int
    task_name: str
    metrics: dict[str, float]


@dataclass
class TaskMatrix:
    """A tasks cell's accuracy matrix, read back: `values[metric]` is [steps, tasks] with NaN
    where a task was not tested (not yet learned) or the metric is undefined."""

    tasks: list[str]
    n_steps: int
    values: dict[str, np.ndarray]

    def metric(self, name: str) -> np.ndarray:
        return self.values.get(name, np.full((self.n_steps, len(self.tasks)), np.nan))


@dataclass
class CellResult:
    """What a worker sends back to the driver: everything the database stores for a cell."""

    cell: Cell
    status: str  # 'done' | 'failed'
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    operating_point: dict[str, Any] | None = None
    setting_info: dict[str, Any] | None = None
    n_train: int | None = None
    n_test: int | None = None
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    overlays: list[Overlay] = field(default_factory=list)
    task_matrix: list[TaskEvaluation] = field(default_factory=list)  # tasks cells only
    error: str | None = None
    traceback: str | None = None
    started: str | None = None
    finished: str | None = None
    host: str | None = None
    iadkit_version: str = iadkit.__version__


def _json_or_none(v: Any) -> str | None:
    return None if v is None else canonical_json(v)


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: an undefined metric is stored as null."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, (float, np.floating)) and not np.isfinite(v):
            out[k] = None
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out


class ResultsDB:
    """Open (or create) a results database. Use as a context manager or call `close()`."""

    def __init__(self, path: str | Path, *, create: bool = True, writable: bool = True) -> None:
        self.path = Path(path)
        if (not create or not writable) and not self.path.is_file():
            raise ResultsDBError(f"{self.path}: no such results database (run `iadkit benchmark` first)")
        try:
            if writable:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.conn = sqlite3.connect(self.path, timeout=30.0)
            else:
                self.conn = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True, timeout=30.0)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA foreign_keys = ON")
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if (tables and not {"meta", "runs"} <= tables) or (not writable and not tables):
                raise ResultsDBError(
                    f"{self.path}: not an iadkit results database (it holds tables: {', '.join(sorted(tables)) or 'none'})"
                )
            if writable:
                with self.conn:
                    self.conn.executescript(_SCHEMA)
                    if self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() is None:
                        # OR IGNORE: another process may create the same new database at this moment
                        self.conn.execute(
                            "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                        )
                        self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (now_iso(),))
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise ResultsDBError(f"{self.path}: not a usable results database ({exc})") from None
        version = int(row["value"]) if row is not None else SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            self.conn.close()
            raise ResultsDBError(
                f"{self.path}: results schema {version} is newer than this iadkit understands ({SCHEMA_VERSION}); upgrade iadkit"
            )
        if version < SCHEMA_VERSION and writable:
            with self.conn:  # another process may be migrating the same file: add what is missing
                columns = {r[1] for r in self.conn.execute("PRAGMA table_info(runs)")}
                if "operating_point" not in columns:  # schema 1 -> 2: the operating point of each cell
                    self.conn.execute("ALTER TABLE runs ADD COLUMN operating_point TEXT")
                if "setting_info" not in columns:  # schema 2 -> 3: what the setting gave each cell
                    self.conn.execute("ALTER TABLE runs ADD COLUMN setting_info TEXT")
                # schema 3 -> 4: the task_metrics table, created above with the other tables
                self.conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultsDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.conn:
            yield self.conn

    # -- writing -----------------------------------------------------------------------------
    def _run_values(self, cell: Cell) -> dict[str, Any]:
        return {
            "cell_id": cell.cell_id,
            "method": cell.method,
            "params": canonical_json(cell.params),
            "dataset": cell.dataset,
            "dataset_label": cell.dataset_label,
            "subsample": _json_or_none(cell.subsample),
            "category": cell.category,
            "setting": cell.setting,
            "setting_params": canonical_json(cell.setting_params),
            "seed": cell.seed,
            "image_size": canonical_json(list(cell.image_size)),
        }

    def mark_running(self, cell: Cell, started: str | None = None) -> None:
        """Note that a cell started. A row left 'running' means the run was killed: rerun it."""
        with self.conn:
            self._insert_running(cell, started or now_iso())

    def _insert_running(self, cell: Cell, started: str) -> None:
        values = {
            **self._run_values(cell),
            "status": "running",
            "iadkit_version": iadkit.__version__,
            "started": started,
        }
        cols = ", ".join(values)
        self.conn.execute("DELETE FROM runs WHERE cell_id = ?", (cell.cell_id,))
        self.conn.execute(f"INSERT INTO runs ({cols}) VALUES ({', '.join('?' * len(values))})", list(values.values()))

    def claim(self, cell: Cell, me: Claimant, *, retry_failed: bool = False) -> bool:
        """Take `cell` for run `me`, atomically; False when it is not to be run by `me`.

        Not taken: a 'done' cell; a 'failed' one unless `retry_failed`; a cell whose claim
        belongs to another live run. Taken: anything else (new, left 'running' by a dead
        run, or failed and retried); its row becomes 'running'.
        """
        self.conn.execute("BEGIN IMMEDIATE")  # one writer decides at a time
        try:
            row = self.conn.execute("SELECT status, finished FROM runs WHERE cell_id = ?", (cell.cell_id,)).fetchone()
            if row is not None and row["status"] == "done":
                return self._end(False)
            if row is not None and row["status"] == "failed" and not retry_failed:
                return self._end(False)
            held = self.conn.execute(
                "SELECT claimed_by, heartbeat FROM claims WHERE cell_id = ?", (cell.cell_id,)
            ).fetchone()
            if (
                held is not None
                and held["claimed_by"] != me.id
                and claim_is_live(held["claimed_by"], held["heartbeat"], me=me)
            ):
                return self._end(False)
            stamp = now_iso()
            self.conn.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)", (cell.cell_id, me.id, stamp))
            self._insert_running(cell, stamp)
            return self._end(True)
        except BaseException:
            self.conn.rollback()
            raise

    def _end(self, value: bool) -> bool:
        self.conn.commit()
        return value

    def heartbeat(self, me: Claimant) -> None:
        """Renew `me`'s claims (called periodically while a run lives)."""
        with self.conn:
            self.conn.execute("UPDATE claims SET heartbeat = ? WHERE claimed_by = ?", (now_iso(), me.id))

    def release(self, me: Claimant) -> None:
        """Drop `me`'s remaining claims (an interrupted cell stays 'running', free for any run)."""
        with self.conn:
            self.conn.execute("DELETE FROM claims WHERE claimed_by = ?", (me.id,))

    def claimed_elsewhere(self, me: Claimant) -> dict[str, str]:
        """cell_id -> claimant of the unfinished cells other live runs hold."""
        rows = self.conn.execute(
            "SELECT c.cell_id, c.claimed_by, c.heartbeat FROM claims c JOIN runs r USING (cell_id) WHERE r.status = 'running'"
        ).fetchall()
        return {
            r["cell_id"]: r["claimed_by"]
            for r in rows
            if r["claimed_by"] != me.id and claim_is_live(r["claimed_by"], r["heartbeat"], me=me)
        }

    def record(self, result: CellResult) -> None:
        """Store a finished cell (done or failed) with its scores and overlays, atomically."""
        cell = result.cell
        values = {
            **self._run_values(cell),
            "status": result.status,
            "metrics": canonical_json(_finite(result.metrics)),
            "timings": canonical_json(_finite(result.timings)),
            "operating_point": _json_or_none(_finite(result.operating_point) if result.operating_point else None),
            "setting_info": _json_or_none(result.setting_info),
            "n_train": result.n_train,
            "n_test": result.n_test,
            "iadkit_version": result.iadkit_version,
            "host": result.host,
            "error": result.error,
            "traceback": result.traceback,
            "started": result.started,
            "finished": result.finished or now_iso(),
        }
        cols = ", ".join(values)
        with self.conn:
            # Deleting the run cascades to its old scores and overlays (a retried cell).
            self.conn.execute("DELETE FROM runs WHERE cell_id = ?", (cell.cell_id,))
            self.conn.execute("DELETE FROM claims WHERE cell_id = ?", (cell.cell_id,))
            self.conn.execute(
                f"INSERT INTO runs ({cols}) VALUES ({', '.join('?' * len(values))})", list(values.values())
            )
            self.conn.executemany(
                "INSERT INTO scores (cell_id, idx, path, label, defect_type, score) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (cell.cell_id, i, p, int(lab), d or "", float(s))
                    for i, (p, lab, d, s) in enumerate(
                        zip(result.paths, result.labels, result.defect_types, result.scores)
                    )
                ],
            )
            self.conn.executemany(
                "INSERT INTO task_metrics (cell_id, step, task, task_name, metric, value) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        cell.cell_id,
                        int(e.step),
                        int(e.task),
                        e.task_name,
                        k,
                        None if v is None or not np.isfinite(v) else float(v),
                    )
                    for e in result.task_matrix
                    for k, v in sorted(e.metrics.items())
                ],
            )
            self.conn.executemany(
                "INSERT INTO overlays (cell_id, kind, rank, path, label, defect_type, score, png) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        cell.cell_id,
                        o.kind,
                        o.rank,
                        o.path,
                        int(o.label),
                        o.defect_type or "",
                        float(o.score),
                        sqlite3.Binary(o.png),
                    )
                    for o in result.overlays
                ],
            )

    # -- reading -----------------------------------------------------------------------------
    def statuses(self) -> dict[str, str]:
        return {r["cell_id"]: r["status"] for r in self.conn.execute("SELECT cell_id, status FROM runs")}

    def runs(self, status: str | None = None) -> list[dict[str, Any]]:
        """Run rows with JSON columns decoded (metrics with null -> NaN)."""
        q = "SELECT * FROM runs" + (" WHERE status = ?" if status else "") + " ORDER BY rowid"
        rows = []
        for r in self.conn.execute(q, (status,) if status else ()):
            d = dict(r)
            for key in ("params", "setting_params", "image_size", "subsample"):
                d[key] = self._json(d, key) if d[key] is not None else None
            for key in ("metrics", "timings"):
                raw = self._json(d, key) if d[key] else {}
                if not isinstance(raw, dict):
                    raise self._corrupt(d, key, "not a JSON object")
                d[key] = {k: (float("nan") if v is None else v) for k, v in raw.items()}
            d["operating_point"] = self._json(d, "operating_point") if d.get("operating_point") else None
            # absent from an old database opened read-only
            d["setting_info"] = self._json(d, "setting_info") if d.get("setting_info") else None
            rows.append(d)
        return rows

    def _json(self, row: dict[str, Any], key: str) -> Any:
        try:
            return json.loads(row[key])
        except (TypeError, ValueError) as exc:
            raise self._corrupt(row, key, f"invalid JSON: {exc}") from None

    def _corrupt(self, row: dict[str, Any], key: str, why: str) -> ResultsDBError:
        return ResultsDBError(
            f"{self.path}: the {key} of cell {row.get('cell_id')} ({row.get('method')}, {row.get('category')}) is {why}; "
            "the database was edited or damaged: delete that row (its cell reruns with the next `iadkit benchmark`) "
            "or use an intact copy"
        )

    def image_scores(self, cell_id: str) -> dict[str, Any]:
        """Per-image arrays of one cell, in test-set order: paths, labels, defect_types, scores."""
        rows = self.conn.execute(
            "SELECT path, label, defect_type, score FROM scores WHERE cell_id = ? ORDER BY idx", (cell_id,)
        ).fetchall()
        return {
            "paths": [r["path"] for r in rows],
            "labels": np.array([r["label"] for r in rows], dtype=np.int64),
            "defect_types": [r["defect_type"] for r in rows],
            "scores": np.array([r["score"] for r in rows], dtype=np.float64),
        }

    def task_matrix(self, cell_id: str) -> TaskMatrix | None:
        """The accuracy matrix of a tasks cell (continual, multi_class); None for any other
        cell, and for every cell of a database older than schema 4."""
        has_table = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'task_metrics'"
        ).fetchone()
        if has_table is None:
            return None
        rows = self.conn.execute(
            "SELECT step, task, task_name, metric, value FROM task_metrics WHERE cell_id = ? ORDER BY step, task, metric",
            (cell_id,),
        ).fetchall()
        if not rows:
            return None
        n_tasks = 1 + max(r["task"] for r in rows)
        n_steps = 1 + max(r["step"] for r in rows)
        names = [""] * n_tasks
        values: dict[str, np.ndarray] = {}
        for r in rows:
            names[r["task"]] = r["task_name"]
            grid = values.setdefault(r["metric"], np.full((n_steps, n_tasks), np.nan))
            grid[r["step"], r["task"]] = np.nan if r["value"] is None else float(r["value"])
        return TaskMatrix(tasks=names, n_steps=n_steps, values=values)

    def overlays(self, cell_id: str) -> list[Overlay]:
        rows = self.conn.execute(
            "SELECT kind, rank, path, label, defect_type, score, png FROM overlays WHERE cell_id = ? ORDER BY kind, rank",
            (cell_id,),
        ).fetchall()
        return [
            Overlay(r["kind"], r["rank"], r["path"], r["label"], r["defect_type"], r["score"], bytes(r["png"]))
            for r in rows
        ]

    def meta(self) -> dict[str, str]:
        return {r["key"]: r["value"] for r in self.conn.execute("SELECT key, value FROM meta")}

    def set_meta(self, key: str, value: str) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
