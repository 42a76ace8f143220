"""The benchmark runner: expand the grid, skip finished cells, run the rest, store each result.

One cell = fit one method on one category's training images (as shaped by the setting),
evaluate it on the test images with the full metric suite, time it, measure its memory and
render a few heatmaps for the report. Cells are independent: a worker gets a `Cell` (plain
data) and returns a `CellResult` (plain data), so the same function runs in-process or as a
Ray task, and only the driver writes the database.

Resuming: the driver marks a cell 'running' before it starts and replaces that row with the
finished result in one transaction. A rerun skips cells that are 'done' (and 'failed' ones
unless `retry_failed`), and reruns cells left 'running' by a killed run. An exception inside
a cell becomes a 'failed' row with its traceback; KeyboardInterrupt and SystemExit are not
caught, because they mean "stop", and the interrupted cell simply stays 'running'.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iadkit.bench.config import BenchConfig, Cell, expand, import_modules
from iadkit.bench.db import CellResult, Overlay, ResultsDB, TaskEvaluation, now_iso
from iadkit.errors import CalibrationWarning, IadkitError

log = logging.getLogger(__name__)

StageCallback = Callable[[str], None]

# Keep the last loaded split: the grid runs every method on one category in a row.
_split_cache: dict[tuple[str, str, str], tuple[list[Any], list[Any]]] = {}


class CellError(IadkitError, RuntimeError):
    """A cell cannot run as configured (e.g. the setting left no training images)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _load_split_cached(cell: Cell, category: str | None = None) -> tuple[list[Any], list[Any]]:
    """The (train, test) of the cell's category (or of `category`, one of a tasks cell's)
    before the setting. The splits of one dataset stay cached for the next cells (the grid
    runs every method on one category, then a tasks cell over all of them)."""
    from iadkit.bench.config import canonical_json
    from iadkit.bench.datasets import load_split

    category = cell.category if category is None else category
    key = (cell.dataset, category, canonical_json([cell.subsample, cell.dataset_options]))
    if key not in _split_cache:
        if any(k[0] != key[0] or k[2] != key[2] for k in _split_cache):
            _split_cache.clear()  # another dataset: let the previous one go
        _split_cache[key] = load_split(cell.dataset, category, cell.subsample, cell.dataset_options)
    train, test = _split_cache[key]
    return list(train), list(test)


def method_params(cell: Cell) -> dict[str, Any]:
    """The cell's hyper-parameters; a method gets the cell's seed unless the config fixes it,
    so that the grid's seeds really vary the method."""
    params = dict(cell.params)
    params.setdefault("seed", cell.seed)
    return params


TARGET_FPR = 0.01


