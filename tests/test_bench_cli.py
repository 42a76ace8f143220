"""`iadkit benchmark | report` and the presets behind `iadkit demo`."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

import test_bench_support as support
from iadkit.bench.config import BenchConfigError, expand
from iadkit.cli import app

runner = CliRunner()


def test_benchmark_from_a_file_then_resume_then_report(tmp_path):
    cfg = tmp_path / "g.yaml"
    cfg.write_text(yaml.safe_dump(support.grid(["test_pixel_zscore", "test_bench_fail"])))
    out = tmp_path / "out"
    first = runner.invoke(app, ["benchmark", "--config", str(cfg), "--out", str(out)])
    assert first.exit_code == 1, first.output  # some cells failed: the others are saved, the exit code says so
    assert "I-AUROC" in first.output and "mean" in first.output and "tinybench: flat, dark" in first.output
    assert "4 cells: 2 done, 2 failed; ran 4 now" in first.output
    assert "deliberate failure" in first.output
    assert (out / "results.db").is_file() and (out / "report" / "index.html").is_file()
    second = runner.invoke(app, ["benchmark", "--config", str(cfg), "--out", str(out), "--no-report"])
    assert second.exit_code == 1, second.output  # the failed cells are still failed
    assert "ran 0 now (4 already finished)" in second.output
    rep = runner.invoke(app, ["report", str(out / "results.db"), "--out", str(tmp_path / "rep")])
    assert rep.exit_code == 0 and (tmp_path / "rep" / "index.html").is_file()


def test_benchmark_needs_exactly_one_grid(tmp_path):
    res = runner.invoke(app, ["benchmark"])
    assert isinstance(res.exception, BenchConfigError) and "exactly one" in str(res.exception)
    res = runner.invoke(app, ["benchmark", "--preset", "nope", "--out", str(tmp_path)])
    assert isinstance(res.exception, BenchConfigError) and "demo, full" in str(res.exception)


class _Fake:
    supervision = "unsupervised"

    def __init__(self, params):
        self._params = params

    def param_names(self):
        return self._params


def test_demo_preset_table_covers_installed_methods(tmp_path, monkeypatch):
    from iadkit import methods
    from iadkit.bench import presets

    fake = {
        "patchcore": _Fake(["coreset_ratio", "seed"]),
        "stfpm": _Fake(["lr"]),  # names its epochs differently: the table's epochs is dropped
        "brand_new": _Fake(["epochs"]),  # not in the table: the default row
        "devnet": _Fake(["epochs"]),
        "test_x": _Fake([]),
    }
    fake["devnet"].supervision = "semi-supervised"
    monkeypatch.setattr(methods, "available_methods", lambda: fake)
    cfg = presets.get_preset("demo", tmp_path)
    by_name = {m.name: m for m in cfg.methods}
    assert list(by_name) == ["patchcore", "stfpm", "brand_new"]  # table order, then new ones
    assert by_name["patchcore"].params == presets.DEMO_TABLE["patchcore"].params
    assert by_name["stfpm"].params == {}
    assert by_name["brand_new"].params == {"epochs": presets.DEMO_DEFAULT.params["epochs"]}  # batch_size dropped
    assert by_name["patchcore"].image_size_for == {"elpv": presets.DEMO_TABLE["patchcore"].elpv_size}
    synth, elpv = cfg.datasets
    assert synth.source == f"synthetic:{(tmp_path / 'synth').resolve()}"
    assert elpv.source == "elpv" and elpv.categories == ["mono", "poly", "all"]
    assert elpv.subsample is not None and elpv.subsample.train == presets.DEMO_ELPV_SUBSAMPLE["train"]
    cells = expand(cfg.model_copy(update={"datasets": [elpv]}))
    assert {c.category for c in cells} == {"mono", "poly", "all"}
    assert all("subsample" in c.dataset_label for c in cells)
    assert {c.image_size for c in cells if c.method == "patchcore"} == {(96, 96)}
    with pytest.raises(BenchConfigError, match="unknown method"):
        presets.get_preset("demo", tmp_path, methods=["nope"])
    assert [m.name for m in presets.get_preset("full", tmp_path, methods=["stfpm"]).methods] == ["stfpm"]


def test_ensure_synthetic_generates_only_when_absent(tmp_path):
    from iadkit.bench.config import BenchConfig
    from iadkit.bench.presets import ensure_synthetic

    cfg = BenchConfig.parse({"methods": ["x"], "datasets": [f"synthetic:{tmp_path / 's'}", "tinybench"]})
    assert ensure_synthetic(cfg, "small") == [tmp_path / "s"]
    assert (tmp_path / "s" / "fabric" / "train" / "good").is_dir()
    assert ensure_synthetic(cfg, "small") == []


def test_demo_command_runs_the_preset_and_prints_the_report_path(tmp_path, monkeypatch):
    from iadkit.bench import presets
    from iadkit.bench.config import BenchConfig

    seen = {}

    def tiny(name, root, *, methods=None, elpv=True):
        seen.update(name=name, root=root, methods=methods, elpv=elpv)
        return BenchConfig.parse(support.grid(["test_pixel_zscore"], categories=["flat"]))

    monkeypatch.setattr(presets, "get_preset", tiny)
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--no-elpv", "-m", "padim", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert seen == {"name": "demo", "root": tmp_path / "d", "methods": ["padim"], "elpv": False}
    assert "1 cells: 1 done, 0 failed" in res.output
    assert f"report: {tmp_path / 'd' / 'report' / 'index.html'}" in res.output.replace("\n", "")
