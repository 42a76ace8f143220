"""Hostile inputs, table-driven over every entry point (issue 14).

Each case feeds one bad input or fault to one entry point and asserts its outcome class:

- ``error``: a clear refusal. In Python an `IadkitError` subclass whose message names the
  problem (and, where there is one, the fix); on the command line exit code 2, a line
  starting ``error:`` (or click's usage error for a malformed option), no traceback, and
  no output written.
- ``handled``: the work goes on and the bad part is dealt with visibly: an error row for
  the one bad image, a warning, an exit code that says some of it failed, the good rest.
- ``resumed``: interrupted work picks up where it stopped (more in test_hostile_faults.py).

Entry points: the Python API, model files, each CLI command, grid files, the results
database and the server. `test_case_count` keeps the table at its size (at least 60).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

import _hostile_support as hs
import test_bench_support as bench_support
from iadkit.errors import (
    CalibrationWarning,
    IadkitError,
    ImageReadError,
    InvalidInputError,
    InvalidParameterError,
    MetricUndefinedError,
    ModelFileError,
    NonFiniteScoreError,
    NotFittedError,
    TrainingDataError,
    UnknownNameError,
)
from iadkit.model import Model, PredictionResult
from iadkit.types import Sample


# -- the world the cases act on ------------------------------------------------------------------
@dataclass
class World:
    root: Path
    gray: Path  # MVTec tree, grayscale PNGs
    color: Path  # MVTec tree, colour PNGs
    gray_model: Path
    color_model: Path
    nan_model: Path
    bright: list[Path]  # images the NaN model scores NaN
    results_db: Path  # a finished benchmark database (tinybench, one cell)

    def fresh(self, name: str) -> Path:
        """A new empty folder for one case."""
        path = self.root / "cases" / name
        path.mkdir(parents=True, exist_ok=False)
        return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from iadkit.bench import BenchConfig, run_benchmark
    from iadkit.data import load_dataset

    root = tmp_path_factory.mktemp("hostile")
    gray = hs.mvtec_tree(root / "gray")
    color = hs.mvtec_tree(root / "color", color=True)
    models = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        for name, tree, method in (
            ("gray", gray, "test_pixel_zscore"),
            ("color", color, "test_pixel_zscore"),
            ("nan", gray, "test_hostile_nan"),
        ):
            split = load_dataset(str(tree), category="plate")
            model = Model.create(method, image_size=24).fit(split.train, progress=False)
            models[name] = model.save(root / f"{name}.iad")
    bright = hs.write_images(root / "bright", 2, seed=5)
    for p in bright:  # overwrite with bright parts
        Image.fromarray(np.full((24, 24), 245, np.uint8)).save(p)
    db = root / "bench" / "results.db"
    run_benchmark(BenchConfig.parse(bench_support.grid(["test_pixel_zscore"], categories=["flat"])), db, progress=False)
    return World(root, gray, color, models["gray"], models["color"], models["nan"], bright, db)


# -- running the command line in this process ------------------------------------------------------
@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return " ".join((self.out + " " + self.err).split())  # rich wraps long lines


def cli(capsys, *args: Any) -> CliResult:
    from iadkit.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    code = exc.value.code if isinstance(exc.value.code, int) else (0 if exc.value.code is None else 1)
    return CliResult(code, captured.out, captured.err)


def assert_cli_error(res: CliResult, match: str) -> None:
    """Exit 2, one error message (ours or click's usage error), no traceback."""
    assert res.code == 2, (res.code, res.out[-2000:], res.err[-2000:])
    assert "Traceback" not in res.out + res.err, res.err[-3000:]
    assert res.err.lstrip().startswith("error:") or "Invalid value" in res.err or "Usage:" in res.err, res.err
    assert re.search(match, res.text, re.I), (match, res.text[-2000:])


# -- the table ---------------------------------------------------------------------------------------
@dataclass
class Case:
    entry: str  # which entry point: api, model-file, cli:fit, cli:predict, ..., grid, results-db, server
    name: str
    outcome: str  # error | handled | resumed
    run: Callable[..., Any]  # run(world, capsys) -> raises (error) or checks itself (handled/resumed)
    error: type[BaseException] | None = None  # API errors: the expected class
    match: str = ""  # a phrase the message must hold

    @property
    def id(self) -> str:
        return f"{self.entry}/{self.name}"


CASES: list[Case] = []


def api_error(entry: str, name: str, error: type[BaseException], match: str):
    def deco(fn: Callable[[World], Any]) -> Callable[[World], Any]:
        CASES.append(Case(entry, name, "error", lambda w, capsys: fn(w), error, match))
        return fn

    return deco


def cli_error(entry: str, name: str, match: str, *, no_output: Callable[[World], list[Path]] | None = None):
    def deco(args: Callable[[World], list[Any]]) -> Callable[[World], list[Any]]:
        def run(w: World, capsys) -> None:
            argv = args(w)
            res = cli(capsys, *argv)
            assert_cli_error(res, match)
            for p in no_output(w) if no_output else []:
                assert not p.exists(), f"{p} was written although the command was refused"

        CASES.append(Case(entry, name, "error", run, None, match))
        return args

    return deco


def handled(entry: str, name: str, outcome: str = "handled"):
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        CASES.append(Case(entry, name, outcome, fn))
        return fn

    return deco


def _gray_samples(n: int = 12, size: int = 16) -> list[Sample]:
    rng = np.random.default_rng(0)
    return [Sample(path=f"mem://g{i}", image=(100 + rng.normal(0, 3, (size, size))).astype(np.uint8)) for i in range(n)]


def _fitted(samples=None, **fit_options) -> Model:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        return Model.create("test_pixel_zscore", image_size=16).fit(
            samples or _gray_samples(), progress=False, **fit_options
        )


# == Python API =====================================================================================
@api_error("api", "unknown method suggests the closest", UnknownNameError, "did you mean test_pixel_zscore")
def _(w):
    Model.create("test_pixel_zscor")


@api_error("api", "image_size as a string", InvalidParameterError, "image_size must be an integer")
def _(w):
    Model.create("test_pixel_zscore", image_size="64")


@api_error("api", "negative image_size", InvalidParameterError, "image_size must be positive")
def _(w):
    Model.create("test_pixel_zscore", image_size=-8)


@api_error("api", "image_size with a zero side", InvalidParameterError, "positive")
def _(w):
    Model.create("test_pixel_zscore", image_size=(16, 0))


@api_error("api", "fractional image_size", InvalidParameterError, "integer")
def _(w):
    Model.create("test_pixel_zscore", image_size=16.5)


@api_error("api", "crop larger than the image", InvalidParameterError, "crop_size")
def _(w):
    Model.create("test_pixel_zscore", image_size=16, crop_size=32)


@api_error("api", "unknown hyper-parameter", InvalidParameterError, "epz")
def _(w):
    Model.create("test_pixel_zscore", epz=0.1)


@api_error("api", "hyper-parameter out of bounds", InvalidParameterError, "eps")
def _(w):
    Model.create("test_pixel_zscore", eps=-1.0).detector.validate()


@api_error("api", "NaN map smoothing", InvalidParameterError, "sigma")
def _(w):
    Model.create("test_pixel_zscore", sigma=float("nan"))


@api_error("api", "set_threshold(nan)", InvalidParameterError, "finite")
def _(w):
    _fitted().set_threshold(float("nan"))


@api_error("api", "set_threshold(inf)", InvalidParameterError, "finite")
def _(w):
    _fitted().set_threshold(float("inf"))


@api_error("api", "set_threshold of a word", InvalidParameterError, "number")
def _(w):
    _fitted().set_threshold("high")


@api_error("api", "predict(threshold=nan)", InvalidParameterError, "finite")
def _(w):
    _fitted().predict(_gray_samples(2), threshold=float("nan"))


@api_error("api", "batch_size 0", InvalidParameterError, "batch_size")
def _(w):
    _fitted().predict(_gray_samples(2), batch_size=0)


@api_error("api", "batch_size -1", InvalidParameterError, "batch_size")
def _(w):
    _fitted().predict(_gray_samples(2), batch_size=-1)


@api_error("api", "batch_size True", InvalidParameterError, "batch_size")
def _(w):
    _fitted().predict(_gray_samples(2), batch_size=True)


@api_error("api", "predict before fit", NotFittedError, "fit")
def _(w):
    Model.create("test_pixel_zscore", image_size=16).predict(_gray_samples(1))


@api_error("api", "fit on nothing", TrainingDataError, "no training images")
def _(w):
    Model.create("test_pixel_zscore", image_size=16).fit([])


@api_error("api", "calibration_fraction 1.5", InvalidParameterError, "calibration_fraction")
def _(w):
    Model.create("test_pixel_zscore", image_size=16).fit(_gray_samples(), calibration_fraction=1.5)


@api_error("api", "target_fpr 2 (before training)", InvalidParameterError, "target_fpr")
def _(w):
    model = Model.create("test_pixel_zscore", image_size=16)
    try:
        model.fit(_gray_samples(), target_fpr=2.0)
    finally:
        assert not model.detector.is_fitted  # refused before any training


@api_error("api", "something that is not an image", InvalidInputError, "cannot predict on int")
def _(w):
    _fitted().predict([42])


@api_error("api", "array with 5 channels", ImageReadError, "C in 1, 3 or 4")
def _(w):
    _fitted().predict([np.zeros((16, 16, 5), np.uint8)])


@api_error("api", "array of int64", ImageReadError, "unsupported image dtype")
def _(w):
    _fitted().predict([np.zeros((16, 16), np.int64)])


@api_error("api", "float array with NaN pixels", ImageReadError, "NaN")
def _(w):
    image = np.full((16, 16), 0.5, np.float32)
    image[3, 3] = np.nan
    _fitted().predict([image])


@api_error("api", "missing image file", ImageReadError, "file not found")
def _(w):
    _fitted().predict([w.root / "nope.png"])


@api_error(
    "api", "colour image to a grayscale model", ImageReadError, "colour image, but this model was trained on grayscale"
)
def _(w):
    Model.load(w.gray_model).predict([next((w.color / "plate/test/good").glob("*.png"))])


@api_error(
    "api", "grayscale image to a colour model", ImageReadError, "grayscale image, but this model was trained on colour"
)
def _(w):
    Model.load(w.color_model).predict([next((w.gray / "plate/test/good").glob("*.png"))])


@api_error("api", "verdicts of NaN scores", NonFiniteScoreError, "NaN or infinity")
def _(w):
    _ = PredictionResult(paths=["a", "b"], scores=np.array([0.1, np.nan]), maps=None, threshold=0.5).verdicts


@api_error("api", "pixel metrics without masks", MetricUndefinedError, "no ground-truth mask")
def _(w):
    from iadkit.evaluation import evaluate

    bad = Sample(path="mem://bad", label=1, image=np.full((16, 16), 200, np.uint8))
    evaluate(_fitted(), [*_gray_samples(2), bad], pixel_metrics=True)


@handled("api", "rows() of NaN scores: an error per image, verdicts for the rest")
def _(w, capsys):
    rows = PredictionResult(paths=["a", "b"], scores=np.array([0.9, np.nan]), maps=None, threshold=0.5).rows()
    assert rows[0] == {"path": "a", "score": 0.9, "anomalous": True, "error": None}
    assert rows[1]["anomalous"] is None and rows[1]["score"] is None and "nan" in rows[1]["error"]


@handled("api", "gray image stored as RGB to a gray model")
def _(w, capsys):
    model = Model.load(w.gray_model)
    path = next((w.gray / "plate/test/good").glob("*.png"))
    gray = np.asarray(Image.open(path))
    as_rgb = np.repeat(gray[:, :, None], 3, axis=2)
    a, b = model.predict([gray]).scores, model.predict([as_rgb]).scores
    np.testing.assert_array_equal(a, b)


@handled("api", "threshold from too few images: a CalibrationWarning with the count")
def _(w, capsys):
    with pytest.warns(CalibrationWarning, match=r"set from 2 good image\(s\).*1/2 = 0\.5.*target 0\.01"):
        model = Model.create("test_pixel_zscore", image_size=16).fit(_gray_samples(16), progress=False)
    d = model.threshold.details
    assert (d["n_good"], d["resolution"], d["target_fpr"]) == (2, 0.5, 0.01)


@handled("api", "API and CLI hold out the same default share")
def _(w, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        model = Model.create("test_pixel_zscore", image_size=16).fit(_gray_samples(20), progress=False)
    assert model.info["n_calibration"] == 2 and model.info["n_train"] == 18


@handled("api", "mixed gray and colour training images: both accepted, with a warning", outcome="handled")
def _(w, capsys):
    rng = np.random.default_rng(1)
    colour = [Sample(path=f"mem://c{i}", image=(rng.integers(0, 255, (16, 16, 3))).astype(np.uint8)) for i in range(6)]
    model = _fitted(_gray_samples(6) + colour, calibration_fraction=0)
    assert model.preprocess.channels is None
    model.predict(_gray_samples(1) + colour[:1])


@handled("api", "predict_folder: an unreadable file among good ones")
def _(w, capsys):
    from iadkit.batch import predict_folder

    out = w.fresh("api-one-bad")
    files = sorted((w.gray / "plate/test/good").glob("*.png"))
    broken = out / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    result = predict_folder(w.gray_model, [files[0], broken, files[1]], out / "o", overlays=False)
    assert [r["error"] is None for r in result.rows] == [True, False, True]
    assert len(result.failed) == 1 and "broken.png" in result.failed[0]["path"]
    rows = json.loads((out / "o/predictions.json").read_text())
    assert rows[1]["anomalous"] is None and rows[0]["score"] is not None


# == model files ====================================================================================
def _corrupt(w: World, name: str, edit: Callable[[bytearray], None]) -> Path:
    raw = bytearray(w.gray_model.read_bytes())
    edit(raw)
    path = w.root / "models" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(bytes(raw))
    return path


def _manifest_case(name: str, edit: Callable[[dict], None], match: str) -> None:
    @api_error("model-file", name, ModelFileError, match)
    def _(w):
        path = hs.edit_manifest(w.gray_model, w.root / f"m-{abs(hash(name))}.iad", edit)
        Model.load(path)


@api_error("model-file", "missing file", ModelFileError, "no such model file")
def _(w):
    Model.load(w.root / "missing.iad")


@api_error("model-file", "a folder", ModelFileError, "folder")
def _(w):
    Model.load(w.root)


@api_error("model-file", "empty file", ModelFileError, "too short")
def _(w):
    Model.load(_corrupt(w, "empty.iad", lambda raw: raw.clear()))


@api_error("model-file", "random bytes", ModelFileError, "not an iadkit model file")
def _(w):
    path = w.root / "random.iad"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    Model.load(path)


@api_error("model-file", "truncated to half", ModelFileError, "corrupt model file")
def _(w):
    Model.load(_corrupt(w, "half.iad", lambda raw: raw.__delitem__(slice(len(raw) // 2 + 200, None))))


@api_error("model-file", "one byte of tensor data flipped", ModelFileError, "does not match the checksum")
def _(w):
    start = hs.tensor_data_offset(w.gray_model)
    Model.load(_corrupt(w, "flip.iad", lambda raw: raw.__setitem__(start + 17, raw[start + 17] ^ 0x40)))


@api_error("model-file", "4 bytes of tensor data made NaN", ModelFileError, "checksum")
def _(w):
    start = hs.tensor_data_offset(w.gray_model)
    nan = np.array([np.nan], np.float32).tobytes()
    Model.load(_corrupt(w, "nan.iad", lambda raw: raw.__setitem__(slice(start, start + 4), nan)))


_manifest_case(
    "NaN threshold in the manifest", lambda m: m["threshold"].update(value=float("nan")), "not a finite number"
)
_manifest_case("extra hyper-parameter", lambda m: m["params"].update(bogus=1), r"unknown \['bogus'\]")
_manifest_case("missing hyper-parameter", lambda m: m["params"].pop("eps"), r"missing \['eps'\]")
_manifest_case("hyper-parameter out of bounds", lambda m: m["params"].update(eps=-1), "eps=-1 is not valid")
_manifest_case("unknown method", lambda m: m.update(method="test_pixel_zscor"), "did you mean test_pixel_zscore")
_manifest_case("newer format", lambda m: m.update(format_version=99), "newer than this iadkit")
_manifest_case("older format", lambda m: m.update(format_version=1), "no longer supported")
_manifest_case("not an iadkit manifest", lambda m: m.update(format="other"), "not an iadkit model file")
_manifest_case("manifest without params", lambda m: m.pop("params"), "missing params")
_manifest_case("image size as a string", lambda m: m["preprocess"].update(image_size="64"), "malformed manifest")
_manifest_case("channels of 7", lambda m: m["preprocess"].update(channels=7), "malformed manifest")


@api_error("model-file", "manifest that is not JSON", ModelFileError, "no manifest")
def _(w):
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from iadkit.store import MANIFEST_KEY

    path = w.root / "notjson.iad"
    path.write_bytes(st_save(st_load(w.gray_model.read_bytes()), metadata={MANIFEST_KEY: "{not json"}))
    Model.load(path)


@api_error("model-file", "header length beyond the file", ModelFileError, "not an iadkit model file")
def _(w):
    Model.load(_corrupt(w, "hdr.iad", lambda raw: raw.__setitem__(slice(0, 8), (10**7).to_bytes(8, "little"))))


@handled("model-file", "written with the user's umask")
def _(w, capsys):
    old = os.umask(0o022)
    try:
        path = _fitted().save(w.fresh("umask") / "m.iad")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# == iadkit fit =====================================================================================
def _fit(w: World, out: Path | None = None, *extra: Any) -> list[Any]:
    out = out or w.root / "fit-never.iad"
    return ["fit", "-d", w.gray, "-c", "plate", "-o", out, "--image-size", 24, *extra]


def _no_fit_output(w: World) -> list[Path]:
    return [w.root / "fit-never.iad"]


cli_error("cli:fit", "unknown method", "did you mean test_pixel_zscore", no_output=_no_fit_output)(
    lambda w: _fit(w, None, "-m", "test_pixel_zscor")
)
cli_error("cli:fit", "-p without =", "key=value", no_output=_no_fit_output)(
    lambda w: _fit(w, None, "-m", "test_pixel_zscore", "-p", "eps")
)
cli_error("cli:fit", "-p unknown name", "epz", no_output=_no_fit_output)(
    lambda w: _fit(w, None, "-m", "test_pixel_zscore", "-p", "epz=1")
)
cli_error("cli:fit", "-p value out of bounds", "eps", no_output=_no_fit_output)(
    lambda w: _fit(w, None, "-m", "test_pixel_zscore", "-p", "eps=-1")
)
cli_error("cli:fit", "--image-size 0", "image-size", no_output=_no_fit_output)(
    lambda w: [
        "fit",
        "-m",
        "test_pixel_zscore",
        "-d",
        w.gray,
        "-c",
        "plate",
        "-o",
        w.root / "fit-never.iad",
        "--image-size",
        0,
    ]
)
cli_error("cli:fit", "--image-size abc", "image-size", no_output=_no_fit_output)(
    lambda w: ["fit", "-m", "test_pixel_zscore", "-d", w.gray, "-o", w.root / "fit-never.iad", "--image-size", "abc"]
)
cli_error("cli:fit", "--target-fpr 1.5", "target-fpr", no_output=_no_fit_output)(
    lambda w: _fit(w, None, "-m", "test_pixel_zscore", "--target-fpr", 1.5)
)
cli_error("cli:fit", "--target-fpr nan", "target-fpr", no_output=_no_fit_output)(
    lambda w: _fit(w, None, "-m", "test_pixel_zscore", "--target-fpr", "nan")
)
cli_error("cli:fit", "--calibration-fraction 2", "calibration-fraction", no_output=_no_fit_output)(
    lambda w: _fit(w, None, "-m", "test_pixel_zscore", "--calibration-fraction", 2)
)
cli_error("cli:fit", "--device banana", "not a device name", no_output=_no_fit_output)(
    lambda w: _fit(w, None, "-m", "test_pixel_zscore", "--device", "banana")
)
cli_error("cli:fit", "--device cuda:7", "cuda", no_output=_no_fit_output)(
    lambda w: _fit(w, None, "-m", "test_pixel_zscore", "--device", "cuda:7")
)
cli_error("cli:fit", "output exists", "--force")(lambda w: _fit(w, w.gray_model, "-m", "test_pixel_zscore"))
cli_error("cli:fit", "output folder cannot exist", "cannot create")(
    lambda w: _fit(w, w.gray_model / "sub" / "m.iad", "-m", "test_pixel_zscore")
)
cli_error("cli:fit", "output is a folder", "is a folder")(
    lambda w: _fit(w, w.root, "-m", "test_pixel_zscore", "--force")
)
cli_error("cli:fit", "--data missing", "no such folder", no_output=_no_fit_output)(
    lambda w: ["fit", "-m", "test_pixel_zscore", "-d", w.root / "nodata", "-o", w.root / "fit-never.iad"]
)
cli_error("cli:fit", "--data of an unknown layout names --layout", "--layout", no_output=_no_fit_output)(
    lambda w: ["fit", "-m", "test_pixel_zscore", "-d", w.root / "bright", "-o", w.root / "fit-never.iad"]
)
cli_error("cli:fit", "--category unknown", "not found", no_output=_no_fit_output)(
    lambda w: ["fit", "-m", "test_pixel_zscore", "-d", w.gray, "-c", "plat", "-o", w.root / "fit-never.iad"]
)
cli_error("cli:fit", "--setting unknown", "unknown setting", no_output=_no_fit_output)(
    lambda w: _fit(w, None, "-m", "test_pixel_zscore", "--setting", "vanila")
)


@handled("cli:fit", "says how many images set the threshold and warns on the resolution")
def _(w, capsys):
    out = w.fresh("fit-ok") / "m.iad"
    res = cli(capsys, *_fit(w, out, "-m", "test_pixel_zscore"))
    assert res.code == 0, res.err
    assert "from 1 held-out good images: target FPR 0.01, resolution 1" in res.text
    assert "warning: the threshold was set from 1 good image(s)" in res.text
    assert out.is_file()


@handled("cli:fit", "trains on a dataset whose test masks are missing")
def _(w, capsys):
    tree = hs.mvtec_tree(w.fresh("fit-nomask"), masks=False)
    out = tree / "m.iad"
    res = cli(capsys, "fit", "-m", "test_pixel_zscore", "-d", tree, "-c", "plate", "-o", out, "--image-size", 24)
    assert res.code == 0, res.text
    assert out.is_file()


# == iadkit predict =================================================================================
def _predict(
    w: World, out: Path | None, *extra: Any, model: Path | None = None, images: Path | None = None
) -> list[Any]:
    return [
        "predict",
        model or w.gray_model,
        images or w.gray / "plate/test",
        "--out",
        out or w.root / "pred-never",
        *extra,
    ]


def _no_predict_output(w: World) -> list[Path]:
    return [w.root / "pred-never"]


cli_error("cli:predict", "--threshold nan", "finite", no_output=_no_predict_output)(
    lambda w: _predict(w, None, "--threshold", "nan")
)
cli_error("cli:predict", "--threshold inf", "finite", no_output=_no_predict_output)(
    lambda w: _predict(w, None, "--threshold", "inf")
)
cli_error("cli:predict", "--batch-size 0", "batch-size", no_output=_no_predict_output)(
    lambda w: _predict(w, None, "--batch-size", 0)
)
cli_error("cli:predict", "--batch-size -1", "batch-size", no_output=_no_predict_output)(
    lambda w: _predict(w, None, "--batch-size", -1)
)
cli_error("cli:predict", "model file missing", "no such model file")(
    lambda w: _predict(w, None, model=w.root / "none.iad")
)
cli_error("cli:predict", "model file of random bytes", "not an iadkit model file")(
    lambda w: _predict(w, None, model=w.root / "bright/000.png")
)
cli_error("cli:predict", "image path missing", "no such file or folder", no_output=_no_predict_output)(
    lambda w: _predict(w, None, images=w.root / "nothing-here")
)
cli_error("cli:predict", "folder without images", "no images found")(
    lambda w: _predict(w, None, images=w.fresh("pred-noimg"))
)
cli_error("cli:predict", "--out is a file", "not a folder")(lambda w: _predict(w, w.gray_model))
cli_error("cli:predict", "--executor bogus", "use local or ray")(
    lambda w: _predict(w, w.fresh("pred-ex") / "o", "--executor", "bogus")
)
cli_error("cli:predict", "--address without ray", "--executor ray")(
    lambda w: _predict(w, w.fresh("pred-addr") / "o", "--address", "auto")
)
cli_error("cli:predict", "--device banana", "not a device name", no_output=_no_predict_output)(
    lambda w: _predict(w, None, "--device", "banana")
)


@cli_error("cli:predict", "an earlier run's predictions.csv without --resume", "--resume")
def _(w):
    out = w.fresh("pred-exists")
    (out / "predictions.csv").write_text("path,score,anomalous,overlay,error\n")
    return _predict(w, out)


@handled("cli:predict", "one unreadable image: the rest scored, the failure listed, exit 1")
def _(w, capsys):
    folder = w.fresh("pred-onebad")
    for p in sorted((w.gray / "plate/test/good").glob("*.png")):
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "zz-truncated.png").write_bytes((w.gray / "plate/test/good/000.png").read_bytes()[:60])
    res = cli(capsys, *_predict(w, folder / "o", images=folder))
    assert res.code == 1 and "1 image(s) could not be scored" in res.text and "zz-truncated.png" in res.text
    rows = json.loads((folder / "o/predictions.json").read_text())
    assert sum(r["error"] is None for r in rows) == 3 and rows[-1]["error"]


@handled("cli:predict", "a model that scores NaN: error rows, never a verdict")
def _(w, capsys):
    folder = w.fresh("pred-nan")
    normal = sorted((w.gray / "plate/test/good").glob("*.png"))[:2]
    for p in [*normal, *w.bright]:
        (folder / f"{p.parent.name}-{p.name}").write_bytes(p.read_bytes())
    res = cli(capsys, *_predict(w, folder / "o", model=w.nan_model, images=folder))
    assert res.code == 1 and "2 image(s) could not be scored" in res.text
    rows = json.loads((folder / "o/predictions.json").read_text())
    nan_rows = [r for r in rows if r["error"]]
    assert len(nan_rows) == 2 and all(r["anomalous"] is None and r["score"] is None for r in nan_rows)
    assert all("nan" in r["error"] for r in nan_rows)


@handled("cli:predict", "a colour image to a grayscale model: that image's error row")
def _(w, capsys):
    folder = w.fresh("pred-chan")
    (folder / "gray.png").write_bytes((w.gray / "plate/test/good/000.png").read_bytes())
    (folder / "color.png").write_bytes((w.color / "plate/test/good/000.png").read_bytes())
    res = cli(capsys, *_predict(w, folder / "o", images=folder))
    assert res.code == 1
    rows = {Path(r["path"]).name: r for r in json.loads((folder / "o/predictions.json").read_text())}
    assert rows["gray.png"]["error"] is None and "trained on grayscale" in rows["color.png"]["error"]


@handled("cli:predict", "Ctrl-C: the scored rows are kept and --resume is named", outcome="resumed")
def _(w, capsys, monkeypatch=None):
    import iadkit.batch as batch

    out = w.fresh("pred-ctrlc") / "o"
    real = batch.score_files

    def interrupted(*a, **k):
        for n, item in enumerate(real(*a, **k)):
            if n == 2:
                raise KeyboardInterrupt
            yield item

    batch.score_files = interrupted
    try:
        res = cli(capsys, *_predict(w, out, "--batch-size", 1))
    finally:
        batch.score_files = real
    assert res.code == 130 and "2 scored image(s) are kept" in res.text and "--resume" in res.text
    assert len(batch.read_scored(out / "predictions.csv")) == 2
    again = cli(capsys, *_predict(w, out, "--batch-size", 1, "--resume"))
    assert again.code == 0 and "(2 kept from the earlier run)" in again.text
    rows = json.loads((out / "predictions.json").read_text())
    assert len(rows) == 6 and len({r["path"] for r in rows}) == 6 and all(r["error"] is None for r in rows)


# == iadkit evaluate ===============================================================================
cli_error("cli:evaluate", "--data missing", "no such folder")(
    lambda w: ["evaluate", w.gray_model, "-d", w.root / "nodata"]
)
cli_error("cli:evaluate", "model corrupt", "not an iadkit model file")(
    lambda w: ["evaluate", w.root / "bright/000.png", "-d", w.gray]
)


@cli_error("cli:evaluate", "masks missing names --allow-missing-masks", "--allow-missing-masks")
def _(w):
    return ["evaluate", w.gray_model, "-d", hs.mvtec_tree(w.fresh("eval-nomask"), masks=False), "-c", "plate"]


@handled("cli:evaluate", "--allow-missing-masks gives image metrics")
def _(w, capsys):
    tree = hs.mvtec_tree(w.fresh("eval-allow"), masks=False)
    res = cli(capsys, "evaluate", w.gray_model, "-d", tree, "-c", "plate", "--allow-missing-masks", "--json")
    assert res.code == 0, res.text
    metrics = json.loads(res.out)
    assert "image_auroc" in metrics and "pixel_auroc" not in metrics


# == grid files and iadkit benchmark ===============================================================
def _grid(w: World, name: str, edit: Callable[[dict], None] | None = None, *, suffix: str = ".yaml") -> Path:
    grid = bench_support.grid(["test_pixel_zscore"], categories=["flat"])
    if edit:
        edit(grid)
    path = w.fresh(f"grid-{name}") / f"grid{suffix}"
    path.write_text(yaml.safe_dump(grid))
    return path


def _bench(w: World, name: str, edit: Callable[[dict], None] | None = None) -> list[Any]:
    path = _grid(w, name, edit)
    return ["benchmark", "--config", path, "--out", path.parent / "out"]


def _no_bench_output(name: str) -> Callable[[World], list[Path]]:
    return lambda w: [w.root / "cases" / f"grid-{name}" / "out"]


def _bench_case(name: str, edit: Callable[[dict], None], match: str) -> None:
    cli_error("cli:benchmark", name, match, no_output=_no_bench_output(name))(lambda w: _bench(w, name, edit))


_bench_case("unknown method", lambda g: g.update(methods=["test_pixel_zscor"]), "did you mean test_pixel_zscore")
_bench_case("negative image size", lambda g: g.update(image_size=-16), "image_size must be positive")
_bench_case(
    "bad hyper-parameter", lambda g: g.update(methods=[{"name": "test_pixel_zscore", "params": {"eps": -1}}]), "eps=-1"
)
_bench_case(
    "unknown hyper-parameter", lambda g: g.update(methods=[{"name": "test_pixel_zscore", "params": {"epz": 1}}]), "epz"
)
_bench_case("unknown setting", lambda g: g.update(settings=["vanila"]), "did you mean vanilla")
_bench_case(
    "unknown setting parameter", lambda g: g.update(settings=[{"name": "few_shot", "params": {"kk": 2}}]), "few_shot"
)
_bench_case(
    "dataset source that does not exist", lambda g: g.update(datasets=[{"source": "/no/such/data"}]), "no such folder"
)
_bench_case("unknown category", lambda g: g["datasets"][0].update(categories=["flta"]), "did you mean flat")
_bench_case("unknown device", lambda g: g.update(device="banana"), "not a device name")
_bench_case(
    "every problem at once",
    lambda g: g.update(methods=["nope", "test_pixel_zscore"], image_size=-1, settings=["x"]),
    r"3 problem\(s\).*unknown method 'nope'.*image_size must be positive.*unknown setting 'x'",
)
_bench_case("unknown key", lambda g: g.update(epochs=3), "Extra inputs are not permitted")
_bench_case(
    "the same cell twice", lambda g: g.update(methods=["test_pixel_zscore", "test_pixel_zscore"]), "same cell twice"
)
_bench_case("missing plugin module", lambda g: g.update(imports=["no_such_module_xyz"]), "cannot import")
_bench_case(
    "reader options on a dataset that does not exist",
    lambda g: g.update(datasets=[{"source": "mvtec:/no/where", "options": {"allow_missing_masks": True}}]),
    "no such folder",
)
cli_error("cli:benchmark", "neither --config nor --preset", "exactly one")(lambda w: ["benchmark"])
cli_error("cli:benchmark", "unknown preset", "demo, full")(
    lambda w: ["benchmark", "--preset", "nope", "--out", w.fresh("bench-preset")]
)
cli_error("cli:benchmark", "config file missing", "no such benchmark config")(
    lambda w: ["benchmark", "--config", w.root / "none.yaml"]
)
cli_error("cli:benchmark", "--workers 0", "workers")(lambda w: [*_bench(w, "workers0"), "--workers", 0])
cli_error("cli:benchmark", "--executor bogus", "unknown executor")(
    lambda w: [*_bench(w, "executor"), "--executor", "bogus"]
)
cli_error("cli:benchmark", "--db under a file", "not a folder")(
    lambda w: [*_bench(w, "db-file"), "--db", w.gray_model / "r.db"]
)


@cli_error("cli:benchmark", "invalid YAML", "cannot parse")
def _(w):
    path = w.fresh("grid-yaml") / "g.yaml"
    path.write_text("methods: [padim\n  datasets: {")
    return ["benchmark", "--config", path]


@cli_error("cli:benchmark", "grid file of an unknown format", "unknown config format")
def _(w):
    path = w.fresh("grid-txt") / "g.txt"
    path.write_text("methods: [padim]")
    return ["benchmark", "--config", path]


@handled("cli:benchmark", "every cell fails: exit 1, the failures kept in the database")
def _(w, capsys):
    args = _bench(w, "allfail", lambda g: g.update(methods=["test_bench_fail"]))
    res = cli(capsys, *args, "--no-report")
    assert res.code == 1 and "1 cells: 0 done, 1 failed" in res.text and "--retry-failed" in res.text
    from iadkit.bench import ResultsDB

    with ResultsDB(Path(args[-1]) / "results.db", writable=False) as db:
        assert [r["status"] for r in db.runs()] == ["failed"]


@handled("cli:benchmark", "no terminal: a plain progress line per cell")
def _(w, capsys):
    res = cli(capsys, *_bench(w, "plain"), "--no-report")
    assert res.code == 0, res.text
    assert re.search(r"benchmark \[0/1, \d+ s\] started test_pixel_zscore", res.err)
    assert re.search(r"benchmark \[1/1, \d+ s\] done test_pixel_zscore .* in [\d.]+ s", res.err)


# == iadkit report and the results database ========================================================
def _db_copy(w: World, name: str) -> Path:
    path = w.fresh(f"db-{name}") / "results.db"
    path.write_bytes(w.results_db.read_bytes())
    return path


def _report_refusal(name: str, make: Callable[[World], Path], match: str) -> None:
    def run(w: World, capsys) -> None:
        path = make(w)
        before = path.read_bytes() if path.is_file() else None
        out = path.parent / "report"
        res = cli(capsys, "report", path, "--out", out)
        assert_cli_error(res, match)
        assert not out.exists()
        if before is not None:
            assert path.read_bytes() == before, "the input database was modified"

    CASES.append(Case("cli:report", name, "error", run, None, match))


def _empty(w: World) -> Path:
    path = w.fresh("db-empty") / "results.db"
    path.write_bytes(b"")
    return path


def _foreign(w: World) -> Path:
    path = w.fresh("db-foreign") / "results.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE customers (id INTEGER)")
    con.commit()
    con.close()
    return path


def _junk(w: World) -> Path:
    path = w.fresh("db-junk") / "results.db"
    path.write_bytes(b"SQLite format 2\x00" + b"\xff" * 500)
    return path


def _bad_json_row(w: World) -> Path:
    path = _db_copy(w, f"badjson-{len(list((w.root / 'cases').glob('db-badjson*')))}")
    con = sqlite3.connect(path)
    con.execute("UPDATE runs SET metrics = '{\"image_auroc\": 0.9'")
    con.commit()
    con.close()
    return path


_report_refusal("missing database", lambda w: w.fresh("db-missing") / "results.db", "no such results database")
_report_refusal("empty file", _empty, "not an iadkit results database")
_report_refusal("someone else's SQLite database", _foreign, "not an iadkit results database")
_report_refusal("not SQLite at all", _junk, "not a usable results database")
_report_refusal("invalid JSON in a results row", _bad_json_row, "metrics of cell .* is invalid JSON")


@cli_error("cli:report", "--out is a file", "not a folder")
def _(w):
    return ["report", _db_copy(w, "outfile"), "--out", w.gray_model]


@api_error("results-db", "newer schema", IadkitError, "newer than this iadkit")
def _(w):
    from iadkit.bench import ResultsDB

    path = _db_copy(w, "newer")
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    ResultsDB(path, writable=False)


@api_error("results-db", "runs() with invalid JSON", IadkitError, "is invalid JSON")
def _(w):
    from iadkit.bench import ResultsDB

    with ResultsDB(_bad_json_row(w), writable=False) as db:
        db.runs()


@handled("results-db", "read-only opening never modifies the file")
def _(w, capsys):
    from iadkit.bench import ResultsDB

    path = _db_copy(w, "ro")
    before = path.read_bytes()
    with ResultsDB(path, writable=False) as db:
        assert len(db.runs()) == 1
    assert path.read_bytes() == before


# == grid files (Python) ===========================================================================
@api_error("grid", "not a mapping", IadkitError, "expected a table of keys")
def _(w):
    from iadkit.bench import BenchConfig

    path = w.fresh("gridfile-list") / "g.yaml"
    path.write_text("- padim\n- stfpm\n")
    BenchConfig.load(path)


@api_error("grid", "no methods", IadkitError, "methods")
def _(w):
    from iadkit.bench import BenchConfig

    BenchConfig.parse({"methods": [], "datasets": ["elpv"]})


@api_error("grid", "subsample of 0 test images", IadkitError, "subsample")
def _(w):
    from iadkit.bench import BenchConfig

    BenchConfig.parse({"methods": ["padim"], "datasets": [{"source": "elpv", "subsample": {"test": 0}}]})


@api_error("grid", "run_benchmark validates before creating the database", IadkitError, "did you mean")
def _(w):
    from iadkit.bench import BenchConfig, run_benchmark

    db = w.fresh("gridapi") / "r.db"
    try:
        run_benchmark(BenchConfig.parse(bench_support.grid(["test_pixel_zscor"])), db, progress=False)
    finally:
        assert not db.exists()


# == iadkit data synth and serve ===================================================================
cli_error("cli:data", "synth --out under a file", "cannot create")(
    lambda w: ["data", "synth", "--out", w.gray_model / "synth"]
)
cli_error("cli:data", "info of a missing folder", "no such folder")(lambda w: ["data", "info", w.root / "nothing"])
cli_error("cli:serve", "--port 0", "port")(lambda w: ["serve", w.gray_model, "--port", 0])
cli_error("cli:serve", "--max-pixels 0", "max-pixels")(lambda w: ["serve", w.gray_model, "--max-pixels", 0])
cli_error("cli:serve", "missing model file", "no such model file")(lambda w: ["serve", w.root / "none.iad"])


# == the server ====================================================================================
def _client(path: Path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from iadkit.serve.app import create_app
    from iadkit.serve.backend import load_predictor

    return TestClient(create_app([load_predictor(path)]))


@handled("server", "an image the model scores NaN: no score, no verdict, an error")
def _(w, capsys):
    client = _client(w.nan_model)
    files = [
        ("files", ("ok.png", (w.gray / "plate/test/good/000.png").read_bytes(), "image/png")),
        ("files", ("bright.png", w.bright[0].read_bytes(), "image/png")),
    ]
    res = client.post("/predict", files=files)
    assert res.status_code == 200, res.text
    ok, bright = res.json()["results"]
    assert ok["error"] is None and ok["verdict"] in ("good", "anomalous")
    assert (
        bright["score"] is None
        and bright["verdict"] is None
        and bright["anomalous"] is None
        and "nan" in bright["error"]
    )


@handled("server", "a colour upload to a grayscale model: 422 with the reason")
def _(w, capsys):
    client = _client(w.gray_model)
    res = client.post(
        "/predict", files=[("files", ("c.png", (w.color / "plate/test/good/000.png").read_bytes(), "image/png"))]
    )
    assert (
        res.status_code == 422
        and res.json()["detail"].startswith("c.png: a colour image")
        and "trained on grayscale" in res.json()["detail"]
    )


@handled("server", "a NaN threshold PUT is refused with 422")
def _(w, capsys):
    client = _client(w.gray_model)
    res = client.put("/models/gray/threshold", content=b'{"value": NaN}', headers={"content-type": "application/json"})
    assert res.status_code == 422


# == the command line as a whole ===================================================================
@handled("cli", "--debug shows the traceback behind the one line")
def _(w, capsys):
    res = cli(capsys, "--debug", "predict", w.root / "none.iad", w.gray, "--out", w.root / "pred-never")
    assert res.code == 2 and "Traceback" in res.err and res.err.rstrip().splitlines()[-1].startswith("error:")
    plain = cli(capsys, "predict", w.root / "none.iad", w.gray, "--out", w.root / "pred-never")
    assert plain.code == 2 and "Traceback" not in plain.err and len(plain.err.strip().splitlines()) == 1


@handled("cli", "an OSError on a user's path is one line")
def _(w, capsys):
    too_long = w.root / ("m" * 300 + ".iad")  # the system refuses the name itself (ENAMETOOLONG)
    res = cli(capsys, "predict", too_long, w.gray, "--out", w.root / "pred-never")
    assert res.code == 2 and "file name too long" in res.err.lower() and "Traceback" not in res.err


@handled("cli", "every --option named in a message exists")
def _(w, capsys):
    import click
    import typer.main

    from iadkit.cli import app

    options: set[str] = set()

    def walk(cmd: click.Command) -> None:
        for p in cmd.params:
            options.update(o for o in p.opts + p.secondary_opts if o.startswith("--"))
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    src = Path(__import__("iadkit").__file__).parent
    named: dict[str, str] = {}
    for path in src.rglob("*.py"):
        for literal in re.findall(r"f?\"[^\"\n]*\"|f?'[^'\n]*'", path.read_text(encoding="utf-8")):
            for opt in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", literal):
                named.setdefault(opt, str(path.relative_to(src)))
    outside = {"--no-deps"}  # pip's, in install hints
    missing = {o: where for o, where in named.items() if o not in options and o not in outside}
    assert not missing, f"messages name options that do not exist: {missing}"


# -- the test ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, world: World, capsys) -> None:
    if case.outcome == "error" and case.error is not None:
        with pytest.raises(case.error) as info:
            case.run(world, capsys)
        assert isinstance(info.value, IadkitError), f"{type(info.value).__name__} is not an IadkitError"
        assert re.search(case.match, str(info.value), re.I | re.S), str(info.value)
    else:
        case.run(world, capsys)


def test_case_count() -> None:
    """At least 60 cases over every entry point; the counts per entry point and outcome are
    printed for the record (``pytest -s``)."""
    counts = Counter((c.entry.split(":")[0] if c.entry.startswith("cli") else c.entry, c.outcome) for c in CASES)
    by_entry = Counter(c.entry for c in CASES)
    print("\nhostile cases:", len(CASES))
    for (entry, outcome), n in sorted(counts.items()):
        print(f"  {entry:12s} {outcome:8s} {n}")
    print("  per entry point:", dict(sorted(by_entry.items())))
    assert len(CASES) >= 60
    assert {"api", "model-file", "grid", "results-db", "server"} <= set(by_entry)
    assert {f"cli:{c}" for c in ("fit", "predict", "evaluate", "benchmark", "report", "data", "serve")} <= set(by_entry)
    assert len({c.id for c in CASES}) == len(CASES)
