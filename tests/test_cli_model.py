"""`iadkit fit | predict | evaluate` end to end on a tiny MVTec-layout tree."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import _dummy  # noqa: F401  (registers test_pixel_zscore)
from iadkit.cli import app

runner = CliRunner()


def make_tree(root, n_train=12, n_good=4, n_bad=4, size=24):
    rng = np.random.default_rng(0)
    cat = root / "plate"

    def img(spot=False):
        a = (120 + rng.normal(0, 3, (size, size))).clip(0, 255).astype(np.uint8)
        m = np.zeros((size, size), np.uint8)
        if spot:
            y, x = rng.integers(3, size - 6, 2)
            a[y : y + 3, x : x + 3] = 250
            m[y : y + 3, x : x + 3] = 255
        return a, m

    for split, n, kind in (("train/good", n_train, False), ("test/good", n_good, False), ("test/spot", n_bad, True)):
        (cat / split).mkdir(parents=True)
        for i in range(n):
            a, m = img(kind)
            Image.fromarray(a).save(cat / split / f"{i:03d}.png")
            if kind:
                (cat / "ground_truth/spot").mkdir(parents=True, exist_ok=True)
                Image.fromarray(m).save(cat / "ground_truth/spot" / f"{i:03d}_mask.png")
    return root


def test_fit_predict_evaluate(tmp_path):
    data = make_tree(tmp_path / "data")
    model = tmp_path / "plate.iad"
    r = runner.invoke(
        app,
        [
            "fit",
            "-m",
            "test_pixel_zscore",
            "-d",
            str(data),
            "-c",
            "plate",
            "-o",
            str(model),
            "--image-size",
            "24",
            "--calibration-fraction",
            "0.25",
            "--target-fpr",
            "0",
            "-p",
            "eps=0.01",
        ],
    )
    assert r.exit_code == 0, r.output
    assert model.exists()

    out = tmp_path / "preds"
    r = runner.invoke(app, ["predict", str(model), str(data / "plate/test"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "predictions.json").read_text())
    assert len(rows) == 8
    flagged = {row["path"].split("/")[-2] for row in rows if row["anomalous"]}
    assert flagged == {"spot"}  # every spot image and no good image is flagged
    assert sum(row["anomalous"] for row in rows) == 4
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 8  # same stems in two folders get distinct names
    assert Image.open(overlays[0]).size == (24, 24)
    assert (out / "predictions.csv").read_text().startswith("path,score,anomalous")

    r = runner.invoke(app, ["evaluate", str(model), "-d", str(data), "--json"])
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.output)
    assert metrics["image_auroc"] == 1.0
    assert metrics["pixel_auroc"] > 0.95 and metrics["n_images"] == 8


def test_cli_errors_are_one_clear_line(tmp_path):
    import pytest

    from iadkit.cli import main

    with pytest.raises(SystemExit) as exc:
        import sys

        argv = sys.argv
        sys.argv = ["iadkit", "predict", str(tmp_path / "none.iad"), str(tmp_path), "--out", str(tmp_path / "o")]
        try:
            main()
        finally:
            sys.argv = argv
    assert exc.value.code == 2


def test_methods_lists_every_method_with_its_attributes():
    from iadkit.methods import available_methods

    r = runner.invoke(app, ["methods", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert set(rows) >= {n for n in available_methods() if not n.startswith("test_")}
    pc = rows["patchcore"]
    assert pc["family"] == "memory bank" and pc["supervision"] == "unsupervised" and pc["produces_maps"]
    assert pc["params"]["coreset_ratio"] == 0.1 and pc["paper"].startswith("Roth")
    assert rows["cutpaste"]["produces_maps"] is False
    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0 and "patchcore" in r.output and "teacher-student" in r.output
    r = runner.invoke(app, ["methods", "patchcore"])
    assert r.exit_code == 0 and "coreset_ratio : float, default=0.1" in r.output


def test_fit_checks_everything_before_training(tmp_path):
    """Bad options fail fast with one line (exit 2), before any training and without a file."""
    import sys

    from iadkit.cli import main

    data = make_tree(tmp_path / "data")

    def run(*args):
        argv, sys.argv = sys.argv, ["iadkit", "fit", "-d", str(data), "-c", "plate", *args]
        try:
            with pytest.raises(SystemExit) as exc:
                main()
        finally:
            sys.argv = argv
        return exc.value.code

    out = tmp_path / "m.iad"
    assert run("-m", "patchcor", "-o", str(out)) == 2  # unknown method (closest name suggested)
    assert run("-m", "patchcore", "-o", str(out), "-p", "coreset_ratio=2") == 2
    assert run("-m", "patchcore", "-o", str(out), "-p", "coreset_rati=0.1") == 2
    assert run("-m", "patchcore", "-o", str(out), "--target-fpr", "1.5") == 2
    assert run("-m", "patchcore", "-o", str(out), "--device", "cuda:7") == 2
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run("-m", "patchcore", "-o", str(blocker / "m.iad")) == 2  # its folder cannot exist
    assert not out.exists()
