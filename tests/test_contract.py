"""The detector contract, checked over every registered method (as scikit-learn's
`parametrize_with_checks`): a method added later is checked automatically.

Each method is fitted with its `smoke_params` on a tiny set with obvious defects (64 px):
fit returns self; predict gives finite float scores [N] and, when the method draws maps,
float32 maps [N, 64, 64]; predicting before fit raises NotFittedError; a model file
reproduces the scores and maps bit for bit; get_params/clone/set_params behave as in
scikit-learn; the same seed gives the same scores; every hyper-parameter refuses a value
of the wrong kind with InvalidParameterError; and defective images score higher than good
ones for at least 70 % of (good, defective) pairs (AUROC >= 0.7; the defects are large).

Semi-supervised methods (DevNet, DRA) learn from labelled defects as well: their training set
is the same 14 good images plus 4 labelled defective ones (different images from the test set).

A method that uses depth (``uses_depth``) gets the same images as `PointMapSample`s with a
point map: a slightly tilted, noisy plane 0.3 m away on which each dark blob is also a 3 mm
bump, so that colour-only, depth-only and fused methods all have a defect to find.

Declared kinds get their own checks: a zero-shot method is fitted on no images (it learns
nothing, so it may have no tensors and, when transductive, no threshold); a transductive
one scores a set the same whatever batch size the caller asks for (the set is one batch);
a continual method learns a second, different-looking task with `partial_fit` and still
ranks the first task's defects (AUROC >= 0.7), and round-trips exactly through a model
file afterwards; any other method refuses `partial_fit` with `NotContinualError`.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from iadkit.errors import IadkitError, InvalidParameterError, NotFittedError
from iadkit.methods import available_methods
from iadkit.methods.base import Detector, jsonable
from iadkit.metrics.image import image_auroc
from iadkit.model import Model
from iadkit.types import ANOMALOUS, GOOD, Sample

SIZE = 64
METHODS = sorted(name for name, cls in available_methods().items() if cls.__module__.startswith("iadkit.methods."))


def _texture(rng: np.random.Generator) -> np.ndarray:
    """A smooth grey texture with mild noise, like a brushed surface."""
    from scipy import ndimage

    base = ndimage.gaussian_filter(rng.normal(0, 1, (SIZE, SIZE)), 3)
    img = 120 + 25 * base / (np.abs(base).max() + 1e-6) + rng.normal(0, 2, (SIZE, SIZE))
    return np.repeat(img[:, :, None], 3, axis=2)


def _blob(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A texture with a dark 14x14 blob, and the blob's mask."""
    img = _texture(rng)
    mask = np.zeros((SIZE, SIZE), bool)
    r, c = rng.integers(8, SIZE - 22, 2)
    img[r : r + 14, c : c + 14] = 20
    mask[r : r + 14, c : c + 14] = True
    return img.clip(0, 255).astype(np.uint8), mask


def _plane(rng: np.random.Generator, mask: np.ndarray | None) -> np.ndarray:
    """A point map (metres) of a tilted plane 0.3 m away, 0.05 mm noise; `mask` raised 3 mm."""
    v, u = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    z = 0.3 + 0.0002 * (u - SIZE / 2) / SIZE + rng.normal(0, 5e-5, (SIZE, SIZE))
    if mask is not None:
        z = z - 0.003 * mask
    pitch = 0.05 / SIZE
    xyz = np.stack([(u - SIZE / 2) * pitch * z / 0.3, (v - SIZE / 2) * pitch * z / 0.3, z], -1)
    return xyz.astype(np.float32)


def _dataset(depth: bool = False) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """14 good training images; test: 8 good, 8 with a dark 14x14 blob (masks given); and 4
    more blob images, labelled, that semi-supervised methods add to their training set. With
    `depth`, `PointMapSample`s whose blob is also a bump in the point map."""
    from iadkit.data.point_maps import PointMapSample

    kind = PointMapSample if depth else Sample
    rng = np.random.default_rng(0)
    xyz_rng = np.random.default_rng(1)

    def extra(mask: np.ndarray | None) -> dict:
        return {"xyz": _plane(xyz_rng, mask)} if depth else {}

    train = [
        kind(path=f"mem://train/{i}", label=GOOD, image=_texture(rng).clip(0, 255).astype(np.uint8), **extra(None))
        for i in range(14)
    ]
    test = []
    for i in range(16):
        if i < 8:
            img = _texture(rng).clip(0, 255).astype(np.uint8)
            test.append(kind(path=f"mem://test/{i}", label=GOOD, defect_type="good", image=img, **extra(None)))
        else:
            img, mask = _blob(rng)
            test.append(
                kind(path=f"mem://test/{i}", label=ANOMALOUS, defect_type="blob", image=img, mask=mask, **extra(mask))
            )
    labelled = []
    for i in range(4):  # drawn after the test set, so the images above stay as they were
        img, mask = _blob(rng)
        labelled.append(
            kind(
                path=f"mem://train-defect/{i}", label=ANOMALOUS, defect_type="blob", image=img, mask=mask, **extra(mask)
            )
        )
    return train, test, labelled


