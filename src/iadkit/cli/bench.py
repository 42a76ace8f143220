"""`iadkit benchmark | report | demo`: compare methods on a grid, write the HTML report."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from iadkit.cli import app
from iadkit.errors import IadkitError

if TYPE_CHECKING:
    from iadkit.bench.config import BenchConfig

console = Console()


def _log_to_console() -> None:
    from rich.logging import RichHandler

    logger = logging.getLogger("iadkit.bench")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _run_and_report(
    config: BenchConfig,
    out: Path,
    *,
    db: Path | None,
    executor: str,
    address: str | None,
    retry_failed: bool,
    report: bool,
    workers: int = 1,
) -> Path:
    from iadkit.bench.db import ResultsDB
    from iadkit.bench.report import write_report
    from iadkit.bench.runner import run_benchmark, validate_grid
    from iadkit.bench.summary import leaderboard
    from iadkit.files import check_writable_dir, check_writable_file

    validate_grid(config)  # every cell, before any output is made
    if executor not in ("local", "ray"):
        raise IadkitError(f"unknown executor {executor!r}; use local or ray")
    db_path = db or out / "results.db"
    check_writable_file(db_path, "results database")
    if report:
        check_writable_dir(out / "report", "report folder")
    t0 = time.perf_counter()
    try:
        summary = run_benchmark(
            config,
            db_path,
            executor=executor,
            address=address,
            retry_failed=retry_failed,
            workers=workers,
        )
    except KeyboardInterrupt:
        console.print(
            f"[red]interrupted[/red]: finished cells are saved in {db_path}; run the same command again to resume",
            highlight=False,
        )
        raise typer.Exit(130) from None
    elapsed = time.perf_counter() - t0
    ids = {c.cell_id for c in summary.cells}
    with ResultsDB(db_path) as rdb:
        runs = [r for r in rdb.runs() if r["cell_id"] in ids]
    for table in leaderboard(runs):
        console.print(table)
    n_done = sum(r["status"] == "done" for r in runs)
    n_failed = sum(r["status"] == "failed" for r in runs)
    console.print(
        f"{summary.total} cells: {n_done} done, {n_failed} failed; ran {summary.ran} now "
        f"({summary.skipped} already finished) in {elapsed:.0f} s"
    )
    for r in runs:
        if r["status"] == "failed":
            console.print(f"  [red]failed[/red] {r['method']} · {r['dataset_label']}/{r['category']}: {r['error']}")
    console.print(f"results database: {db_path}")
    if report:
        path = write_report(db_path, out / "report")
        console.print(f"report: [bold]{path}[/bold]")
    if n_failed:
        console.print(
            f"[red]{n_failed} cell(s) failed[/red] (the others are saved); fix the cause and rerun with --retry-failed",
            highlight=False,
        )
        raise typer.Exit(1)
    return db_path


@app.command()
def benchmark(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Grid file (YAML or TOML): methods, datasets, settings, seeds."
    ),
    preset: str | None = typer.Option(None, "--preset", help="A named grid instead of a file: demo or full."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Folder for results.db and report/ (default bench-out/<name>)."
    ),
    db: Path | None = typer.Option(None, "--db", help="Results database (default OUT/results.db). Reruns resume it."),
    executor: str = typer.Option("local", help="local (this process) or ray (one Ray task per cell)."),
    address: str | None = typer.Option(
        None, help="Ray cluster address, e.g. auto or ray://head:10001 (default: start a local Ray)."
    ),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run cells that failed before again."),
    workers: int = typer.Option(
        1, "--workers", "-j", min=1, help="With --executor local: cells run at once in separate processes."
    ),
    method: list[str] | None = typer.Option(
        None, "--method", "-m", help="With --preset: only these methods (repeatable)."
    ),
    report: bool = typer.Option(True, "--report/--no-report", help="Write the HTML report at the end."),
) -> None:
    """Fit and evaluate every cell of a grid, resumably, into one SQLite database.

    The whole grid and the output locations are checked before the first cell runs. A
    killed run, started again with the same arguments, skips the finished cells; two runs
    on the same output share the cells. Exit code 1 when any cell failed (the finished ones
    are saved; --retry-failed reruns the failed ones).
    Example:  iadkit benchmark --config bench.yaml --out bench-out/mine
    """
    from iadkit.bench.config import BenchConfig, BenchConfigError
    from iadkit.bench.presets import SYNTH_PRESET, ensure_synthetic, get_preset

    _log_to_console()
    if (config is None) == (preset is None):
        raise BenchConfigError("give exactly one of --config FILE or --preset NAME (demo, full)")
    if config is not None:
        if method:
            raise BenchConfigError("--method filters a preset; edit the config file's methods instead")
        cfg = BenchConfig.load(config)
        out = out or Path("bench-out") / cfg.name
    else:
        assert preset is not None
        out = out or Path("bench-out") / preset
        cfg = get_preset(preset, out, methods=method)
        for made in ensure_synthetic(cfg, SYNTH_PRESET.get(preset, "demo")):
            console.print(f"generated the synthetic dataset in {made}")
    _run_and_report(
        cfg, out, db=db, executor=executor, address=address, retry_failed=retry_failed, report=report, workers=workers
    )


@app.command("report")
def report_cmd(
    db: Path = typer.Argument(..., help="Results database written by `iadkit benchmark`."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for index.html (self-contained: images embedded)."),
) -> None:
    """Write the HTML report of a results database: tables, charts, ROC curves, heatmap gallery.

    Example:  iadkit report bench-out/demo/results.db --out bench-out/demo/report
    """
    from iadkit.bench.db import ResultsDB
    from iadkit.bench.report import write_report
    from iadkit.files import check_writable_dir

    with ResultsDB(db, writable=False) as rdb:  # a missing, foreign or damaged file: refused before any output
        rdb.runs()
    check_writable_dir(out, "report folder")
    path = write_report(db, out)
    console.print(f"report: [bold]{path}[/bold]")


@app.command()
def demo(
    out: Path = typer.Option(
        Path("demo-out"), "--out", "-o", help="Folder for the synthetic data, results.db and report/."
    ),
    executor: str = typer.Option("local", help="local or ray."),
    address: str | None = typer.Option(None, help="Ray cluster address (with --executor ray)."),
    method: list[str] | None = typer.Option(
        None, "--method", "-m", help="Only these methods (default: every installed one)."
    ),
    elpv: bool = typer.Option(True, "--elpv/--no-elpv", help="Include the real ELPV solar-cell images (subsampled)."),
    workers: int | None = typer.Option(
        None, "--workers", "-j", help="Cells at once in separate processes (default: 2 on a multi-core machine)."
    ),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run cells that failed before again."),
) -> None:
    """Generate the synthetic dataset, benchmark every method on it and on ELPV, write the report.

    Small CPU schedules: a few minutes on a laptop. Rerunning resumes (finished cells are kept).
    """
    from iadkit.bench.presets import ensure_synthetic, get_preset

    _log_to_console()
    cfg = get_preset("demo", out, methods=method, elpv=elpv)
    for made in ensure_synthetic(cfg, "demo"):
        console.print(f"generated the synthetic dataset in {made}")
    console.print(
        f"benchmarking {len(cfg.methods)} methods ({', '.join(m.name for m in cfg.methods)}) on "
        f"{', '.join(d.source for d in cfg.datasets)}"
    )
    if workers is None:  # small models use two cores better as two processes than as two threads
        workers = min(2, os.cpu_count() or 1) if executor == "local" else 1
    _run_and_report(
        cfg, out, db=None, executor=executor, address=address, retry_failed=retry_failed, report=True, workers=workers
    )


__all__ = ["IadkitError", "benchmark", "demo", "report_cmd"]
