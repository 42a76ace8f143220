"""Progress for long work (feature extraction, training epochs, prediction batches).

Thin wrappers over rich so every method shows the same kind of bar, with the current loss
where there is one. On a terminal the bar goes to stderr and disappears when done. When
stderr is not a terminal (a log file, CI, a pipe) a bar would be invisible, so plain lines
are written instead: one per tenth of the work (or per epoch when the caller says how many
steps an epoch has), at most one per `PLAIN_MIN_SECONDS`, and one when the work ends.
Callers that pass ``enabled=False`` (or do not ask for progress) print nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

_console = Console(stderr=True)

PLAIN_MIN_SECONDS = 2.0
"""Fewest seconds between two plain progress lines of one task (the final line always shows)."""


class PlainProgress:
    """The subset of `rich.progress.Progress` used here, writing plain lines to stderr.

    Parameters
    ----------
    step : int, optional
        Write a line whenever this many more units are done (e.g. the batches of an
        epoch); default: every tenth of the total.
    """

    def __init__(self, step: int | None = None) -> None:
        self.disable = False
        self._step = step
        self._tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc and exc[0] is not None:
            return  # an error is reported by whoever catches it; no "done" line
        for task_id, task in self._tasks.items():
            if task["completed"] != task["shown"]:
                self._write(task_id, final=True)

    def add_task(self, description: str, total: int | None = None, **fields: Any) -> int:
        task_id = len(self._tasks)
        step = self._step or (max(1, -(-int(total) // 10)) if total else None)
        self._tasks[task_id] = {
            "description": description,
            "total": total,
            "completed": 0,
            "shown": 0,
            "step": step,
            "start": time.perf_counter(),
            "last": 0.0,
            "status": fields.get("status", ""),
        }
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, advance: float | None = None, **fields: Any) -> None:
        task = self._tasks[task_id]
        if "status" in fields:
            task["status"] = fields["status"]
        if advance:
            task["completed"] += int(advance)
        if self.disable or not advance:
            return
        done, total, step = task["completed"], task["total"], task["step"]
        finished = total is not None and done >= total
        boundary = step is not None and done // step > task["shown"] // step
        due = time.perf_counter() - task["last"] >= PLAIN_MIN_SECONDS
        if finished or (boundary and due) or (step is None and due):
            self._write(task_id, final=finished)

    def _write(self, task_id: int, *, final: bool) -> None:
        if self.disable:
            return
        task = self._tasks[task_id]
        now = time.perf_counter()
        total = task["total"]
        count = f"{task['completed']}/{total}" if total else str(task["completed"])
        pct = f" ({100 * task['completed'] / total:.0f} %)" if total else ""
        status = f"  {task['status']}" if task["status"] else ""
        end = " done" if final else ""
        print(
            f"{task['description']}: {count}{pct}, {now - task['start']:.1f} s{status}{end}",
            file=sys.stderr,
            flush=True,
        )
        task["shown"], task["last"] = task["completed"], now


def _progress(transient: bool = True, *, step: int | None = None) -> Any:  # Progress | PlainProgress
    if not sys.stderr.isatty():
        return PlainProgress(step)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_console,
        transient=transient,
    )


def track(iterable: Iterable[T], *, total: int | None = None, description: str = "working") -> Iterator[T]:
    """Iterate with a progress bar (plain lines when stderr is not a terminal)."""
    with _progress() as progress:
        task = progress.add_task(description, total=total, status="")
        for item in iterable:
            yield item
            progress.advance(task)


class StepBar:
    """A bar you advance by hand and annotate (e.g. with the running loss)."""

    def __init__(self, progress: Any, task_id: Any) -> None:  # Progress | PlainProgress, its task id
        self._progress = progress
        self._task = task_id

    def advance(self, n: int = 1, /, **status: float | str) -> None:
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in status.items())
        self._progress.update(self._task, advance=n, status=text)


@contextmanager
def step_bar(
    total: int, description: str, *, enabled: bool = True, steps_per_epoch: int | None = None
) -> Iterator[StepBar]:
    """`with step_bar(epochs * batches, "stfpm") as bar: ... bar.advance(loss=l)`.

    `steps_per_epoch`: without a terminal, write a line per epoch (default: per tenth).
    """
    progress = _progress(step=steps_per_epoch)
    if not enabled:
        progress.disable = True
    with progress:
        yield StepBar(progress, progress.add_task(description, total=total, status=""))