def run_cell(cell: Cell, *, on_stage: StageCallback | None = None) -> CellResult:
    """Fit (as users do: `Model.fit`, with a calibration hold-out that sets the threshold),
    evaluate and render one cell. Never raises for an ordinary error: returns 'failed'.
    A cell of a tasks setting (continual, multi_class) runs its task plan (`run_task_cell`)."""
    from iadkit.evaluation import evaluate
    from iadkit.methods import get_method
    from iadkit.metrics.efficiency import PeakMemory, Timer
    from iadkit.model import Model
    from iadkit.settings import apply_setting, check_combination, setting_kind

    try:
        import_modules(cell.imports)
        spans_categories = setting_kind(cell.setting) == "tasks"
    except Exception:  # reported as the cell's failure below
        spans_categories = False
    if spans_categories:
        return run_task_cell(cell, on_stage=on_stage)

    def stage(name: str) -> None:
        if on_stage is not None:
            on_stage(name)

    result = CellResult(cell=cell, status="failed", started=now_iso(), host=socket.gethostname())
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        import_modules(cell.imports)
        seed_everything(cell.seed)
        stage("load data")
        train, test = _load_split_cached(cell)
        train, test = apply_setting(cell.setting, train, test, seed=cell.seed, params=cell.setting_params)
        zero_shot = getattr(get_method(cell.method), "supervision", "") == "zero-shot"
        if not train and not zero_shot:
            raise CellError(f"{cell.describe()}: the setting left no training images")
        if not test:
            raise CellError(f"{cell.describe()}: the setting left no test images")
        stage("fit")
        model = Model.create(cell.method, image_size=cell.image_size, **method_params(cell))
        note = check_combination(cell.setting, model.detector, train)
        if note:  # said here, once per cell; the training set below no longer needs it said
            log.info("%s: %s", cell.describe(), note)
        fit_train, calibration = training_and_calibration(model, train, cell.seed)
        model.to(resolve_device(cell.device))
        with PeakMemory() as fit_memory, Timer() as fit_timer, warnings.catch_warnings():
            # A coarse calibration is recorded with the cell (operating_point.n_calibration)
            # and shown in the report; a warning per cell would only flood the log.
            warnings.simplefilter("ignore", CalibrationWarning)
            model.fit(
                fit_train,
                calibration=calibration,
                calibration_fraction=None if calibration else 0.0,
                target_fpr=TARGET_FPR,
                seed=cell.seed,
                progress=False,
            )
        result.n_train, result.n_test = int(model.info["n_train"]), len(test)
        result.setting_info = setting_info(model, train, fit_train, calibration, note, cell.batch_size)
        model.info.update(dataset=cell.dataset, category=cell.category)
        stage("evaluate")
        evaluation = evaluate(model, test, batch_size=cell.batch_size, keep_maps=cell.gallery_size > 0)
        stage("overlays")
        result.overlays = render_gallery(model, test, evaluation, cell.gallery_size)
        result.metrics = dict(evaluation.metrics)
        result.operating_point = operating_point(model, evaluation.labels, evaluation.scores)
        result.timings = {
            "fit_seconds": float(model.info.get("fit_seconds", fit_timer.elapsed)),
            "calibration_seconds": float(model.info.get("calibration_seconds", 0.0)),
            "fit_peak_rss_mb": fit_memory.peak_rss_mb,
            "fit_extra_rss_mb": fit_memory.extra_mb,
            **evaluation.timings,
        }
        if fit_memory.cuda_peak_mb is not None:
            result.timings["fit_peak_cuda_mb"] = fit_memory.cuda_peak_mb
        result.paths = list(evaluation.paths)
        result.labels = [int(v) for v in evaluation.labels]
        result.defect_types = list(evaluation.defect_types)
        result.scores = [float(v) for v in evaluation.scores]
        # The whole cell (data, fit, test, metrics, overlays). CPU seconds add up every
        # thread's time and do not grow when other processes compete for the cores.
        result.timings["cell_seconds"] = time.perf_counter() - wall0
        result.timings["cell_cpu_seconds"] = time.process_time() - cpu0
        result.status = "done"
    except Exception as exc:  # a failed cell is recorded; the grid goes on
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}"
        result.traceback = traceback.format_exc()
        log.debug("cell %s failed", cell.describe(), exc_info=True)
    result.finished = now_iso()
    return result


