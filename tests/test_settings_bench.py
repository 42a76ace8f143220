"""The settings in the benchmark and the CLI: grid expansion, what a cell records (the noisy
setting's injected images, the combination note said once), the results schema migration,
the curves and the leaderboard, and ``iadkit fit --setting``."""

from __future__ import annotations

import io
import json
import logging
import re
import sqlite3

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

import test_bench_support as support
from iadkit.bench import BenchConfig, ResultsDB, run_benchmark, write_report
from iadkit.bench.config import BenchConfigError, expand
from iadkit.bench.db import SCHEMA_VERSION
from iadkit.bench.report import build_report_html
from iadkit.bench.summary import leaderboard, setting_curves, settings_overview
from iadkit.settings import apply_setting, injected_noise
from test_bench_report import Page


def grid(methods, settings, **kw) -> BenchConfig:
    return BenchConfig.parse({**support.grid(methods, **kw), "settings": settings})


# -- grid expansion -------------------------------------------------------------------------------
def test_settings_lists_expand_to_one_cell_per_value():
    cfg = grid(
        ["test_pixel_zscore"],
        [
            "vanilla",
            {"few_shot": {"k": [1, 2, 4, 8]}},
            {"noisy": {"ratio": [0.05, 0.1]}},
            {"name": "semi_supervised", "params": {"k": 4}},  # the long form still works
            {"name": "semi_supervised", "params": {"k": [1, 2]}},
        ],
        categories=["flat"],
    )
    cells = expand(cfg)
    assert [(c.setting, c.setting_params) for c in cells] == [
        ("vanilla", {}),
        ("few_shot", {"k": 1}),
        ("few_shot", {"k": 2}),
        ("few_shot", {"k": 4}),
        ("few_shot", {"k": 8}),
        ("noisy", {"ratio": 0.05}),
        ("noisy", {"ratio": 0.1}),
        ("semi_supervised", {"k": 4}),
        ("semi_supervised", {"k": 1}),
        ("semi_supervised", {"k": 2}),
    ]
    assert len({c.cell_id for c in cells}) == len(cells)


def test_a_list_valued_parameter_is_one_value_and_several_lists_cross():
    cells = expand(
        grid(
            ["test_pixel_zscore"],
            [
                {"few_shot": {"k": [1, 2], "augment": True, "augmentations": ["rotation", "flip"]}},
                {"few_shot": {"k": 4, "augment": [False, True], "augmentations": [["rotation"], ["flip", "scale"]]}},
            ],
            categories=["flat"],
        )
    )
    got = [c.setting_params for c in cells]
    assert got[:2] == [
        {"k": 1, "augment": True, "augmentations": ["rotation", "flip"]},
        {"k": 2, "augment": True, "augmentations": ["rotation", "flip"]},
    ]
    assert got[2:] == [
        {"k": 4, "augment": False, "augmentations": ["rotation"]},
        {"k": 4, "augment": False, "augmentations": ["flip", "scale"]},
        {"k": 4, "augment": True, "augmentations": ["rotation"]},
        {"k": 4, "augment": True, "augmentations": ["flip", "scale"]},
    ]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"few_shot": {"k": [1, 0]}}, "k must be an integer >= 1, got 0"),
        ({"few_shot": {"shots": 2}}, "unexpected keyword argument 'shots'"),
        ({"noisy": {"ratio": []}}, "ratio lists no value"),
        ({"fewshot": {"k": 1}}, "unknown setting 'fewshot'"),
    ],
)
def test_a_wrong_setting_entry_fails_before_any_cell_runs(entry, message):
    with pytest.raises(Exception, match=message):
        expand(grid(["test_pixel_zscore"], [entry], categories=["flat"]))


def test_wrong_parameters_are_a_config_error():
    with pytest.raises(BenchConfigError):
        expand(grid(["test_pixel_zscore"], [{"semi_supervised": {"k": -1}}], categories=["flat"]))


