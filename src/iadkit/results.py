"""`PredictionResult`: what `Model.predict` and the exported runtime (`iadkit.runtime`) return.

Kept free of torch so that the torch-free runtime returns the very same type as the model
it was exported from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class PredictionResult:
    """Per-image scores, verdicts and anomaly maps.

    Parameters
    ----------
    paths : list of str
        The images' paths (``array://i`` for arrays given in memory).
    scores : ndarray
        [N] image scores; higher is more anomalous.
    maps : ndarray or list of ndarray, optional
        [N, H, W] float32 maps at the model's input size; for a tiled prediction a list of
        each image's map at its own full resolution (images may differ in size). None for
        image-level methods or when maps were not kept.
    threshold : float, optional
        The operating point the verdicts use (a score above it is a defect).
    labels : ndarray
        [N] known labels (0 good, 1 anomalous, -1 unknown), when the inputs carried them.
    """

    paths: list[str]
    scores: np.ndarray  # [N] float
    maps: np.ndarray | list[np.ndarray] | None  # [N, H, W] float32, or per-image maps when tiled
    threshold: float | None
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # [N], -1 = unknown

    @property
    def verdicts(self) -> np.ndarray:
        """True = defective. Needs a threshold (set by calibration or given at predict time)."""
        if self.threshold is None:
            raise ValueError("this model has no threshold: calibrate it or pass threshold=...")
        return self.scores > self.threshold

    def rows(self) -> list[dict[str, Any]]:
        verdicts = self.verdicts if self.threshold is not None else [None] * len(self.paths)
        return [
            {"path": p, "score": float(s), "anomalous": None if v is None else bool(v)}
            for p, s, v in zip(self.paths, self.scores, verdicts)
        ]


__all__ = ["PredictionResult"]