def run_task_cell(cell: Cell, *, on_stage: StageCallback | None = None) -> CellResult:
    """Run a tasks cell: load every category of the cell, make the setting's task plan, and
    for each training step fit the model (step 0: `Model.fit`; later steps: `partial_fit`
    for a continual method, warm-started `fit` - naive sequential fine-tuning - otherwise),
    then evaluate every task learned so far. Stores the whole accuracy matrix (every metric),
    the last row's means over tasks as the cell's metrics, and the final model's scores and
    gallery over every task's test images. Never raises for an ordinary error."""
    from iadkit.evaluation import EvaluationResult, evaluate
    from iadkit.metrics.efficiency import PeakMemory
    from iadkit.model import Model
    from iadkit.settings import apply_task_setting, check_combination
    from iadkit.settings.tasks import n_steps, step_training, tested_after

    def stage(name: str) -> None:
        if on_stage is not None:
            on_stage(name)

    result = CellResult(cell=cell, status="failed", started=now_iso(), host=socket.gethostname())
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        import_modules(cell.imports)
        seed_everything(cell.seed)
        stage("load data")
        train: list[Any] = []
        test: list[Any] = []
        for category in cell.categories:
            tr, te = _load_split_cached(cell, category)
            # a sample's category names the task it belongs to, whatever the reader wrote
            train += [s if s.category == category else _with_category(s, category) for s in tr]
            test += [s if s.category == category else _with_category(s, category) for s in te]
        tasks = apply_task_setting(cell.setting, train, test, seed=cell.seed, params=cell.setting_params)
        empty = [t.name for t in tasks if not t.train or not t.test]
        if empty:
            raise CellError(f"{cell.describe()}: task(s) {', '.join(empty)} have no good training or no test images")
        model = Model.create(cell.method, image_size=cell.image_size, **method_params(cell))
        detector = model.detector
        note = check_combination(cell.setting, detector, train)
        steps = n_steps(tasks)
        if steps == 1:
            training = "one model on the union of the tasks"
        elif detector.continual:
            training = "continual (partial_fit per task)"
        else:
            training = "sequential fine-tuning (fit with warm_start per task: the forgetting baseline)"
        model.to(resolve_device(cell.device))
        fit_seconds, calibration_seconds, peak_fit = 0.0, 0.0, 0.0
        n_calibration = 0
        final: dict[int, EvaluationResult] = {}
        for step in range(steps):
            stage(f"fit step {step + 1}/{steps}")
            fit_train, calibration = training_and_calibration(model, step_training(tasks, step), cell.seed)
            with PeakMemory() as fit_memory, warnings.catch_warnings():
                warnings.simplefilter("ignore", CalibrationWarning)
                kwargs: dict[str, Any] = dict(
                    calibration=calibration,
                    calibration_fraction=None if calibration else 0.0,
                    target_fpr=TARGET_FPR,
                    seed=cell.seed,
                    progress=False,
                )
                if step > 0 and detector.continual:
                    model.partial_fit(fit_train, **kwargs)
                else:
                    model.fit(fit_train, warm_start=step > 0, **kwargs)
            fit_seconds += float(model.info.get("fit_seconds", 0.0))
            calibration_seconds += float(model.info.get("calibration_seconds", 0.0)) if calibration else 0.0
            n_calibration = len(calibration or [])
            peak_fit = max(peak_fit, fit_memory.peak_rss_mb)
            last = step == steps - 1
            for j in tested_after(tasks, step):
                stage(f"evaluate {tasks[j].name} after step {step + 1}/{steps}")
                ev = evaluate(
                    model, list(tasks[j].test), batch_size=cell.batch_size, keep_maps=last and cell.gallery_size > 0
                )
                result.task_matrix.append(
                    TaskEvaluation(step=step, task=j, task_name=tasks[j].name, metrics=dict(ev.metrics))
                )
                if last:
                    final[j] = ev
        order = sorted(final)
        combined = _concatenate(model, [final[j] for j in order])
        finals = [final[j].metrics for j in order]
        keys = list(dict.fromkeys(k for m in finals for k in m))
        # the cell's metrics: the final model's mean over tasks (tasks missing a metric - e.g.
        # no masks - leave it out rather than bias the mean)
        result.metrics = {k: float(np.mean([m[k] for m in finals if k in m])) for k in keys}
        result.n_train, result.n_test = sum(len(t.train) for t in tasks), sum(len(t.test) for t in tasks)
        result.setting_info = {
            "training": training,
            "tasks": [
                {
                    "name": t.name,
                    "categories": list(t.categories),
                    "step": t.step,
                    "n_train": len(t.train),
                    "n_test": len(t.test),
                }
                for t in tasks
            ],
            "n_good": sum(len(t.train) for t in tasks),
            "n_labelled_anomalous": 0,
            "n_calibration": n_calibration,
            "method_multi_class": bool(detector.multi_class),
            "method_continual": bool(detector.continual),
        }
        if note:
            result.setting_info["note"] = note
        model.info.update(dataset=cell.dataset, category=cell.category)
        stage("overlays")
        all_test = [s for j in order for s in tasks[j].test]
        result.overlays = render_gallery(model, all_test, combined, cell.gallery_size)
        result.operating_point = operating_point(model, combined.labels, combined.scores)
        n_eval = max(1, len(combined.scores))
        result.timings = {
            "fit_seconds": fit_seconds,
            "calibration_seconds": calibration_seconds,
            "fit_peak_rss_mb": peak_fit,
            "seconds_per_image": sum(final[j].timings["seconds_per_image"] * len(final[j].scores) for j in order)
            / n_eval,
            "model_seconds_per_image": sum(
                final[j].timings["model_seconds_per_image"] * len(final[j].scores) for j in order
            )
            / n_eval,
            "peak_rss_mb": max(final[j].timings["peak_rss_mb"] for j in order),
        }
        result.paths = list(combined.paths)
        result.labels = [int(v) for v in combined.labels]
        result.defect_types = list(combined.defect_types)
        result.scores = [float(v) for v in combined.scores]
        result.timings["cell_seconds"] = time.perf_counter() - wall0
        result.timings["cell_cpu_seconds"] = time.process_time() - cpu0
        result.status = "done"
    except Exception as exc:  # a failed cell is recorded; the grid goes on
        result.status = "failed"
        result.task_matrix = []
        result.error = f"{type(exc).__name__}: {exc}"
        result.traceback = traceback.format_exc()
        log.debug("cell %s failed", cell.describe(), exc_info=True)
    result.finished = now_iso()
    return result