_DATA = {False: _dataset(False)}


def data_for(name: str) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """The contract data set for method `name`: with point maps when it uses depth."""
    depth = bool(available_methods()[name].uses_depth)
    if depth not in _DATA:
        _DATA[depth] = _dataset(depth)
    return _DATA[depth]


def _training_set(name: str) -> list[Sample]:
    """The good training images, plus the labelled defects for a semi-supervised method."""
    train, _, labelled = data_for(name)
    if available_methods()[name].supervision == "semi-supervised":
        return train + labelled
    return train


def _model(name: str, **extra) -> Model:
    cls = available_methods()[name]
    return Model.create(name, image_size=SIZE, **{**cls.smoke_params, **extra})


@pytest.fixture(scope="module")
def fitted() -> dict[str, Model]:
    return {}


def _fit(model: Model) -> Model:
    """Fit as the settings layer does: a zero-shot method gets no training images, a
    semi-supervised one the labelled defects as well."""
    name = model.detector.name
    train = [] if model.detector.supervision == "zero-shot" else _training_set(name)
    return model.fit(train, calibration_fraction=0.15, progress=False)


def _fitted(name: str, cache: dict[str, Model]) -> Model:
    if name not in cache:
        torch.set_num_threads(1)
        model = _model(name)
        returned = model.detector.fit  # the detector's fit returns the detector itself
        assert returned is not None
        cache[name] = _fit(model)
    return cache[name]


@pytest.mark.parametrize("name", METHODS)
def test_declared_attributes(name: str) -> None:
    cls = available_methods()[name]
    assert cls.name == name and cls.family and cls.paper
    assert cls.supervision in ("unsupervised", "semi-supervised", "zero-shot")
    assert isinstance(cls.produces_maps, bool) and cls.map_sigma >= 0
    # the constructor is keyword-only and documented: every hyper-parameter in the docstring
    params = inspect.signature(cls).parameters
    assert all(p.kind == p.KEYWORD_ONLY for p in params.values())
    assert list(params) == cls.param_names()
    for n in params:
        assert f"\n    {n} : " in (cls.__doc__ or ""), f"{name}: {n} is not documented"
    with pytest.raises(TypeError):
        cls(1)  # positional arguments are refused  # type: ignore[misc]


@pytest.mark.parametrize("name", METHODS)
def test_init_stores_and_clone_round_trips(name: str) -> None:
    cls = available_methods()[name]
    det = cls(**cls.smoke_params)
    params = det.get_params()
    for k, v in cls.smoke_params.items():
        assert params[k] is v  # stored unchanged, not converted
    json.dumps(jsonable(params))  # a manifest can hold them
    clone = det.clone()
    assert type(clone) is cls and clone.get_params() == params and not clone.is_fitted
    assert clone.set_params(seed=5) is clone and clone.seed == 5 and det.seed == params["seed"]
    with pytest.raises(InvalidParameterError, match="did you mean"):
        det.set_params(sed=1)
    with pytest.raises(InvalidParameterError):
        cls(not_a_parameter=1)


@pytest.mark.parametrize("name", METHODS)
def test_every_hyper_parameter_refuses_a_wrong_value(name: str) -> None:
    cls = available_methods()[name]
    cls(**cls.smoke_params).validate()  # the defaults are valid
    for pname, (spec, _) in cls._params.items():
        bad = "not-a-valid-value" if not isinstance(spec.default, str) else object()
        det = cls(**{**cls.smoke_params, pname: bad})
        with pytest.raises(InvalidParameterError, match=pname):
            det.validate()


@pytest.mark.parametrize("name", METHODS)
def test_predict_before_fit_raises(name: str) -> None:
    model = _model(name)
    with pytest.raises(NotFittedError):
        model.detector.predict(torch.zeros(1, model.preprocess.tensor_channels, SIZE, SIZE))
    with pytest.raises(NotFittedError):
        model.predict(data_for(name)[1][:1])
    assert isinstance(NotFittedError("x"), IadkitError)


