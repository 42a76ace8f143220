"""iadkit serve, HTTP API: every endpoint and every refusal, on a real (tiny) PatchCore model."""

from __future__ import annotations

import base64
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from _serve_helpers import SIZE, copy_named, fit_tiny_patchcore
from iadkit.data.io import read_image
from iadkit.serve.app import Limits, create_app
from iadkit.serve.backend import TorchPredictor, load_predictor


@pytest.fixture(scope="module")
def split(synthetic):
    return synthetic("metal", image_size=SIZE)


@pytest.fixture(scope="module")
def model_file(split, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-model") / "metal.iad"
    fit_tiny_patchcore(split).save(path)
    return path


@pytest.fixture(scope="module")
def images(split, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-images")
    good = [s for s in split.test if s.label == 0][:2]
    bad = [s for s in split.test if s.label == 1][:2]
    return copy_named(good, folder, "good") + copy_named(bad, folder, "bad")


@pytest.fixture()
def predictor(model_file):
    return load_predictor(model_file)  # fresh per test: threshold PUTs must not leak between tests


@pytest.fixture()
def client(predictor):
    return TestClient(create_app([predictor]))


def files_field(paths, content_type="image/png"):
    return [("files", (Path(p).name, Path(p).read_bytes(), content_type)) for p in paths]


def png_array(data_url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :]))))


# -- reading ----------------------------------------------------------------------------------
def test_health_and_models(client, predictor, model_file):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["models"] == ["metal"]
    assert health["limits"] == {
        "max_request_bytes": 64 << 20,
        "max_file_bytes": 20 << 20,
        "max_files": 32,
        "max_pixels": 80_000_000,
        "max_decoded_bytes": 1 << 30,
    }
    (described,) = client.get("/models").json()
    import iadkit
    from iadkit.store import read_manifest

    manifest = read_manifest(model_file)
    assert described == {
        "name": "metal",
        "method": "patchcore",
        "runtime": "torch",
        "iadkit_version": iadkit.__version__,
        "model_iadkit_version": manifest["iadkit_version"],
        "threshold": manifest["threshold"]["value"],
        "threshold_rule": "false_alarm_rate",
        "input_size": [SIZE, SIZE],
        "map_range": manifest["postprocess"]["map_range"],
    }
    assert client.get("/models/metal").json() == described
    missing = client.get("/models/nope")
    assert missing.status_code == 404 and missing.json()["detail"] == "no model named 'nope'; served: metal"


def test_predict_matches_model_predict(client, predictor, images):
    response = client.post("/predict", files=files_field(images))
    assert response.status_code == 200, response.text
    body = response.json()
    model = predictor.model
    direct = model.predict([str(p) for p in images])
    thr = model.threshold.value
    assert body["model"] == "metal" and body["threshold"] == thr and body["input_size"] == [SIZE, SIZE]
    assert [r["filename"] for r in body["results"]] == [p.name for p in images]
    scores = np.array([r["score"] for r in body["results"]])
    np.testing.assert_allclose(scores, direct.scores, rtol=1e-6)
    for r, score in zip(body["results"], scores):
        assert r["anomalous"] == bool(score > thr) and r["verdict"] == ("anomalous" if score > thr else "good")
        assert r["threshold"] == thr

    lo, hi = model.map_range
    for r, path, amap in zip(body["results"], images, direct.maps):
        seen = png_array(r["image"])
        over = png_array(r["overlay"])
        assert seen.shape == over.shape == (SIZE, SIZE, 3) and seen.dtype == np.uint8
        # the plain image is the file in the model's geometry (64 x 64 from 64 x 64: unchanged)
        np.testing.assert_array_equal(
            seen, read_image(path)[:, :, :3] if read_image(path).shape[2] == 3 else np.repeat(read_image(path), 3, 2)
        )
        # where the map is at or below the low end of the range the photo is untouched,
        # where it is in the top half the heat-map colour is blended in
        calm, hot = amap <= lo, amap >= (lo + hi) / 2
        assert calm.any() and hot.any()
        np.testing.assert_array_equal(over[calm], seen[calm])
        assert np.abs(over[hot].astype(int) - seen[hot].astype(int)).mean() > 20