def _with_category(sample: Any, category: str) -> Any:
    import dataclasses

    return dataclasses.replace(sample, category=category)


def _concatenate(model: Any, parts: list[Any]) -> Any:
    """One evaluation result over several tasks' test sets (for the scores and the gallery)."""
    from iadkit.evaluation import EvaluationResult

    maps = [p.maps for p in parts]
    masks = [p.masks for p in parts]
    return EvaluationResult(
        metrics={},
        paths=[x for p in parts for x in p.paths],
        labels=np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.int64),
        scores=np.concatenate([p.scores for p in parts]) if parts else np.zeros(0),
        defect_types=[x for p in parts for x in p.defect_types],
        maps=np.concatenate(maps) if parts and all(m is not None for m in maps) else None,
        masks=np.concatenate(masks) if parts and all(m is not None for m in masks) else None,
    )


def training_and_calibration(model: Any, train: list[Any], seed: int) -> tuple[list[Any], list[Any] | None]:
    """What `Model.fit` would train and calibrate on by default (the method's usable images;
    10 % of the good ones held out when >= 10 remain), made explicit so that the cell knows
    where each training image went (an injected noisy image may land in the hold-out). A
    zero-shot method gets nothing."""
    from iadkit.model import DEFAULT_CALIBRATION_FRACTION, MIN_TRAIN_FOR_HOLDOUT, split_calibration
    from iadkit.settings import usable_training

    if model.detector.supervision == "zero-shot":
        return [], None
    usable = usable_training(model.detector, train)
    if not usable:
        raise CellError(f"{model.detector.name} needs good training images; the setting left labelled defects only")
    return split_calibration(usable, DEFAULT_CALIBRATION_FRACTION, seed, MIN_TRAIN_FOR_HOLDOUT)


def setting_info(
    model: Any, train: list[Any], fit_train: list[Any], calibration: list[Any] | None, note: str | None, batch_size: int
) -> dict[str, Any]:
    """What the setting gave this cell: the training counts, the combination note, and each
    injected noisy image with the fitted model's score on it (a method that resists the
    noise still scores it as a defect; one that absorbed it scores it like a good part)."""
    from iadkit.settings import injected_noise
    from iadkit.types import ANOMALOUS, GOOD

    info: dict[str, Any] = {
        "n_good": sum(1 for s in train if s.label == GOOD),
        "n_labelled_anomalous": sum(1 for s in train if s.label == ANOMALOUS),
        "n_calibration": len(calibration or []),
    }
    if note:
        info["note"] = note
    injected = injected_noise(train)
    if injected:
        trained_on = {s.path for s in fit_train}
        scores = model.predict(injected, batch_size=batch_size, keep_maps=False).scores
        thr = model.threshold.value if model.threshold is not None else None
        info["injected"] = [
            {
                "path": s.path,
                "defect_type": s.defect_type or "",
                "role": "train" if s.path in trained_on else "calibration",
                "score": float(v),
                "flagged": None if thr is None else bool(v > thr),
            }
            for s, v in zip(injected, scores)
        ]
    return info


def operating_point(model: Any, labels: np.ndarray, scores: np.ndarray) -> dict[str, Any] | None:
    """The calibrated threshold and what it does on the test set: the share of good parts
    flagged (false-alarm rate) and of defective parts passed (miss rate) — a line engineer's
    first question. None when the model has no threshold (too few training images to hold
    any out)."""
    if model.threshold is None:
        return None
    thr = model.threshold
    flagged = scores > thr.value
    good, bad = labels == 0, labels == 1
    return {
        "threshold": thr.value,
        "rule": thr.rule,
        "target_fpr": thr.details.get("target_fpr"),
        "n_calibration": thr.details.get("n_good"),
        "test_false_alarm_rate": float(flagged[good].mean()) if good.any() else float("nan"),
        "test_miss_rate": float((~flagged[bad]).mean()) if bad.any() else float("nan"),
    }


