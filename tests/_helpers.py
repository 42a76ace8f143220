"""Checks shared by the method tests (imported as ``from _helpers import ...``).

Each method's test module still states its own bar and what was measured; these helpers only
hold the steps that every such test repeats.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from iadkit.metrics.image import image_auroc
from iadkit.model import Model, PredictionResult
from iadkit.types import Sample


def predict_and_auroc(model: Model, samples: Sequence[Sample]) -> tuple[PredictionResult, float]:
    """Predict `samples` and return the result with its image AUROC (iadkit's definition,
    ties count one half). The labels come from the samples, so a test set without both
    good and anomalous images raises MetricUndefinedError instead of passing vacuously."""
    result = model.predict(samples)
    return result, image_auroc(result.labels, result.scores)


def assert_round_trip_identical(model: Model, samples: Sequence[Sample], path: Path) -> Model:
    """Save `model` to `path`, load it back, and require bit-identical scores and maps on
    `samples`: a model file must reproduce the fitted model exactly, not approximately.
    Returns the loaded model for the caller's method-specific checks."""
    loaded = Model.load(model.save(path))
    a, b = model.predict(samples), loaded.predict(samples)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.maps, b.maps)
    return loaded


def built(detector, *, fitted: bool = False):
    """`detector` with its networks built as `fit` would build them, without training — for
    tests of a method's pieces. `fitted=True` also lets it predict (untrained)."""
    import torch

    detector.validate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(detector.seed)
        detector._build()
    detector._is_fitted = fitted
    return detector.eval()
