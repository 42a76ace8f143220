"""`PredictionResult`: what `Model.predict` and the exported runtime (`iadkit.runtime`) return.

Kept free of torch so that the torch-free runtime returns the very same type as the model
it was exported from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from iadkit.errors import InvalidParameterError, NonFiniteScoreError


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
        """True = defective. Needs a threshold (set by calibration or given at predict time).

        Raises `NonFiniteScoreError` when any score is NaN or infinite: a comparison with NaN
        is always false, so such an image would silently pass as good. `rows()` gives the
        other images their verdicts and marks those with an error instead.
        """
        if self.threshold is None:
            raise ValueError("this model has no threshold: calibrate it or pass threshold=...")
        if not math.isfinite(self.threshold):
            raise InvalidParameterError(
                f"the threshold is {self.threshold}, not a finite number: no verdict can be given"
            )
        bad = np.flatnonzero(~np.isfinite(np.asarray(self.scores, dtype=np.float64)))
        if bad.size:
            first = ", ".join(f"{self.paths[i]} ({self.scores[i]})" for i in bad[:3])
            raise NonFiniteScoreError(
                f"{bad.size} of {len(self.scores)} image(s) scored NaN or infinity, so no verdict can be given "
                f"(first: {first}); the model file may be damaged or the images unlike any it was trained on. "
                "rows() lists every image with its verdict or error"
            )
        return self.scores > self.threshold

    def rows(self) -> list[dict[str, Any]]:
        """One dict per image: path, score, anomalous (None without a threshold) and error
        (None, or why the image has no score: a NaN or infinite score gets no verdict)."""
        thr = self.threshold
        out: list[dict[str, Any]] = []
        for p, s in zip(self.paths, self.scores):
            s = float(s)
            if not math.isfinite(s):
                error = f"the model scored this image {s}: not a number it can judge"
                out.append({"path": p, "score": None, "anomalous": None, "error": error})
            else:
                anomalous = None if thr is None else bool(s > thr)
                out.append({"path": p, "score": s, "anomalous": anomalous, "error": None})
        return out


__all__ = ["PredictionResult"]