def render_gallery(model: Any, test: list[Any], evaluation: Any, k: int) -> list[Overlay]:
    """Overlays of the k highest-scored defective images and the k highest-scored good ones
    (the worst false alarms), each [photo + ground-truth outline | heatmap + outline],
    coloured on the model's own heat-map range (`viz.model_overlay`)."""
    from iadkit.viz import model_overlay

    if k <= 0 or evaluation.maps is None or len(evaluation.scores) == 0:
        return []
    maps, labels, scores = evaluation.maps, evaluation.labels, evaluation.scores
    out: list[Overlay] = []
    for kind, wanted in (("defect", 1), ("false_alarm", 0)):
        idx = np.flatnonzero(labels == wanted)
        idx = idx[np.argsort(-scores[idx], kind="stable")][:k]
        for rank, i in enumerate(idx):
            sample = test[int(i)]
            mask = evaluation.masks[int(i)] if evaluation.masks is not None else None
            out.append(
                Overlay(
                    kind=kind,
                    rank=rank,
                    path=sample.path,
                    label=int(labels[i]),
                    defect_type=sample.defect_type or "",
                    score=float(scores[i]),
                    png=model_overlay(
                        model, sample, maps[int(i)], mask=mask, with_photo=True, max_side=256, min_side=128
                    ),
                )
            )
    return out


# -- the driver ------------------------------------------------------------------------------
@dataclass
class BenchmarkSummary:
    db_path: Path
    cells: list[Cell]
    ran: int = 0
    skipped: int = 0
    failed: list[CellResult] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.cells)


def plan(cells: list[Cell], db: ResultsDB, *, retry_failed: bool = False) -> tuple[list[Cell], int]:
    """(cells to run, number skipped). 'done' is skipped; 'failed' too unless retried;
    'running' (left by a killed run) and unknown cells run."""
    statuses = db.statuses()
    skip = {"done"} | (set() if retry_failed else {"failed"})
    todo = [c for c in cells if statuses.get(c.cell_id) not in skip]
    return todo, len(cells) - len(todo)


def run_benchmark(
    config: BenchConfig,
    db_path: str | Path,
    *,
    executor: str = "local",
    address: str | None = None,
    retry_failed: bool = False,
    progress: bool | None = None,
    workers: int = 1,
    poll_seconds: float = 2.0,
) -> BenchmarkSummary:
    """Run every unfinished cell of `config` and store the results in `db_path` (SQLite).

    The whole grid is checked first (`validate_grid`): a mistake in any cell stops the run
    before the first cell starts. `workers` > 1 runs that many cells at once in local
    processes (executor "local"). Several runs may work on one database at once: each
    claims a cell before starting it (`ResultsDB.claim`), so they share the grid instead
    of running it twice, and a run whose own cells are finished waits (polling every
    `poll_seconds`) for the cells others still hold, taking over those of a run that died.
    `progress`: None or True shows a bar on a terminal and a plain line per cell otherwise
    (a log file, CI); False shows nothing.
    """
    from iadkit.bench.config import canonical_json
    from iadkit.bench.db import Claimant
    from iadkit.bench.executors import make_executor

    cells = validate_grid(config)
    summary = BenchmarkSummary(db_path=Path(db_path), cells=cells)
    me = Claimant.here()
    ex = make_executor(executor, address=address, workers=workers)  # a wrong executor: before the database
    with ResultsDB(db_path) as db:
        db.set_meta("config", canonical_json(config.model_dump()))
        todo, summary.skipped = plan(cells, db, retry_failed=retry_failed)
        failed_before = sum(1 for s in db.statuses().values() if s == "failed")
        if summary.skipped:
            note = f"{summary.skipped} of {len(cells)} cells already finished: skipped"
            if failed_before and not retry_failed:
                note += f" ({failed_before} failed earlier; use --retry-failed to rerun them)"
            log.info(note)
        # Only cells that had failed before this run are retried, once: not those that fail
        # now, in this run or in a concurrent one.
        retry = {cid for cid, st in db.statuses().items() if st == "failed"} if retry_failed else set()
        heart = _Heartbeat(Path(db_path), me)
        try:
            with CellProgress(len(cells), done=summary.skipped, enabled=progress) as bar:
                waiting_said = False
                while todo:
                    claimed = (c for c in todo if db.claim(c, me, retry_failed=c.cell_id in retry))
                    for result in ex.run(claimed, on_start=bar.start, on_stage=bar.stage):
                        db.record(result)
                        summary.ran += 1
                        if result.status == "failed":
                            summary.failed.append(result)
                            bar.note(f"failed {result.cell.describe()}: {result.error}")
                        bar.finish(result)
                    # What is left is held by other live runs (or was freed by one that died).
                    retry.clear()
                    statuses = db.statuses()
                    todo = [c for c in todo if statuses.get(c.cell_id) not in ("done", "failed")]
                    if todo:
                        if not waiting_said:
                            holders = sorted(set(db.claimed_elsewhere(me).values()))
                            who = (
                                ", ".join(h.replace("|", " pid ", 1).rsplit("|", 1)[0] for h in holders)
                                or "another run"
                            )
                            log.info(
                                "waiting for %d cell(s) that another benchmark run (%s) is working on", len(todo), who
                            )
                            waiting_said = True
                        time.sleep(poll_seconds)
        finally:
            heart.stop()
            db.release(me)
    return summary