# -- cells ----------------------------------------------------------------------------------------
def test_a_noisy_cell_records_its_injected_images_and_their_scores(tmp_path):
    # tinybench: 8 good training images, test 2 good + 4 defects: ratio 0.25 -> int(2.0) = 2 injected
    cfg = grid(["test_pixel_zscore"], [{"noisy": {"ratio": 0.25}}], categories=["flat"])
    run_benchmark(cfg, tmp_path / "r.db", progress=False)
    train, test = support._images("flat")
    expected_train, expected_test = apply_setting("noisy", train, test, seed=0, params={"ratio": 0.25})
    expected = [s.path for s in injected_noise(expected_train)]
    with ResultsDB(tmp_path / "r.db") as db:
        (run,) = db.runs()
        scores = db.image_scores(run["cell_id"])
    info = run["setting_info"]
    assert run["status"] == "done" and len(expected) == 2
    assert [i["path"] for i in info["injected"]] == expected
    assert all(
        i["role"] == "train" and i["defect_type"] == "spot" and np.isfinite(i["score"]) for i in info["injected"]
    )
    assert info["n_good"] == 10 and info["n_labelled_anomalous"] == 0
    assert run["n_train"] == 10 and run["n_test"] == 4
    assert scores["paths"] == [s.path for s in expected_test]  # the injected images left the test set
    assert not set(expected) & set(scores["paths"])


def test_the_note_is_said_once_per_cell_and_a_semi_supervised_method_gets_the_labels(tmp_path, caplog):
    cfg = grid(
        ["test_pixel_zscore", "test_bench_labelled"],
        ["vanilla", {"semi_supervised": {"k": [1, 3]}}],
        categories=["flat"],
    )
    support.FIT_CALLS.clear()
    with caplog.at_level(logging.INFO):
        run_benchmark(cfg, tmp_path / "r.db", progress=False)
    notes = [r.getMessage() for r in caplog.records if "is unsupervised" in r.getMessage()]
    assert len(notes) == 2  # one per semi_supervised cell of the unsupervised method
    assert all("(1 labelled defects unused)" in n or "(3 labelled defects unused)" in n for n in notes)
    with ResultsDB(tmp_path / "r.db") as db:
        runs = {(r["method"], json.dumps(r["setting_params"])): r for r in db.runs()}
    refused = runs[("test_bench_labelled", "{}")]
    assert (
        refused["status"] == "failed"
        and "SettingError: test_bench_labelled learns from labelled defects" in refused["error"]
    )
    assert "\n" not in refused["error"]
    assert "test_bench_labelled/flat/1" in support.FIT_CALLS and "test_bench_labelled/flat/3" in support.FIT_CALLS
    semi = runs[("test_pixel_zscore", '{"k": 3}')]
    assert semi["setting_info"]["note"].startswith("test_pixel_zscore is unsupervised")
    assert semi["n_train"] == 8 and semi["n_test"] == 3  # 8 good; 3 of the 4 test defects moved (cap int(3.0))


# -- results schema -----------------------------------------------------------------------------
@pytest.mark.parametrize("old_version", [1, 2])
def test_an_old_results_database_is_migrated(tmp_path, old_version):
    path = tmp_path / "old.db"
    cfg = grid(["test_pixel_zscore"], ["vanilla"], categories=["flat"])
    run_benchmark(cfg, path, progress=False)
    con = sqlite3.connect(path)  # make it look like an older iadkit wrote it
    con.execute("ALTER TABLE runs DROP COLUMN setting_info")
    if old_version == 1:
        con.execute("ALTER TABLE runs DROP COLUMN operating_point")
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(old_version),))
    con.commit()
    con.close()
    with ResultsDB(path, writable=False) as db:  # read-only: readable as it is, not modified
        (run,) = db.runs()
        assert run["setting_info"] is None and db.meta()["schema_version"] == str(old_version)
    with ResultsDB(path) as db:
        cols = [r[1] for r in db.conn.execute("PRAGMA table_info(runs)")]
        assert "setting_info" in cols and "operating_point" in cols
        assert db.meta()["schema_version"] == str(SCHEMA_VERSION) == "4"
        (run,) = db.runs()
        assert run["status"] == "done" and run["setting_info"] is None
    run_benchmark(grid(["test_pixel_zscore"], [{"noisy": {"ratio": 0.25}}], categories=["flat"]), path, progress=False)
    with ResultsDB(path) as db:
        assert [bool(r["setting_info"] and r["setting_info"].get("injected")) for r in db.runs()] == [False, True]


