"""Where work runs: in this process (``local``), in local worker processes (``local`` with
``workers > 1``) or as Ray tasks (``ray``), on one machine or many.

Both executors take the same plain-data jobs and hand back the same plain-data results, so
the driver (the only process that writes the results database) cannot tell them apart and
Ray and local runs of a deterministic method store identical numbers.

Ray is an optional extra (``pip install iadkit[ray]``, see `iadkit.cluster`) imported only
when asked for. With ``address=None`` a private local Ray instance is started;
``address="auto"`` or ``"ray://host:10001"`` joins a running cluster. Workers import iadkit
from their own environment and must be able to read the dataset files (shared storage).
Batch prediction over many files (local or Ray) lives in `iadkit.batch`.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from iadkit.bench.config import Cell
from iadkit.bench.db import CellResult, now_iso
from iadkit.cluster import extend_sys_path, init_ray
from iadkit.errors import ExecutorError


class Executor(Protocol):
    """Runs cells drawn from an iterable (drawn lazily where the executor allows, so that a
    cell is claimed in the database just before it starts) and yields their results."""

    def run(
        self,
        cells: Iterable[Cell],
        *,
        on_start: Callable[[Cell], Any],
        on_stage: Callable[[Cell, str], Any],
    ) -> Iterator[CellResult]: ...


class LocalExecutor:
    """Cells one after another in this process (torch uses the machine's cores inside a cell)."""

    def run(
        self,
        cells: Iterable[Cell],
        *,
        on_start: Callable[[Cell], Any] = lambda c: None,
        on_stage: Callable[[Cell, str], Any] = lambda c, s: None,
    ) -> Iterator[CellResult]:
        from iadkit.bench.runner import run_cell

        for cell in cells:
            on_start(cell)
            yield run_cell(cell, on_stage=functools.partial(on_stage, cell))


def _init_process_worker(threads: int, sys_path: list[str]) -> None:
    import torch

    extend_sys_path(sys_path)
    torch.set_num_threads(threads)


class ProcessExecutor:
    """Cells in `workers` local processes at once, each with its share of the CPU threads.

    Small models use several cores poorly inside one process; two single-threaded processes
    on two cores finish a grid markedly sooner. At most `workers` cells are in flight, taken
    in grid order, so neighbouring cells share a category's loaded data in each process.
    A worker that dies (killed, out of memory) stops the grid with a clear error: finished
    cells are already saved and a rerun resumes.
    """

    def __init__(self, workers: int, threads_per_worker: int | None = None) -> None:
        if workers < 1:
            raise ExecutorError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)

    def run(
        self,
        cells: Iterable[Cell],
        *,
        on_start: Callable[[Cell], Any] = lambda c: None,
        on_stage: Callable[[Cell, str], Any] = lambda c, s: None,
    ) -> Iterator[CellResult]:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        from iadkit.bench.runner import run_cell

        queue = iter(cells)  # drawn one at a time: the driver claims each cell as it is drawn
        ctx = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state
        pool = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=ctx,
            initializer=_init_process_worker,
            initargs=(self.threads, [p for p in sys.path if p]),
        )
        pending: dict[Any, Cell] = {}
        try:
            exhausted = False
            while not exhausted or pending:
                while not exhausted and len(pending) < self.workers:
                    cell = next(queue, None)
                    if cell is None:
                        exhausted = True
                        break
                    on_start(cell)
                    pending[pool.submit(run_cell, cell)] = cell
                if not pending:
                    break
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in done:
                    cell = pending.pop(fut)
                    try:
                        yield fut.result()
                    except BrokenProcessPool as exc:
                        raise ExecutorError(
                            f"a worker process died while running {cell.describe()} (killed, or out of memory); "
                            "finished cells are saved: run the same command again to resume, with fewer workers "
                            "if memory is short"
                        ) from exc
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _ray_cell(cell: Cell, sys_path: list[str], cwd: str) -> CellResult:
    extend_sys_path(sys_path)
    if os.path.isdir(cwd):  # relative dataset paths mean the driver's folder (shared storage)
        os.chdir(cwd)
    from iadkit.bench.runner import run_cell

    return run_cell(cell)


class RayExecutor:
    """Every cell a Ray task; results come back in completion order.

    `cpus_per_cell` is what each task reserves (and, through Ray, the threads torch uses in
    it). A task that dies (worker crash, out of memory) becomes a 'failed' cell.
    """

    def __init__(self, address: str | None = None, *, cpus_per_cell: float = 1.0, num_cpus: int | None = None) -> None:
        self.ray = init_ray(address, num_cpus=num_cpus)
        self.cpus_per_cell = cpus_per_cell

    def run(
        self,
        cells: Iterable[Cell],
        *,
        on_start: Callable[[Cell], Any] = lambda c: None,
        on_stage: Callable[[Cell, str], Any] = lambda c, s: None,
    ) -> Iterator[CellResult]:
        ray = self.ray
        remote = ray.remote(num_cpus=self.cpus_per_cell, max_retries=0)(_ray_cell)
        paths = [p for p in sys.path if p]
        pending: dict[Any, Cell] = {}
        for cell in cells:
            on_start(cell)
            pending[remote.remote(cell, paths, os.getcwd())] = cell
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                ref = ready[0]
                cell = pending.pop(ref)
                started = now_iso()
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the task itself died: record, go on
                    result = CellResult(
                        cell=cell,
                        status="failed",
                        error=f"{type(exc).__name__}: {exc}".splitlines()[0][:2000],
                        traceback="".join(traceback.format_exception(exc))[-20000:],
                        started=started,
                        finished=now_iso(),
                    )
                yield result
        finally:
            for ref in pending:  # interrupted: do not leave work running on the cluster
                ray.cancel(ref, force=True)


def make_executor(name: str, *, address: str | None = None, workers: int = 1) -> Executor:
    """`local` (in this process, or `workers` processes) or `ray` (a task per cell)."""
    if name == "local":
        if address:
            raise ExecutorError("--address is for the Ray executor; use --executor ray")
        return LocalExecutor() if workers == 1 else ProcessExecutor(workers)
    if name == "ray":
        return RayExecutor(address)
    raise ExecutorError(f"unknown executor {name!r}; use 'local' or 'ray'")
