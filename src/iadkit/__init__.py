"""iadkit: industrial image anomaly detection, offline and CPU-first.

Five lines from images to verdicts::

    import iadkit
    train, test = iadkit.load_dataset("synthetic:./demo-out/synth", category="fabric")
    model = iadkit.Model.create("patchcore", image_size=224).fit(train)  # holds out 10 % for the threshold
    result = model.predict(test)                  # scores, verdicts, anomaly maps
    print(iadkit.evaluate(model, test).metrics)   # image/pixel AUROC, AP, F1-max, AUPRO
    model.save("fabric.iad")                      # safetensors + JSON manifest
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.2.0"

# Public names, imported on first use so `import iadkit` (and the CLI's --help) stays quick.
_LAZY = {
    "Model": "iadkit.model",
    "PredictionResult": "iadkit.results",
    "evaluate": "iadkit.evaluation",
    "EvaluationResult": "iadkit.evaluation",
    "load_dataset": "iadkit.data",
    "list_categories": "iadkit.data",
    "Sample": "iadkit.types",
    "Prediction": "iadkit.types",
    "Preprocess": "iadkit.data.transforms",
    "ImageSet": "iadkit.data.transforms",
    "available_methods": "iadkit.methods",
    "available_settings": "iadkit.settings",
    "predict_folder": "iadkit.batch",
    "load_model": "iadkit.store",
}

__all__ = [*sorted(_LAZY), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'iadkit' has no attribute {name!r}")