# -- report ---------------------------------------------------------------------------------------
SETTINGS = [
    "vanilla",
    {"few_shot": {"k": [1, 2, 4]}},
    {"few_shot": {"k": [1, 4], "augment": True, "n_augment": 3}},
    {"noisy": {"ratio": [0.125, 0.25]}},
    {"semi_supervised": {"k": [1, 2]}},
]


@pytest.fixture(scope="module")
def settings_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("settings") / "r.db"
    run_benchmark(grid(["test_pixel_zscore", "test_bench_seeded"], SETTINGS, gallery=0), path, progress=False)
    with ResultsDB(path) as db:
        return path, db.runs()


def test_curves_hold_the_database_numbers(settings_db):
    _, runs = settings_db
    curves = {(c.setting, c.metric): c for c in setting_curves(runs, ["image_auroc"])}
    assert set(curves) == {("few_shot", "image_auroc"), ("noisy", "image_auroc"), ("semi_supervised", "image_auroc")}
    fs = curves[("few_shot", "image_auroc")]
    assert fs.xs == [1, 2, 4] and fs.rows == ["tinybench / flat", "tinybench / dark"]
    # a line per method and per augmentation choice; the default (no augmentation) unnamed
    assert fs.series == [
        "test_pixel_zscore",
        "test_bench_seeded",
        "test_pixel_zscore [augment=True,n_augment=3]",
        "test_bench_seeded [augment=True,n_augment=3]",
    ]
    assert set(fs.mean["test_bench_seeded [augment=True,n_augment=3]"]) == {1, 2, 4}
    assert fs.incomplete["test_bench_seeded [augment=True,n_augment=3]"] == {2}  # no k=2 cell: no mean
    by = {
        (r["method"], r["category"], r["setting"], json.dumps(r["setting_params"])): r["metrics"]["image_auroc"]
        for r in runs
    }
    for m in ("test_pixel_zscore", "test_bench_seeded"):
        for k in (1, 2, 4):
            flat, dark = (by[(m, c, "few_shot", json.dumps({"k": k}))] for c in ("flat", "dark"))
            assert fs.values[(m, "tinybench / flat")][k] == flat
            assert fs.mean[m][k] == pytest.approx((flat + dark) / 2)
        van = [by[(m, c, "vanilla", "{}")] for c in ("flat", "dark")]
        assert fs.reference[(m, "tinybench / dark")] == van[1]
        assert fs.mean_reference[m] == pytest.approx(sum(van) / 2)
    assert curves[("noisy", "image_auroc")].xs == [0.125, 0.25]


def test_the_leaderboard_shows_each_setting_s_mean(settings_db):
    _, runs = settings_db
    ov = settings_overview(runs, "image_auroc")
    assert ov.settings == [
        "vanilla",
        "few_shot(k=1)",
        "few_shot(k=2)",
        "few_shot(k=4)",
        "few_shot(augment=True,k=1,n_augment=3)",
        "few_shot(augment=True,k=4,n_augment=3)",
        "noisy(ratio=0.125)",
        "noisy(ratio=0.25)",
        "semi_supervised(k=1)",
        "semi_supervised(k=2)",
    ]
    console = Console(width=200, record=True, file=io.StringIO())
    for table in leaderboard(runs):
        console.print(table)
    text = console.export_text()
    assert "I-AUROC · mean over categories, by setting" in text
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("noisy(ratio=0.25)"))
    zs, seeded = (ov.values["noisy(ratio=0.25)"][m] for m in ("test_pixel_zscore", "test_bench_seeded"))
    assert line.split()[1:] == [f"{zs:.3f}", f"{seeded:.3f}"]
    assert "I-AUROC · vanilla" in text and "I-AUROC · few_shot(k=1)" not in text  # details: the reference only


