"""Progress bars for long work (feature extraction, training epochs, benchmark cells).

Thin wrappers over rich so every method shows the same kind of bar, with the current loss
where there is one. Bars go to stderr and disappear when the output is not a terminal
unless forced, so logs and tests stay clean.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

_console = Console(stderr=True)


def _progress(transient: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_console,
        transient=transient,
        disable=not sys.stderr.isatty(),
    )


def track(iterable: Iterable[T], *, total: int | None = None, description: str = "working") -> Iterator[T]:
    """Iterate with a progress bar (shown only on a terminal)."""
    with _progress() as progress:
        task = progress.add_task(description, total=total, status="")
        for item in iterable:
            yield item
            progress.advance(task)


class StepBar:
    """A bar you advance by hand and annotate (e.g. with the running loss)."""

    def __init__(self, progress: Progress, task_id: int) -> None:
        self._progress = progress
        self._task = task_id

    def advance(self, n: int = 1, **status: float | str) -> None:
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in status.items())
        self._progress.update(self._task, advance=n, status=text)


@contextmanager
def step_bar(total: int, description: str, *, enabled: bool = True) -> Iterator[StepBar]:
    """`with step_bar(epochs * batches, "stfpm") as bar: ... bar.advance(loss=l)`."""
    progress = _progress()
    if not enabled:
        progress.disable = True
    with progress:
        yield StepBar(progress, progress.add_task(description, total=total, status=""))