def validate_grid(config: BenchConfig) -> list[Cell]:
    """Check every cell of the grid before any runs, and return the cells (`expand`).

    One `BenchConfigError` lists every problem found: unknown method (with the closest
    names), hyper-parameters the method refuses, an image size that is not a positive
    size, an unknown setting or setting parameter, a dataset source that does not exist,
    lacks a listed category or does not take a listed option, an unusable device; then
    what `expand` refuses (the same cell twice).
    """
    import difflib
    import inspect

    from iadkit.bench.config import BenchConfigError, _size
    from iadkit.bench.datasets import list_source_categories
    from iadkit.model import Model, check_device
    from iadkit.settings import get_setting

    import_modules(config.imports)  # plugins register methods, settings and sources
    problems: list[str] = []
    for m in config.methods:
        default = m.image_size if m.image_size is not None else config.image_size
        sizes = {json.dumps(_size_or_raw(m.image_size_for.get(ds.scheme, default))) for ds in config.datasets}
        for size in (json.loads(text) for text in sorted(sizes)):
            try:
                Model.create(m.name, image_size=_size(size), **{"seed": 0, **m.params}).detector.validate()
            except IadkitError as exc:
                problems.append(f"method {m.name} (image size {size}): {exc}")
            except (TypeError, ValueError) as exc:
                problems.append(f"method {m.name}: image size {size!r} is not a size in pixels ({exc})")
    for st in config.settings:
        try:
            inspect.signature(get_setting(st.name)).bind([], [], seed=0, **st.params)
        except IadkitError as exc:
            problems.append(f"setting: {exc}")
        except TypeError as exc:
            problems.append(f"setting {st.name!r}: {exc}")
    for ds in config.datasets:
        try:
            known = list_source_categories(ds.source)
            if ds.options:
                problems.extend(f"dataset {ds.source!r}: {p}" for p in _reader_option_problems(ds.source, ds.options))
        except IadkitError as exc:
            problems.append(f"dataset {ds.source!r}: {exc}")
            continue
        for category in ds.categories or []:
            if category not in known:
                close = difflib.get_close_matches(category, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"dataset {ds.source!r}: no category {category!r}{hint}; it has: {', '.join(known)}")
    problems.extend(_task_setting_problems(config))
    if config.device != "auto":
        try:
            check_device(config.device)
        except IadkitError as exc:
            problems.append(f"device: {exc}")
    if problems:
        unique = list(dict.fromkeys(problems))
        raise BenchConfigError(
            f"the benchmark grid has {len(unique)} problem(s); nothing was run:\n  " + "\n  ".join(unique)
        )
    return expand(config)


