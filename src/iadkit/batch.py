"""Batch prediction: score a folder's worth of image files, write the results as they come.

``predict_folder(model, files, out)`` is what ``iadkit predict`` runs, in this process or as
Ray tasks over shards of the files. It is built for a production line's folders of
thousands of images:

- results are written incrementally: ``predictions.csv`` grows batch by batch (flushed), so
  an interrupted run keeps what it scored, and ``resume=True`` skips files already in it;
  ``predictions.json`` is written (atomically) at the end;
- a file that cannot be read, or whose score is not a finite number, gets a row with its
  ``error`` and no verdict; the other files are scored; `BatchResult.failed` lists them;
- overlays (heat map over the image as the model saw it, on the model's colour range) are
  written next to the results, one PNG per image.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iadkit.errors import ExecutorError, IadkitError, InvalidParameterError
from iadkit.files import atomic_write_text, check_writable_dir

FIELDS = ["path", "score", "anomalous", "overlay", "error"]


@dataclass
class BatchResult:
    """Rows in the order of the files: path, score, anomalous (None without a threshold or on
    error), overlay (PNG path or None), error (None when scored)."""

    rows: list[dict[str, Any]]
    out: Path | None = None
    skipped: int = 0  # rows kept from an earlier run (resume)
    threshold: float | None = None
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_flagged(self) -> int:
        return sum(1 for r in self.rows if r["anomalous"])


def score_files(
    model: Any, files: Sequence[str], *, batch_size: int = 16, threshold: float | None = None, keep_maps: bool = False
) -> Iterator[tuple[list[dict[str, Any]], list[np.ndarray | None]]]:
    """Score `files` batch by batch: yields (rows, maps) per batch. A batch that fails is
    rescored file by file, so one unreadable image costs only its own row. A transductive
    model (scores relative to the other images: MuSc) scores all `files` as one batch."""
    thr = threshold if threshold is not None else (model.threshold.value if model.threshold else None)
    if getattr(model.detector, "transductive", False):
        batch_size = max(1, len(files))
    for start in range(0, len(files), batch_size):
        chunk = list(files[start : start + batch_size])
        try:
            result = model.predict(chunk, batch_size=batch_size, keep_maps=keep_maps, threshold=thr)
            parts = [(result, i) for i in range(len(chunk))]
        except (IadkitError, ValueError, OSError):
            parts = []
            for f in chunk:
                try:
                    parts.append((model.predict([f], batch_size=1, keep_maps=keep_maps, threshold=thr), 0))
                except (IadkitError, ValueError, OSError) as exc:
                    parts.append((exc, 0))
        rows: list[dict[str, Any]] = []
        maps: list[np.ndarray | None] = []
        for f, (res, i) in zip(chunk, parts):
            if isinstance(res, Exception):
                rows.append(_row(f, error=str(res)))
                maps.append(None)
                continue
            score = float(res.scores[i])
            if not math.isfinite(score):
                rows.append(_row(f, error=f"the model scored this image {score}: not a number it can judge"))
                maps.append(None)
                continue
            rows.append(_row(f, score=score, anomalous=None if thr is None else bool(score > thr)))
            maps.append(res.maps[i] if res.maps is not None else None)
        yield rows, maps


def _row(
    path: str, *, score: float | None = None, anomalous: bool | None = None, error: str | None = None
) -> dict[str, Any]:
    return {"path": path, "score": score, "anomalous": anomalous, "overlay": None, "error": error}


def read_scored(csv_path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The rows of an earlier run's ``predictions.csv`` that hold a score, by path.

    Rows with an error are left out (they are tried again). A last line without its line
    end (the process was killed while writing it) is left out too: a cut-off score would
    otherwise be read back as a different number.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        return {}
    text = csv_path.read_text(encoding="utf-8", errors="replace")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows: dict[str, dict[str, Any]] = {}
    for r in csv.DictReader(io.StringIO(text, newline="")):
        if r.get("error") or not r.get("path"):
            continue  # failed files are tried again
        try:
            score = float(r["score"])
        except (KeyError, TypeError, ValueError):
            continue
        if not math.isfinite(score):
            continue
        anomalous = {"True": True, "False": False}.get(r.get("anomalous") or "")
        rows[r["path"]] = _row(r["path"], score=score, anomalous=anomalous) | {"overlay": r.get("overlay") or None}
    return rows


def predict_folder(
    model: Any,
    files: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    *,
    batch_size: int = 16,
    threshold: float | None = None,
    overlays: bool = True,
    resume: bool = False,
    executor: str = "local",
    address: str | None = None,
    shards: int | None = None,
    progress: bool = False,
) -> BatchResult:
    """Score image files with a model (a `Model` or a model file path) and write the results.

    Parameters
    ----------
    model : Model or path
        The model, or its file (needed for ``executor="ray"``, which ships the file to workers).
    files : paths
        Image files; rows come back in this order.
    out : folder, optional
        Where ``predictions.csv``, ``predictions.json`` and ``overlays/`` go (created; checked
        writable before any work). None: nothing is written.
    batch_size : int
        Images per forward pass.
    threshold : float, optional
        Overrides the model's stored threshold for the verdicts.
    overlays : bool
        Write a heat-map overlay PNG per image (local executor only).
    resume : bool
        Keep the rows of an earlier ``predictions.csv`` in `out` and score only the files
        it lacks (or that failed).
    executor : {"local", "ray"}
        Score here, or as Ray tasks over `shards` of the files (default: the cluster's CPUs).
    progress : bool
        Show a progress bar (plain lines when not on a terminal).
    """
    from iadkit.model import Model

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidParameterError(f"batch_size must be a positive integer, got {batch_size!r}")
    if threshold is not None:
        from iadkit.thresholds import manual_threshold

        threshold = manual_threshold(threshold).value  # NaN would call every image good
    if executor not in ("local", "ray"):
        raise ExecutorError(f"unknown executor {executor!r}; use 'local' or 'ray'")
    if executor == "local" and address:
        raise ExecutorError("--address is for the Ray executor; use --executor ray")
    names = [str(f) for f in files]
    out_dir = check_writable_dir(out, "output folder") if out is not None else None
    csv_path = out_dir / "predictions.csv" if out_dir else None
    done = read_scored(csv_path) if (resume and csv_path) else {}
    todo = [f for f in names if f not in done]

    if executor == "ray":
        if isinstance(model, Model):
            raise ExecutorError("the Ray executor ships the model file to its workers: pass the model's path")
        from iadkit.methods import get_method
        from iadkit.store import read_manifest

        method = read_manifest(Path(model)).get("method", "")
        if getattr(get_method(method), "transductive", False):
            raise ExecutorError(
                f"{method} scores each image against the other images scored with it, so the files cannot be split "
                "into shards: use --executor local"
            )
        new_rows = _predict_ray(Path(model), todo, batch_size, threshold, address, shards)
        loaded = None
    else:
        loaded = model if isinstance(model, Model) else Model.load(model)
        new_rows = []
    thr = threshold if threshold is not None else (loaded.threshold.value if loaded and loaded.threshold else None)
    if executor == "ray" and threshold is None:
        from iadkit.store import read_manifest

        stored = read_manifest(Path(model)).get("threshold")
        thr = float(stored["value"]) if stored else None
    for row in done.values():  # kept rows are judged by this run's threshold, like the new ones
        row["anomalous"] = None if thr is None else bool(row["score"] > thr)

    writer = _IncrementalCSV(csv_path, list(done.values())) if csv_path else None
    try:
        if executor == "ray":
            if writer:
                writer.write(new_rows)
        else:
            assert loaded is not None
            overlay_dir = out_dir / "overlays" if (out_dir and overlays) else None
            batches = score_files(
                loaded, todo, batch_size=batch_size, threshold=threshold, keep_maps=overlay_dir is not None
            )
            if progress:
                from iadkit.progress import track

                batches = track(batches, total=-(-len(todo) // batch_size), description="predict")
            used: set[str] = {Path(r["overlay"]).stem for r in done.values() if r.get("overlay")}
            for rows, maps in batches:
                if overlay_dir is not None:
                    _write_overlays(loaded, rows, maps, overlay_dir, used)
                new_rows.extend(rows)
                if writer:
                    writer.write(rows)
    finally:
        if writer:
            writer.close()
    by_path = {**done, **{r["path"]: r for r in new_rows}}
    rows = [by_path[f] for f in names]
    if out_dir is not None:
        atomic_write_text(out_dir / "predictions.csv", _csv_text(rows))
        atomic_write_text(out_dir / "predictions.json", json.dumps(rows, indent=1))
    return BatchResult(
        rows=rows, out=out_dir, skipped=len(names) - len(todo), threshold=thr, failed=[r for r in rows if r["error"]]
    )


class _IncrementalCSV:
    """predictions.csv written as rows arrive (flushed per batch); rewritten whole at the end.

    It starts as the header plus the rows kept from an earlier run, written atomically, so
    a kill at any moment leaves at least those rows; new rows are appended after them.
    """

    def __init__(self, path: Path, kept: list[dict[str, Any]]) -> None:
        atomic_write_text(path, _csv_text(kept))
        # open across calls (rows arrive per batch); `close` ends it
        self.f = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        self.writer = csv.DictWriter(self.f, fieldnames=FIELDS)

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.writer.writerows(rows)
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write_overlays(model: Any, rows: list[dict[str, Any]], maps: list[Any], folder: Path, used: set[str]) -> None:
    from iadkit.files import atomic_write_bytes
    from iadkit.viz import model_overlay

    for row, amap in zip(rows, maps):
        if amap is None:
            continue
        name = Path(row["path"]).stem
        while name in used:  # same stem in two folders
            name += "_"
        used.add(name)
        target = folder / f"{name}.png"
        atomic_write_bytes(target, model_overlay(model, row["path"], amap))
        row["overlay"] = str(target)


# -- Ray ----------------------------------------------------------------------------------------
def _predict_shard(
    model_bytes: bytes, files: list[str], batch_size: int, threshold: float | None
) -> list[dict[str, Any]]:
    """One Ray task: load the model from its bytes, score a shard of files (no overlays)."""
    import tempfile

    from iadkit.model import Model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.iad"
        path.write_bytes(model_bytes)
        model = Model.load(path)
    rows: list[dict[str, Any]] = []
    for batch_rows, _ in score_files(model, files, batch_size=batch_size, threshold=threshold):
        rows.extend(batch_rows)
    return rows


def shard(files: Sequence[str], n: int) -> list[list[str]]:
    """Split into at most n contiguous, nearly equal shards (order kept, none empty)."""
    n = max(1, min(int(n), len(files)))
    return [list(part) for part in np.array_split(np.asarray(list(files), dtype=object), n) if len(part)]


def _predict_ray(
    model_path: Path,
    files: list[str],
    batch_size: int,
    threshold: float | None,
    address: str | None,
    shards: int | None,
) -> list[dict[str, Any]]:
    from iadkit.cluster import init_ray
    from iadkit.store import read_manifest

    if not files:
        return []
    read_manifest(model_path)  # a clear error here rather than in every worker
    ray = init_ray(address)
    n = shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
    model_ref = ray.put(model_path.read_bytes())
    remote = ray.remote(num_cpus=1, max_retries=1)(_predict_shard)
    # Workers may run in another folder: send absolute paths, give back the paths as given.
    refs = [
        remote.remote(model_ref, part, batch_size, threshold) for part in shard([os.path.abspath(f) for f in files], n)
    ]
    rows: list[dict[str, Any]] = []
    for part in ray.get(refs):
        rows.extend(part)
    if len(rows) != len(files):
        raise ExecutorError(f"Ray workers returned {len(rows)} rows for {len(files)} files")
    for row, given in zip(rows, files):
        row["path"] = given
    return rows


__all__ = ["BatchResult", "predict_folder", "read_scored", "score_files", "shard"]
