"""The two values that flow through iadkit: a `Sample` going in, a `Prediction` coming out.

Labels follow the field's convention: 0 = good, 1 = anomalous, -1 = unknown (an
unlabelled image to be scored). Higher anomaly scores always mean "more anomalous".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

GOOD = 0
ANOMALOUS = 1
UNKNOWN = -1

LABEL_NAMES = {GOOD: "good", ANOMALOUS: "anomalous", UNKNOWN: "unknown"}


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, loaded lazily.

    `path` names the file (or a stable identifier for in-memory data such as ELPV, e.g.
    ``elpv://0042``). `image` is set only for in-memory data; otherwise `load_image()` reads
    `path`. Images are HxWxC arrays, C in {1, 3}, dtype uint8 or uint16 (16-bit precision is
    kept until normalisation). Masks are HxW bool arrays, True = defective pixel.
    """

    path: str
    label: int = UNKNOWN
    category: str = ""
    defect_type: str = ""
    mask_path: str | None = None
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)
    # For masks stored as several files (MVTec LOCO: a folder of PNGs per defect), merged.
    mask_paths: tuple[str, ...] = ()

    @property
    def is_anomalous(self) -> bool:
        return self.label == ANOMALOUS

    @property
    def has_mask(self) -> bool:
        return self.mask is not None or self.mask_path is not None or bool(self.mask_paths)

    def load_image(self) -> np.ndarray:
        if self.image is not None:
            return self.image
        from iadkit.data.io import read_image

        return read_image(self.path)

    def load_mask(self, shape: tuple[int, int] | None = None) -> np.ndarray | None:
        """The pixel mask (HxW bool), or None when this sample has none.

        A good image without a mask file gets an all-False mask of `shape` when a shape is
        given, because for metrics a good image's mask is known to be empty.
        """
        if self.mask is not None:
            return self.mask
        from iadkit.data.io import read_mask

        if self.mask_path is not None:
            return read_mask(self.mask_path, expected_shape=shape)
        if self.mask_paths:
            merged = None
            for p in self.mask_paths:
                m = read_mask(p, expected_shape=shape)
                merged = m if merged is None else (merged | m)
            return merged
        if self.label == GOOD and shape is not None:
            return np.zeros(shape, dtype=bool)
        return None

    def with_label(self, label: int) -> "Sample":
        return replace(self, label=label)


@dataclass
class Prediction:
    """Scores [B] and anomaly maps [B, H, W] at the preprocessed input size (float32)."""

    scores: torch.Tensor
    maps: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.scores.ndim != 1:
            raise ValueError(f"Prediction.scores must be 1-D [B], got shape {tuple(self.scores.shape)}")
        if self.maps is not None and (self.maps.ndim != 3 or self.maps.shape[0] != self.scores.shape[0]):
            raise ValueError(
                f"Prediction.maps must be [B, H, W] with B={self.scores.shape[0]}, got {tuple(self.maps.shape)}"
            )

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def concat(parts: list["Prediction"]) -> "Prediction":
        scores = torch.cat([p.scores for p in parts])
        maps = None if any(p.maps is None for p in parts) else torch.cat([p.maps for p in parts])
        return Prediction(scores=scores, maps=maps)


ProgressCallback = Callable[[str, float], None]