@pytest.mark.parametrize("name", METHODS)
def test_fit_predict_shapes_scores_and_ranking(name: str, fitted: dict[str, Model]) -> None:
    model = _fitted(name, fitted)
    det = model.detector
    # a method that learns from images calibrates a threshold on held-out ones
    assert det.is_fitted and (model.threshold is not None or det.supervision == "zero-shot")
    test = data_for(name)[1]
    result = model.predict(test)
    n = len(test)
    assert result.scores.shape == (n,) and np.issubdtype(result.scores.dtype, np.floating)
    assert np.isfinite(result.scores).all()
    if det.draws_maps():
        assert result.maps is not None and result.maps.shape == (n, SIZE, SIZE) and result.maps.dtype == np.float32
        assert np.isfinite(result.maps).all()
    else:
        assert result.maps is None
    auroc = image_auroc(result.labels, result.scores)
    assert auroc >= 0.7, f"{name}: image AUROC {auroc:.3f} on large dark blobs"
    # learned state is named with a trailing underscore; the frozen backbone is not saved
    tensors, _ = det.state()
    assert tensors or det.supervision == "zero-shot", "a method that learns must have learned tensors"
    assert all(k.split(".")[0].endswith("_") for k in tensors), sorted(tensors)[:5]
    assert not any(k.startswith(det.frozen_prefixes) for k in tensors) if det.frozen_prefixes else True


@pytest.mark.parametrize("name", METHODS)
def test_model_file_round_trip_is_exact(name: str, fitted: dict[str, Model], tmp_path) -> None:
    model = _fitted(name, fitted)
    loaded = Model.load(model.save(tmp_path / f"{name}.iad"))
    test = data_for(name)[1][:6]
    a, b = model.predict(test), loaded.predict(test)
    np.testing.assert_array_equal(a.scores, b.scores)
    if a.maps is not None:
        np.testing.assert_array_equal(a.maps, b.maps)
    assert loaded.detector.get_params() == model.detector.get_params()
    assert loaded.threshold == model.threshold and loaded.postprocess == model.postprocess


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_gives_the_same_scores(name: str, fitted: dict[str, Model]) -> None:
    first = _fitted(name, fitted)
    torch.manual_seed(1234)  # the global generator's state must not matter
    test = data_for(name)[1]
    again = _fit(_model(name))
    np.testing.assert_allclose(again.predict(test).scores, first.predict(test).scores, rtol=1e-5, atol=1e-6)


def _other_task() -> list[Sample]:
    """A second task that looks different from the first: the training textures inverted."""
    return [Sample(path=f"mem://task2/{i}", label=GOOD, image=255 - s.image) for i, s in enumerate(_DATA[False][0])]


CONTINUAL = [n for n in METHODS if available_methods()[n].continual]
TRANSDUCTIVE = [n for n in METHODS if available_methods()[n].transductive]


@pytest.mark.parametrize("name", CONTINUAL)
def test_continual_method_keeps_the_first_task(name: str, tmp_path) -> None:
    torch.set_num_threads(1)
    model = _model(name).fit(_DATA[False][0], calibration_fraction=0.15, progress=False)
    first = model.predict(_DATA[False][1]).scores
    assert model.partial_fit(_other_task(), calibration_fraction=0.15, progress=False) is model
    assert model.info["n_tasks"] == 2
    result = model.predict(_DATA[False][1])
    auroc = image_auroc(result.labels, result.scores)
    assert auroc >= 0.7, f"{name}: image AUROC {auroc:.3f} on the first task after learning a second"
    alone = _model(name).fit(_other_task(), calibration_fraction=0.15, progress=False)
    assert not np.allclose(alone.predict(_DATA[False][1]).scores, result.scores), (
        "partial_fit rebuilt the detector from scratch"
    )
    assert np.isfinite(first).all()
    loaded = Model.load(model.save(tmp_path / f"{name}.iad"))
    np.testing.assert_array_equal(loaded.predict(_DATA[False][1][:6]).scores, model.predict(_DATA[False][1][:6]).scores)


@pytest.mark.parametrize("name", [n for n in METHODS if not available_methods()[n].continual])
def test_non_continual_method_refuses_partial_fit(name: str) -> None:
    from iadkit.methods.base import NotContinualError

    model = _model(name)
    with pytest.raises(NotContinualError, match="warm_start=True"):
        model.detector.partial_fit(None)  # type: ignore[arg-type]  (refused before the data is read)
    with pytest.raises(NotContinualError):
        model.partial_fit(_DATA[False][0], progress=False)


@pytest.mark.parametrize("name", TRANSDUCTIVE)
def test_transductive_method_scores_the_set_as_one_batch(name: str, fitted: dict[str, Model]) -> None:
    from iadkit.evaluation import evaluate

    model = _fitted(name, fitted)
    whole = model.predict(_DATA[False][1], batch_size=16).scores
    np.testing.assert_array_equal(model.predict(_DATA[False][1], batch_size=3).scores, whole)
    np.testing.assert_array_equal(evaluate(model, _DATA[False][1], batch_size=2).scores, whole)


def test_every_method_module_is_checked() -> None:
    import pkgutil

    import iadkit.methods as pkg

    modules = {m.name for m in pkgutil.iter_modules(pkg.__path__)} - {"base", "params"}
    registered = {available_methods()[n].__module__.rsplit(".", 1)[1] for n in METHODS}
    assert modules <= registered, f"method modules not registered: {sorted(modules - registered)}"
    assert all(issubclass(available_methods()[n], Detector) for n in METHODS)