def _task_setting_problems(config: BenchConfig) -> list[str]:
    """What the tasks settings (continual, multi_class) refuse, found before any cell runs:
    a task plan the listed categories cannot make (one category, a split that does not add
    up), and a zero-shot method (it learns nothing from tasks)."""
    from iadkit.bench.datasets import list_source_categories
    from iadkit.methods import available_methods
    from iadkit.settings import SettingError, apply_task_setting, get_setting, setting_kind
    from iadkit.types import GOOD, Sample

    problems: list[str] = []
    try:
        spanning = [s for s in config.settings if setting_kind(s.name) == "tasks"]
    except IadkitError:
        return problems  # an unknown setting is reported by validate_grid already
    if not spanning:
        return problems
    methods = available_methods()
    for m in config.methods:
        cls = methods.get(m.name)
        if cls is not None and cls.supervision == "zero-shot":
            names = ", ".join(dict.fromkeys(s.name for s in spanning))
            problems.append(
                f"method {m.name} is zero-shot: it learns nothing from the tasks of setting(s) {names}; run it in vanilla"
            )
    for ds in config.datasets:
        try:
            categories = ds.categories if ds.categories is not None else list_source_categories(ds.source)
        except IadkitError:
            continue  # reported with the dataset
        stand_ins = [Sample(path=f"grid-check://{c}", label=GOOD, category=c) for c in categories]
        for st in spanning:
            get_setting(st.name)
            try:
                variants = st.variants()
            except IadkitError:
                continue  # an empty sweep: reported by expand
            for params in variants:
                try:
                    apply_task_setting(st.name, stand_ins, [], seed=0, params=params)
                except SettingError as exc:
                    problems.append(f"dataset {ds.source!r}: {exc}")
    return problems


def _size_or_raw(size: Any) -> Any:
    return list(size) if isinstance(size, tuple) else size


def _reader_option_problems(source: str, options: dict[str, Any]) -> list[str]:
    from iadkit.data.layouts import _custom, detect_layout, layout_options, parse_source

    if _custom(source) is not None:
        return []
    layout, location = parse_source(source)
    if layout == "auto":
        layout = detect_layout(location)
    allowed = layout_options(layout)
    unknown = sorted(set(options) - set(allowed))
    if not unknown:
        return []
    return [
        f"option(s) {', '.join(unknown)} not understood by the {layout} reader; it accepts: {', '.join(allowed) or 'none'}"
    ]


class _Heartbeat:
    """Renews a run's claims every `HEARTBEAT_SECONDS` from a thread with its own connection,
    so other runs see it is alive even while a long cell holds the main thread."""

    def __init__(self, db_path: Path, me: Any) -> None:
        import threading

        from iadkit.bench.db import HEARTBEAT_SECONDS

        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, args=(db_path, me, HEARTBEAT_SECONDS), name="iadkit-bench-heartbeat", daemon=True
        )
        self._thread.start()

    def _loop(self, db_path: Path, me: Any, every: float) -> None:
        import sqlite3

        while not self._stop.wait(every):
            try:
                with ResultsDB(db_path) as db:
                    db.heartbeat(me)
            except (sqlite3.Error, IadkitError):  # busy: the next beat will do
                continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class CellProgress:
    """Cells done out of the grid and what the current cell is doing: a bar on a terminal,
    a plain line per started and finished cell otherwise (a log file or CI shows progress too).

    `enabled`: None or True as above, False silent.
    """

    def __init__(self, total: int, *, done: int = 0, enabled: bool | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        on = enabled is not False
        self.plain = on and not sys.stderr.isatty()
        self.total, self.done = total, done
        self._t0 = time.perf_counter()
        self._started: dict[str, float] = {}
        self.progress = Progress(
            TextColumn("[bold]benchmark"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[current]}"),
            console=self.console,
            disable=not on or self.plain,
        )
        self.task = self.progress.add_task("benchmark", total=total, completed=done, current="")
        self._current = ""

    def __enter__(self) -> CellProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def _line(self, text: str) -> None:
        print(
            f"benchmark [{self.done}/{self.total}, {time.perf_counter() - self._t0:.0f} s] {text}",
            file=sys.stderr,
            flush=True,
        )

    def start(self, cell: Cell) -> None:
        self._current = cell.describe()
        self._started[cell.cell_id] = time.perf_counter()
        self.progress.update(self.task, current=self._current)
        if self.plain:
            self._line(f"started {self._current}")

    def stage(self, cell: Cell, name: str) -> None:
        self.progress.update(self.task, current=f"{cell.describe()} · {name}")

    def note(self, text: str) -> None:
        if self.plain:
            self._line(text)
        elif not self.progress.disable:
            self.progress.console.print(text, highlight=False, markup=False)

    def finish(self, result: CellResult) -> None:
        self.done += 1
        self.progress.update(self.task, advance=1)
        if self.plain:
            took = time.perf_counter() - self._started.pop(result.cell.cell_id, time.perf_counter())
            self._line(f"{result.status} {result.cell.describe()} in {took:.1f} s")