def test_predict_routes_and_several_models(predictor, model_file, images):
    second = load_predictor(model_file, "metal-strict")
    second.set_threshold(-1e9)  # everything anomalous
    client = TestClient(create_app([predictor, second]))
    ambiguous = client.post("/predict", files=files_field(images[:1]))
    assert ambiguous.status_code == 422 and "?model=NAME" in ambiguous.json()["detail"]
    a = client.post("/predict?model=metal", files=files_field(images[:1])).json()
    b = client.post("/models/metal-strict/predict", files=files_field(images[:1])).json()
    assert a["results"][0]["score"] == b["results"][0]["score"]
    assert a["results"][0]["verdict"] == "good" and b["results"][0]["verdict"] == "anomalous"
    assert client.post("/predict?model=nope", files=files_field(images[:1])).status_code == 404
    assert client.post("/models/nope/predict", files=files_field(images[:1])).status_code == 404
    assert [m["name"] for m in client.get("/models").json()] == ["metal", "metal-strict"]
    with pytest.raises(ValueError, match="two models are named 'metal'"):
        create_app([predictor, load_predictor(model_file)])


# -- threshold ----------------------------------------------------------------------------------
def test_threshold_put_moves_the_operating_point(client, images):
    scores = [r["score"] for r in client.post("/predict", files=files_field(images)).json()["results"]]
    middle = float(np.median(scores))
    response = client.put("/models/metal/threshold", json={"value": middle})
    assert response.status_code == 200, response.text
    assert response.json()["threshold"] == middle and response.json()["threshold_rule"] == "manual"
    assert client.get("/models/metal").json()["threshold"] == middle
    results = client.post("/predict", files=files_field(images)).json()["results"]
    assert [r["anomalous"] for r in results] == [s > middle for s in scores]
    assert {r["threshold"] for r in results} == {middle}
    assert client.put("/models/metal/threshold", json={"value": 3}).json()["threshold"] == 3.0  # an int is a number
    assert client.put("/models/nope/threshold", json={"value": 1.0}).status_code == 404


