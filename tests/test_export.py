"""ONNX export and the torch-free runtime: parity with the torch model, for every method that exports.

The same image files go through `Model.predict` (torch) and through `iadkit.runtime` (the
exported graph in ONNX Runtime, preprocessing in numpy): scores and maps agree within 1e-4
(relative for large values), verdicts are identical. The files are 80 px, the models take
64 px (shrinking resize) and, for PatchCore, 96 px (enlarging) and 16-bit grayscale files.
The runtime runs batches of 3 and 2, the exporter traced 2: a graph that depended on the
traced batch would fail here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import iadkit
import iadkit.runtime as runtime
from iadkit.errors import ExportError, NotFittedError
from iadkit.methods import available_methods
from iadkit.model import Model

pytestmark = pytest.mark.filterwarnings("ignore::iadkit.errors.CalibrationWarning")  # tiny calibration sets on purpose

SIZE = 64
FILE_SIZE = 80
METHODS = sorted(name for name, cls in available_methods().items() if cls.__module__.startswith("iadkit.methods."))
# Methods that cannot be exported, with the reason. The README's list of exporting methods is
# METHODS minus these.
NOT_EXPORTING: dict[str, str] = {
    "btf": "uses depth: the runtime reads image files only (export_onnx refuses it with ExportError)",
    "musc": "transductive: an image's score depends on the whole set (export_onnx refuses it with ExportError)",
}


def test_methods_that_cannot_export_say_why(tmp_path):
    from iadkit.export.onnx import check_exportable

    model = Model.create("musc", image_size=SIZE, **available_methods()["musc"].smoke_params).fit([], progress=False)
    with pytest.raises(ExportError, match="transductive"):
        check_exportable(model)


def test_continual_bank_exports_its_routing(synthetic, tmp_path):
    """Two tasks learned one after the other: the exported graph routes each image to its
    own task's bank as the torch model does (a traced Python branch would route every image
    to the task of the image the tracer saw)."""
    metal = synthetic("metal", image_size=FILE_SIZE, n_train=8, n_test_good=2, n_test_per_defect=1)
    wood = synthetic("wood", image_size=FILE_SIZE, n_train=8, n_test_good=2, n_test_per_defect=1)
    model = Model.create("continual_bank", image_size=SIZE, **available_methods()["continual_bank"].smoke_params)
    model.fit(metal.train, calibration_fraction=0.2, progress=False)
    model.partial_fit(wood.train, calibration_fraction=0.2, progress=False)
    files = [s.path for s in metal.test[:3]] + [s.path for s in wood.test[:3]]
    routes = model.detector.route(
        torch.stack([model.preprocess(np.asarray(Image.open(f).convert("RGB"))) for f in files])
    )
    assert set(routes.tolist()) == {0, 1}
    exported = runtime.load(model.export_onnx(tmp_path / "bank.onnx"), threads=1, batch_size=4)
    ref, got = model.predict(files), exported.predict(files)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(got.maps, ref.maps, rtol=TOL, atol=TOL)


TOL = 1e-4
# Maps whose float32 rounding is amplified by the method's arithmetic, with the reason:
MAP_TOL = {
    # 1 - SSIM: local variances are E[x^2] - E[x]^2 of nearly equal numbers, so the kernels'
    # different summation order (torch vs ONNX Runtime) moves a pixel by ~1e-4 (seen: 1.2e-4)
    "autoencoder": 5e-4,
}


@pytest.fixture(scope="module")
def split(synthetic):
    return synthetic("metal", image_size=FILE_SIZE, n_train=10, n_test_good=3, n_test_per_defect=1)


@pytest.fixture(scope="module")
def test_files(split):
    good = [s.path for s in split.test if s.label == 0][:3]
    bad = [s.path for s in split.test if s.label == 1][:2]
    return good + bad


@pytest.fixture(scope="module")
def fitted(split, test_files):
    cache: dict[tuple[str, int], Model] = {}

    def get(name: str, size: int = SIZE) -> Model:
        if (name, size) not in cache:
            torch.manual_seed(0)
            cls = available_methods()[name]
            model = Model.create(name, image_size=size, **cls.smoke_params)
            train = list(split.train)
            if cls.supervision == "semi-supervised":  # a few labelled defects, none of the test files
                train += [s for s in split.test if s.label == 1 and s.path not in test_files][:3]
            cache[(name, size)] = model.fit(train, calibration_fraction=0.2, progress=False)
        return cache[(name, size)]

    return get


def assert_parity(model: Model, exported: runtime.ExportedModel, inputs) -> dict[str, float]:
    ref = model.predict(inputs)
    got = exported.predict(inputs)
    assert got.paths == ref.paths
    np.testing.assert_allclose(got.scores, ref.scores, rtol=TOL, atol=TOL)
    assert (ref.maps is None) == (got.maps is None)
    if ref.maps is not None:
        assert got.maps.shape == ref.maps.shape and got.maps.dtype == np.float32
        tol = MAP_TOL.get(model.detector.name, TOL)
        np.testing.assert_allclose(got.maps, ref.maps, rtol=tol, atol=tol)
    assert got.threshold == ref.threshold == model.threshold.value
    # identical verdicts (a score within float noise of the threshold would be a tie, not a bug)
    near = np.abs(ref.scores - ref.threshold) <= TOL * max(1.0, abs(ref.threshold))
    assert not near.any(), "a test score lies on the threshold; choose other images"
    assert np.array_equal(got.verdicts, ref.verdicts)
    out = {"scores": float(np.abs(got.scores - ref.scores).max()), "score_scale": float(np.abs(ref.scores).max())}
    if ref.maps is not None:
        out.update(maps=float(np.abs(got.maps - ref.maps).max()), map_scale=float(np.abs(ref.maps).max()))
    return out


@pytest.mark.parametrize("name", [m for m in METHODS if m not in NOT_EXPORTING])
def test_runtime_equals_model(name, fitted, test_files, tmp_path):
    model = fitted(name)
    path = model.export_onnx(tmp_path / f"{name}.onnx")
    exported = runtime.load(path, threads=1, batch_size=3)
    assert exported.method == name and exported.input_size == (SIZE, SIZE)
    assert exported.map_range == model.map_range and exported.draws_maps == model.detector.draws_maps()
    diffs = assert_parity(model, exported, test_files)
    meta = exported.metadata
    assert meta["self_check"]["scores_max_abs_diff"] <= 1e-3 * meta["self_check"]["scores_scale"]
    assert meta["batch"] == (1 if name == "spade" else "dynamic")
    print(f"parity {name}: {diffs}")


def test_metadata_carries_everything_a_runtime_needs(fitted, tmp_path):
    model = fitted("patchcore")
    path = model.export_onnx(tmp_path / "p.onnx")
    meta = runtime.read_metadata(path)
    assert meta["format"] == "iadkit-onnx" and meta["format_version"] == 1
    assert meta["iadkit_version"] == iadkit.__version__ and meta["method"] == "patchcore"
    assert meta["params"] == json.loads(json.dumps(model.detector.get_params()))
    assert meta["preprocess"] == model.preprocess.to_dict()
    assert meta["postprocess"] == model.postprocess.to_dict() and meta["postprocess"]["sigma"] == 4.0
    assert meta["threshold"] == model.threshold.to_dict()
    assert meta["input"]["shape"] == [None, 3, SIZE, SIZE] and meta["outputs"] == ["scores", "maps"]
    assert meta["backbone"]["sha256"] and meta["tiling"] is None
    import onnx

    proto = onnx.load(str(path))
    assert proto.producer_name == "iadkit"
    # the memory bank is in the graph once (not a second copy for the search index)
    bank = model.detector.memory_bank_.numpy()
    same = [t for t in proto.graph.initializer if tuple(t.dims) == bank.shape]
    assert len(same) == 1


def test_second_input_size(fitted, test_files, tmp_path):
    model = fitted("patchcore", 96)  # 80-px files enlarged to 96
    exported = runtime.load(model.export_onnx(tmp_path / "p96.onnx"), threads=1)
    assert exported.input_size == (96, 96)
    assert_parity(model, exported, test_files)


def test_grayscale_model(split, tmp_path):
    """A model trained on 16-bit grayscale files: the same files through both paths."""
    folder = tmp_path / "gray"
    folder.mkdir()

    def gray16(sample, name):
        rgb = (
            np.asarray(Image.open(sample.path).convert("L"), dtype=np.uint16) * 257 + 3
        )  # 16-bit, not a multiple of 257
        path = folder / name
        Image.fromarray(rgb).save(path)
        return str(path)

    train = [gray16(s, f"train{i}.png") for i, s in enumerate(split.train)]
    tests = [gray16(s, f"test{i}.png") for i, s in enumerate(split.test[:5])]
    from iadkit.data.io import read_image

    assert read_image(tests[0]).dtype == np.uint16 and read_image(tests[0]).shape[2] == 1
    from iadkit.types import GOOD, Sample

    torch.manual_seed(0)
    model = Model.create("patchcore", image_size=SIZE, coreset_ratio=0.1)
    model.fit([Sample(path=p, label=GOOD) for p in train], calibration_fraction=0.2, progress=False)
    exported = runtime.load(model.export_onnx(tmp_path / "gray.onnx"), threads=1)
    assert_parity(model, exported, tests)
    arrays = [read_image(p)[:, :, 0] for p in tests]  # HxW arrays too
    np.testing.assert_allclose(exported.predict(arrays).scores, model.predict(arrays).scores, rtol=TOL, atol=TOL)
    # a colour image is refused by both, with the same message naming it
    colour = np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    from iadkit.errors import ImageReadError, InvalidParameterError

    with pytest.raises(ImageReadError) as from_model:
        model.predict([arrays[0], colour])
    with pytest.raises(ImageReadError) as from_runtime:
        exported.predict([arrays[0], colour])
    assert str(from_runtime.value) == str(from_model.value)
    assert str(from_runtime.value).startswith("array://1: a colour image, but this model was trained on grayscale")
    with pytest.raises(InvalidParameterError, match="finite"):
        exported.predict(arrays[:1], threshold=float("nan"))


def test_runtime_does_not_import_torch(fitted, test_files, tmp_path):
    path = fitted("patchcore").export_onnx(tmp_path / "p.onnx")
    code = (
        "import sys, iadkit.runtime as rt\n"
        "assert 'torch' not in sys.modules, 'import iadkit.runtime imported torch'\n"
        f"m = rt.load({str(path)!r}, threads=1)\n"
        f"r = m.predict({[str(f) for f in test_files]!r})\n"
        "assert r.maps.shape == (5, 64, 64) and len(r.verdicts) == 5\n"
        "assert 'torch' not in sys.modules, 'predicting imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- what does not export, and files that are not exports ------------------------------------
def test_faiss_search_refuses_with_a_way_out(fitted, tmp_path):
    model = fitted("patchcore")
    model.detector.set_params(search="ivf")
    try:
        with pytest.raises(ExportError, match=r"search='ivf' cannot be exported.*set_params\(search='exact'\)"):
            model.export_onnx(tmp_path / "x.onnx")
    finally:
        model.detector.set_params(search="exact")
    assert not (tmp_path / "x.onnx").exists()


def test_unfitted_model_refuses(tmp_path):
    with pytest.raises(NotFittedError):
        Model.create("patchcore", image_size=SIZE).export_onnx(tmp_path / "x.onnx")


def test_runtime_refuses_foreign_and_missing_files(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(foreign))
    with pytest.raises(ExportError, match="without iadkit metadata"):
        runtime.load(foreign)
    with pytest.raises(ExportError, match="no such exported model"):
        runtime.load(tmp_path / "missing.onnx")


def test_cli_export(fitted, test_files, tmp_path):
    from typer.testing import CliRunner

    from iadkit.cli import app

    model_file = fitted("padim").save(tmp_path / "m.iad")
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["export", str(model_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "exported padim" in result.output and out.is_file()
    again = CliRunner().invoke(app, ["export", str(model_file), "--out", str(out)])
    assert again.exit_code != 0 and "exists" in str(again.exception)
    assert_parity(Model.load(model_file), runtime.load(out, threads=1), test_files)