def test_the_report_draws_the_three_curves_inline(settings_db, tmp_path):
    path, runs = settings_db
    html = build_report_html(path)
    page = Page()
    page.feed(html)
    assert "settings" in page.sections
    assert not re.search(r"<script|https?://(?!www\.w3\.org)", html)  # self-contained
    for setting in ("few_shot", "noisy", "semi_supervised"):
        block = re.search(rf'<div class="curves" data-setting="{setting}">(.*?)</div>', html, re.S).group(1)
        assert block.lstrip().startswith("<svg") and block.rstrip().endswith("</svg>")
        assert "test_pixel_zscore" in block and "vanilla (the method" in block  # legend as text
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))  # several inline SVGs never share an element id
    refs = set(re.findall(r"url\(#([^)]+)\)", html)) | set(re.findall(r'href="#([^"]+)"', html))
    assert refs and refs <= set(ids)  # and every clip path / marker they use is found
    curve = next(c for c in setting_curves(runs, ["image_auroc"]) if c.setting == "noisy")
    (table,) = [
        t
        for t in page.tables
        if t["attrs"].get("data-setting") == "noisy"
        and t["attrs"].get("data-row") == "mean"
        and t["attrs"]["data-metric"] == "image_auroc"
    ]
    assert table["rows"][0] == ["method", "vanilla", "ratio=0.125", "ratio=0.25"]
    row = next(r for r in table["rows"] if r[0] == "test_bench_seeded")
    assert row[1:] == [f"{curve.mean_reference['test_bench_seeded']:.3f}"] + [
        f"{curve.mean['test_bench_seeded'][x]:.3f}" for x in (0.125, 0.25)
    ]
    injected = [t for t in page.tables if t["attrs"].get("class") == "injected"]
    assert {t["attrs"]["data-row"] for t in injected} == {"tinybench / flat", "tinybench / dark"}
    assert all(len(t["rows"]) == 1 + 2 for t in injected)  # ratio 0.25: int(0.25 * 8) = 2 images per category
    assert write_report(path, tmp_path / "rep").is_file()


# -- command line ---------------------------------------------------------------------------------
def test_fit_with_a_setting_on_the_command_line(tmp_path):
    from iadkit.cli import app
    from iadkit.model import Model
    from test_cli_model import make_tree

    data = make_tree(tmp_path / "data", n_train=12)
    runner = CliRunner()
    out = tmp_path / "m.iad"
    args = ["fit", "-m", "test_pixel_zscore", "-d", str(data), "-c", "plate", "--image-size", "24", "-o", str(out)]
    r = runner.invoke(app, [*args, "--setting", "few_shot:k=4"])
    assert r.exit_code == 0, r.output
    assert "on 4 training images" in r.output
    assert Model.load(out).info["n_train"] == 4 and Model.load(out).info["setting"] == "few_shot:k=4"
    r = runner.invoke(app, [*args, "--force", "--setting", "few_shot:k=2,augment=true,n_augment=3"])
    assert r.exit_code == 0, r.output
    assert Model.load(out).info["n_train"] == 8  # 2 shots x (1 + 3 variants)
    r = runner.invoke(app, [*args, "--force", "--setting", "semi_supervised:k=2"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())  # the console wraps long lines
    assert (
        said.count("test_pixel_zscore is unsupervised: it trains on the good images only (2 labelled defects unused)")
        == 1
    )
    r = runner.invoke(app, [*args, "--force", "--setting", "few_shot:k=0"])
    assert r.exit_code != 0 and "setting 'few_shot': k must be an integer >= 1, got 0" in str(r.exception)
