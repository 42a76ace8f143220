"""Benchmarks: a resumable grid runner, a SQLite results database, executors (local, Ray)
and a self-contained HTML report.

    from iadkit.bench import BenchConfig, run_benchmark, write_report
    cfg = BenchConfig.load("bench.yaml")          # or iadkit.bench.presets.get_preset("demo", "demo-out")
    run_benchmark(cfg, "out/results.db")          # rerun to resume; --executor ray to scale out
    write_report("out/results.db", "out/report")  # out/report/index.html

Modules: config (grid file, cells and their identity), datasets (a cell's split,
subsampling), runner (cells and the driver), db (schema in its docstring), executors (local
processes, Ray), summary (tables), report (HTML), presets (demo, full). How a split becomes
a cell's train/test is a setting: `iadkit.settings`.
"""

from iadkit.bench.config import BenchConfig, BenchConfigError, Cell, expand
from iadkit.bench.db import CellResult, ResultsDB
from iadkit.bench.report import build_report_html, write_report
from iadkit.bench.runner import run_benchmark, run_cell

__all__ = [
    "BenchConfig",
    "BenchConfigError",
    "Cell",
    "CellResult",
    "ResultsDB",
    "build_report_html",
    "expand",
    "run_benchmark",
    "run_cell",
    "write_report",
]
