"""`iadkit data list | info | synth` on fake trees, through typer's CliRunner."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from iadkit.cli import app
from iadkit.errors import DatasetLayoutError

runner = CliRunner()


def _png(path: Path, value: int = 90, size: tuple[int, int] = (10, 14), channels: int = 3) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = size + ((channels,) if channels > 1 else ())
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


def _mvtec(root: Path, category: str, *, n_train: int = 3, masks: bool = True, channels: int = 3) -> None:
    for i in range(n_train):
        _png(root / category / "train" / "good" / f"{i:03d}.png", channels=channels)
    _png(root / category / "test" / "good" / "000.png", channels=channels)
    for i in range(2):
        _png(root / category / "test" / "hole" / f"{i:03d}.png", channels=channels)
        if masks or i == 0:
            m = np.zeros((10, 14), np.uint8)
            m[2:4, 2:4] = 255
            (root / category / "ground_truth" / "hole").mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(root / category / "ground_truth" / "hole" / f"{i:03d}_mask.png")


def test_help_teaches_with_examples() -> None:
    result = runner.invoke(app, ["data", "--help"])
    assert result.exit_code == 0 and "Examples" in result.output and "iadkit data synth --out" in result.output
    result = runner.invoke(app, ["data", "info", "--help"])
    assert result.exit_code == 0 and "--category" in result.output and "iadkit data info" in result.output


def test_list_builtin_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("iadkit.data.synthetic")
    fake.CATEGORIES = {"alpha": None, "beta": None}
    monkeypatch.setitem(sys.modules, "iadkit.data.synthetic", fake)
    result = runner.invoke(app, ["data", "list"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "elpv" in out and "CC BY-NC-SA 4.0" in out and "alpha, beta" in out
    for layout in ("mvtec", "btad", "loco", "mvtec3d", "visa", "kolektor2", "folder"):
        assert layout in out


def test_list_without_synthetic_module_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "iadkit.data.synthetic", None)  # import raises ImportError
    result = runner.invoke(app, ["data", "list"])
    assert result.exit_code == 0 and "not available" in result.output and "elpv" in result.output


def test_list_path_shows_layout_and_categories(tmp_path: Path) -> None:
    _mvtec(tmp_path, "carpet")
    _mvtec(tmp_path, "screw", channels=1)
    result = runner.invoke(app, ["data", "list", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "layout mvtec" in result.output and "carpet" in result.output and "screw" in result.output
    assert "2 categories" in result.output


def test_info_counts_masks_and_sizes(tmp_path: Path) -> None:
    _mvtec(tmp_path, "carpet", n_train=4)
    _mvtec(tmp_path, "screw", channels=1, masks=False)  # one hole image lacks its mask
    result = runner.invoke(app, ["data", "info", str(tmp_path), "--category", "screw"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "screw" in out and "carpet" not in out
    assert "1/2 (1 missing)" in out  # reported, not fatal
    assert "14x10 gray uint8 PNG" in out
    assert "pixel metrics unavailable" in out
    result = runner.invoke(app, ["data", "info", str(tmp_path)])
    assert result.exit_code == 0 and "carpet" in result.output and "screw" in result.output
    assert re.search(r"train\s*│\s*good\s*│\s*4\s*│", result.output)  # carpet: 4 training images
    assert "2/2" in result.output and "14x10 RGB uint8 PNG" in result.output


def test_info_on_a_missing_folder_raises_the_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "info", str(tmp_path / "nope")])
    assert result.exit_code != 0 and isinstance(result.exception, DatasetLayoutError)
    assert "no such folder" in str(result.exception)


def test_synth_calls_generate_then_prints_info(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Path, dict]] = []

    def generate(out_dir, **kwargs):
        calls.append((Path(out_dir), kwargs))
        for name in kwargs.get("categories") or ["alpha"]:
            _mvtec(Path(out_dir), name)
        return object()

    fake = types.ModuleType("iadkit.data.synthetic")
    fake.generate = generate
    fake.CATEGORIES = {"alpha": None}
    monkeypatch.setitem(sys.modules, "iadkit.data.synthetic", fake)
    out = tmp_path / "synth"
    result = runner.invoke(app, ["data", "synth", "--out", str(out), "--seed", "3", "--categories", "fabric,metal"])
    assert result.exit_code == 0, result.output
    assert calls == [(out, {"seed": 3, "preset": "small", "categories": ["fabric", "metal"]})]
    assert "fabric" in result.output and "metal" in result.output and "hole" in result.output
    result = runner.invoke(app, ["data", "synth", "--out", str(out), "--size", "48", "--preset", "demo"])
    assert result.exit_code == 0, result.output
    assert calls[-1][1] == {"seed": 0, "preset": "demo", "image_size": 48}


def test_synth_without_generator_fails_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "iadkit.data.synthetic", None)
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "s")])
    assert result.exit_code == 1 and "not available" in result.output
