"""The HTML report: parsed back, its tables hold the database's numbers and its images decode."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import test_bench_support as support
from iadkit.bench import BenchConfig, ResultsDB, run_benchmark, write_report
from iadkit.bench.summary import METRICS


class Page(HTMLParser):
    """Collects tables (with their data- attributes), images and gallery figures."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.images: list[dict] = []
        self.figures: list[str] = []
        self.sections: list[str] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"attrs": a, "rows": []})
        elif tag == "tr" and self.tables:
            self._row = []
            self.tables[-1]["rows"].append(self._row)
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a)
        elif tag == "figure":
            self.figures.append(a.get("class", ""))
        elif tag == "section":
            self.sections.append(a.get("id", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    cfg = BenchConfig.parse(support.grid(["test_pixel_zscore", "test_bench_seeded", "test_bench_fail"], gallery=2))
    run_benchmark(cfg, tmp / "r.db", progress=False)
    path = write_report(tmp / "r.db", tmp / "out")
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    with ResultsDB(tmp / "r.db") as db:
        runs = db.runs()
    return path, page, runs


def test_page_has_every_section(bench):
    path, page, _ = bench
    assert path.name == "index.html" and path.stat().st_size > 10_000
    assert page.sections == ["overview", "charts", "tables", "roc", "operating", "cost", "gallery", "failed"]


def test_metric_tables_hold_the_database_numbers_with_mean_rows(bench):
    _, page, runs = bench
    tables = {t["attrs"]["data-metric"]: t["rows"] for t in page.tables if "data-metric" in t["attrs"]}
    # Image and pixel metrics (the tiny data has masks), never the thresholds.
    assert set(tables) == {
        "image_auroc",
        "image_ap",
        "image_f1_max",
        "pixel_auroc",
        "pixel_ap",
        "pixel_f1_max",
        "aupro",
    }
    assert not set(tables) - set(METRICS)
    done = {(r["method"], r["category"]): r["metrics"] for r in runs if r["status"] == "done"}
    for metric, rows in tables.items():
        header, *body = rows
        assert header == ["dataset / category", "test_pixel_zscore", "test_bench_seeded"]
        assert [r[0] for r in body] == ["tinybench / flat", "tinybench / dark", "mean"]
        for row in body[:2]:
            category = row[0].split(" / ")[1]
            for method, text in zip(header[1:], row[1:]):
                assert text == f"{done[(method, category)][metric]:.3f}", (metric, method, category)
        for method, text in zip(header[1:], body[2][1:]):
            mean = np.mean([done[(method, c)][metric] for c in support.CATEGORIES])
            assert text == f"{mean:.3f}"


def test_overview_ranks_methods_and_shows_costs(bench):
    _, page, _ = bench
    (overview,) = [t for t in page.tables if "overview" in t["attrs"].get("class", "")]
    header, *rows = overview["rows"]
    assert header[:2] == ["method", "I-AUROC"] and "time / image" in header and "peak RSS (fit)" in header
    methods = [r[0] for r in rows]
    assert sorted(methods) == ["test_bench_seeded", "test_pixel_zscore"]  # the failing method has no row
    aurocs = [float(r[1]) for r in rows]
    assert aurocs == sorted(aurocs, reverse=True)
    assert all(r[header.index("time / image")].endswith("ms") for r in rows)


def test_cost_and_failure_tables(bench):
    _, page, _ = bench
    (cost,) = [t for t in page.tables if t["attrs"].get("class") == "cost"]
    assert cost["rows"][0][:4] == ["method", "cells", "fit time", "time / image"]
    assert {r[0]: r[1] for r in cost["rows"][1:]} == {"test_pixel_zscore": "2", "test_bench_seeded": "2"}
    (failed,) = [t for t in page.tables if t["attrs"].get("class") == "failed"]
    assert [r[0] for r in failed["rows"][1:]] == ["test_bench_fail", "test_bench_fail"]
    assert all("deliberate failure" in r[-1] for r in failed["rows"][1:])


def test_images_are_embedded_pngs_and_gallery_has_both_kinds(bench):
    path, page, _ = bench
    assert page.images and all(i["src"].startswith("data:image/png;base64,") for i in page.images)
    for i in page.images:
        Image.open(io.BytesIO(base64.b64decode(i["src"].split(",", 1)[1]))).verify()
    # 2 methods x 2 categories x (2 defects + 2 false alarms)
    assert page.figures.count("defect") == 8 and page.figures.count("false_alarm") == 8
    assert not list(path.parent.glob("*.png"))  # self-contained: nothing beside the page


def test_report_of_a_missing_database_is_a_clear_error(tmp_path):
    from iadkit.bench.db import ResultsDBError

    with pytest.raises(ResultsDBError, match="no such results database"):
        write_report(tmp_path / "nope.db", tmp_path / "out")


def test_operating_point_tables_hold_the_test_rates_lowest_best(tmp_path):
    """Cells with a calibrated threshold: the report tabulates the test false-alarm and miss
    rates per category and method (lower is better: the lowest value is outlined), and never
    writes into the database it reads."""
    from iadkit.bench.config import Cell
    from iadkit.bench.db import CellResult

    db_path = tmp_path / "r.db"
    rates = {
        ("a", "flat"): (0.0, 0.25),
        ("a", "dark"): (0.1, 0.5),
        ("b", "flat"): (0.2, 0.0),
        ("b", "dark"): (0.3, 0.1),
    }
    with ResultsDB(db_path) as db:
        for (method, cat), (far, miss) in rates.items():
            cell = Cell(method, {}, "tinybench", cat, "vanilla", 0, (16, 16))
            op = {
                "threshold": 1.5,
                "rule": "false_alarm_rate",
                "target_fpr": 0.01,
                "n_calibration": 2,
                "test_false_alarm_rate": far,
                "test_miss_rate": miss,
            }
            db.record(
                CellResult(
                    cell=cell,
                    status="done",
                    metrics={"image_auroc": 0.9},
                    operating_point=op,
                    paths=["x"],
                    labels=[0],
                    defect_types=["good"],
                    scores=[0.1],
                )
            )
    before = db_path.read_bytes()
    page = Page()
    page.feed(write_report(db_path, tmp_path / "out").read_text(encoding="utf-8"))
    assert db_path.read_bytes() == before  # reading never modifies the input
    tables = {t["attrs"]["data-metric"]: t["rows"] for t in page.tables if "data-metric" in t["attrs"]}
    header, flat, _dark, mean = tables["test_false_alarm_rate"]
    assert header == ["dataset / category", "a", "b"]
    assert flat == ["tinybench / flat", "0.000", "0.200"] and mean == ["mean", "0.050", "0.250"]
    assert tables["test_miss_rate"][-1] == ["mean", "0.375", "0.050"]