@pytest.mark.parametrize(
    "body, expected",
    [
        ('{"value": NaN}', "finite number"),
        ('{"value": Infinity}', "finite number"),
        ('{"value": -Infinity}', "finite number"),
        ('{"value": 1e999}', "finite number"),  # overflows to inf when parsed
        ('{"value": "0.5"}', "valid number"),
        ('{"value": true}', "valid number"),
        ('{"value": null}', "valid number"),
        ('{"value": [1]}', "valid number"),
        ("{}", "value: Field required"),
        ('{"value": 1, "extra": 2}', "extra: Extra inputs are not permitted"),
        ("0.5", "valid dictionary"),
        ("not json", "not valid JSON"),
    ],
)
def test_threshold_put_refuses_non_numbers(client, body, expected):
    before = client.get("/models/metal").json()["threshold"]
    response = client.put("/models/metal/threshold", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert expected in response.json()["detail"]
    assert client.get("/models/metal").json()["threshold"] == before


def test_predictor_refuses_non_finite_threshold(predictor):
    with pytest.raises(ValueError, match="finite"):
        predictor.set_threshold(float("nan"))


# -- refusals --------------------------------------------------------------------------------
def test_size_limits_413(predictor, images):
    size = images[0].stat().st_size
    client = TestClient(
        create_app([predictor], limits=Limits(max_request_bytes=4 * size + 2000, max_file_bytes=size - 1, max_files=3))
    )
    one_too_big = client.post("/predict", files=files_field(images[:1]))
    assert one_too_big.status_code == 413
    assert re.fullmatch(
        rf"{images[0].name}: {size} bytes is over the per-file limit of {size - 1} bytes", one_too_big.json()["detail"]
    )

    client = TestClient(create_app([predictor], limits=Limits(max_request_bytes=10 * size, max_files=3)))
    too_many = client.post("/predict", files=files_field(images))  # 4 files
    assert (
        too_many.status_code == 413
        and too_many.json()["detail"] == "more than 3 files in one request; send them in batches"
    )

    client = TestClient(create_app([predictor], limits=Limits(max_request_bytes=size)))
    declared = client.post("/predict", files=files_field(images[:2]))  # announced by Content-Length
    assert declared.status_code == 413 and "request body over the limit" in declared.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(100):
            yield b"x" * 1024

    streamed = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413 and "request body over the limit" in streamed.json()["detail"]

    # small files that decode to more pixels than allowed: room for the first image only
    client = TestClient(create_app([predictor], limits=Limits(max_decoded_bytes=read_image(images[0]).nbytes + 1)))
    pixels = client.post("/predict", files=files_field(images[:2]))
    assert pixels.status_code == 413
    assert pixels.json()["detail"].startswith(f"{images[1].name}: the images of this request decode to more than")


def test_content_type_415(client, images, tmp_path):
    not_multipart = client.post("/predict", json={"files": "x"})
    assert not_multipart.status_code == 415 and "expected multipart/form-data" in not_multipart.json()["detail"]
    text = client.post("/predict", files=[("files", ("notes.txt", b"hello", "text/plain"))])
    assert text.status_code == 415
    assert (
        text.json()["detail"]
        == "notes.txt: content type text/plain: not an accepted image type (BMP, JPEG, PNG, TIFF, WebP)"
    )
    generic = client.post("/predict", files=[("files", ("notes.txt", b"hello", "application/octet-stream"))])
    assert generic.status_code == 415 and "name suggesting text/plain" in generic.json()["detail"]
    # a script that sends no type: judged by the file name, and a real PNG passes
    untyped = client.post("/predict", files=files_field(images[:1], "application/octet-stream"))
    assert untyped.status_code == 200 and untyped.json()["results"][0]["filename"] == images[0].name


def test_undecodable_and_empty_422(client, images):
    data = images[0].read_bytes()
    truncated = client.post(
        "/predict", files=[*files_field(images[1:2]), ("files", ("broken-07.png", data[: len(data) // 2], "image/png"))]
    )
    assert truncated.status_code == 422
    assert truncated.json()["detail"].startswith("broken-07.png: ") and "truncated" in truncated.json()["detail"]
    fake = client.post("/predict", files=[("files", ("fake.jpg", b"this is not a jpeg", "image/jpeg"))])
    assert fake.status_code == 422 and fake.json()["detail"].startswith("fake.jpg: not an image")
    empty = client.post("/predict", files=[("files", ("empty.png", b"", "image/png"))])
    assert empty.status_code == 422 and empty.json()["detail"].startswith("empty.png: file is empty")
    no_file = client.post("/predict", data={"note": "no files"}, files=[])
    assert no_file.status_code in (415, 422)  # urlencoded (415) or an empty multipart body (422)
    boundary = "XyZ"
    empty_multipart = client.post(
        "/predict",
        content=f"--{boundary}--\r\n".encode(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert empty_multipart.status_code == 422 and empty_multipart.json()["detail"].startswith("no image in the request")


def test_no_request_path_reaches_the_disk(client, images):
    # an upload named like a path is only a label; nothing is opened or written under it
    response = client.post("/predict", files=[("files", ("../../etc/passwd", images[0].read_bytes(), "image/png"))])
    assert response.status_code == 200 and response.json()["results"][0]["filename"] == "../../etc/passwd"
    for url in ("/static/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/models/..%2F..%2Fetc%2Fpasswd"):
        assert client.get(url).status_code == 404


def test_page_is_served_offline(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    for name, media in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = client.get(f"/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(media)
    # nothing on the page comes from another host (it must work with no network)
    for text in (page.text, client.get("/app.js").text, client.get("/style.css").text):
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE)
    assert client.get("/docs").status_code == 404  # Swagger UI would load from a CDN


# -- construction and CLI ------------------------------------------------------------------------
def test_load_predictor_errors(model_file, tmp_path):
    from iadkit.errors import IadkitError, ModelFileError

    with pytest.raises(ModelFileError, match="no such model file"):
        load_predictor(tmp_path / "missing.iad")
    with pytest.raises(IadkitError, match="not usable in a URL"):
        load_predictor(model_file, "bad name/..")
    with pytest.raises(ModelFileError, match=r"not an exported model.*iadkit export"):
        load_predictor(model_file, runtime="onnx")
    with pytest.raises(IadkitError, match="unknown runtime 'tf'"):
        load_predictor(model_file, runtime="tf")
    assert isinstance(load_predictor(model_file, "other"), TorchPredictor)


# -- the exported runtime (--runtime onnx) ----------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_file(model_file):
    from iadkit.model import Model

    return Model.load(model_file).export_onnx(model_file.with_suffix(".onnx"))


def test_onnx_runtime_serves_the_same_results(onnx_file, model_file, images):
    from iadkit.errors import ModelFileError
    from iadkit.serve.backend import OnnxPredictor

    onnx_predictor = load_predictor(onnx_file, runtime="onnx")
    assert isinstance(onnx_predictor, OnnxPredictor) and onnx_predictor.name == "metal"
    torch_predictor = load_predictor(model_file, "metal-torch")
    client = TestClient(create_app([onnx_predictor, torch_predictor]))
    (described,) = [m for m in client.get("/models").json() if m["name"] == "metal"]
    assert described["runtime"] == "onnx" and described["method"] == "patchcore"
    assert described["input_size"] == [SIZE, SIZE] and described["map_range"] == list(torch_predictor.map_range)
    assert described["threshold"] == torch_predictor.threshold and described["threshold_rule"] == "false_alarm_rate"
    a = client.post("/predict?model=metal", files=files_field(images)).json()["results"]
    b = client.post("/predict?model=metal-torch", files=files_field(images)).json()["results"]
    np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], rtol=1e-4, atol=1e-4)
    assert [r["verdict"] for r in a] == [r["verdict"] for r in b]
    for ra, rb in zip(a, b):
        assert np.array_equal(png_array(ra["image"]), png_array(rb["image"]))  # the same view of the image
        over_a, over_b = png_array(ra["overlay"]), png_array(rb["overlay"])
        assert over_a.shape == over_b.shape == (SIZE, SIZE, 3)
        assert np.abs(over_a.astype(int) - over_b.astype(int)).max() <= 1  # colours from maps equal to 1e-4
    moved = client.put("/models/metal/threshold", json={"value": -1e9})
    assert moved.status_code == 200 and moved.json()["threshold_rule"] == "manual"
    assert {r["verdict"] for r in client.post("/predict?model=metal", files=files_field(images)).json()["results"]} == {
        "anomalous"
    }
    with pytest.raises(ModelFileError, match="serve it with --runtime onnx"):
        load_predictor(onnx_file)


def test_onnx_server_runs_without_torch(onnx_file, images):
    import subprocess

    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from iadkit.serve.app import create_app\n"
        "from iadkit.serve.backend import load_predictor\n"
        f"client = TestClient(create_app([load_predictor({str(onnx_file)!r}, runtime='onnx')]))\n"
        f"files = [('files', (p.rsplit('/', 1)[-1], open(p, 'rb').read(), 'image/png')) for p in {[str(p) for p in images]!r}]\n"
        "r = client.post('/predict', files=files)\n"
        "assert r.status_code == 200, r.text\n"
        "assert len(r.json()['results']) == 4\n"
        "assert 'torch' not in sys.modules, 'the ONNX server imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_serve_onnx_with_tiles(onnx_file, monkeypatch):
    from typer.testing import CliRunner

    import iadkit.serve.app as serve_app
    from iadkit.cli import app
    from iadkit.serve.backend import OnnxPredictor

    seen = {}
    monkeypatch.setattr(serve_app, "run", lambda predictors, **kw: seen.update(predictors=predictors, **kw))
    result = CliRunner().invoke(app, ["serve", str(onnx_file), "--runtime", "onnx", "--tile", "48", "--overlap", "0.5"])
    assert result.exit_code == 0, result.output
    (predictor,) = seen["predictors"]
    assert (
        isinstance(predictor, OnnxPredictor)
        and predictor.model.tiling.tile == 48
        and predictor.model.tiling.overlap == 0.5
    )


def test_cli_serve_builds_the_app(model_file, monkeypatch):
    from typer.testing import CliRunner

    import iadkit.serve.app as serve_app
    from iadkit.cli import app

    seen = {}
    monkeypatch.setattr(serve_app, "run", lambda predictors, **kw: seen.update(predictors=predictors, **kw))
    result = CliRunner().invoke(
        app, ["serve", str(model_file), f"b={model_file}", "--port", "8123", "--max-files", "5"]
    )
    assert result.exit_code == 0, result.output
    assert [p.name for p in seen["predictors"]] == ["metal", "b"]
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123 and seen["limits"].max_files == 5
    assert "page: http://127.0.0.1:8123/" in result.output
    clash = CliRunner().invoke(app, ["serve", str(model_file), str(model_file)])
    assert clash.exit_code != 0 and "would both be served as 'metal'" in str(clash.exception)


def test_missing_extra_is_one_line(monkeypatch, capsys, model_file):
    import iadkit.serve as serve_pkg
    from iadkit.cli import main

    real = serve_pkg.find_spec
    monkeypatch.setattr(serve_pkg, "find_spec", lambda name: None if name == "fastapi" else real(name))
    monkeypatch.setattr(sys, "argv", ["iadkit", "serve", str(model_file)])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: iadkit serve needs fastapi: pip install 'iadkit[serve]'"
