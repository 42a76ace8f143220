"""The two values that flow through iadkit: a `Sample` going in, a `Prediction` coming out.

Labels follow the field's convention: 0 = good, 1 = anomalous, -1 = unknown (an
unlabelled image to be scored). Higher anomaly scores always mean "more anomalous".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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
    `true_label` is set only by a setting that disguises a sample (see `iadkit.settings.noisy`).
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
    # "binary": a mask holds 0 and one other value; "nonzero": any nonzero pixel is a defect
    # (masks that number their defect regions, as VisA's and KolektorSDD2's do).
    mask_values: str = "binary"
    # The real label when a setting hides it from the method on purpose: the noisy setting
    # presents a defective test image as good (label 0, true_label 1), so the benchmark can
    # say afterwards which training images were noise. None: `label` is the truth.
    true_label: int | None = None

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

        Several mask files (MVTec LOCO: one per defect) are merged. With
        ``mask_values="nonzero"`` (VisA, KolektorSDD2: masks numbering each defect region) any
        nonzero pixel is a defect; otherwise a mask must be strictly binary. A good image
        without a mask file gets an all-False mask of `shape` when a shape is given, because
        for metrics a good image's mask is known to be empty.
        """
        if self.mask is not None:
            return self.mask
        paths = ([self.mask_path] if self.mask_path is not None else []) + list(self.mask_paths)
        if paths:
            from iadkit.data.io import read_mask

            merged: np.ndarray | None = None
            for p in paths:
                m = read_mask(p, expected_shape=shape, nonzero=self.mask_values == "nonzero", image_path=self.path)
                merged = m if merged is None else (merged | m)
            return merged
        if self.label == GOOD and shape is not None:
            return np.zeros(shape, dtype=bool)
        return None

    def with_label(self, label: int) -> Sample:
        return replace(self, label=label)


@dataclass
class Prediction:
    """What a detector returns: image scores [B] and anomaly maps [B, h, w] (float32).

    From a detector, maps may be at feature resolution and `scores` may be None (meaning "the
    maximum of the post-processed map"); after the model's `Postprocess`, maps are at the
    input size and scores are always set. `maps` is None for image-level methods.
    """

    scores: torch.Tensor | None
    maps: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.scores is None and self.maps is None:
            raise ValueError("a Prediction needs scores or maps")
        if self.scores is not None and self.scores.ndim != 1:
            raise ValueError(f"Prediction.scores must be 1-D [B], got shape {tuple(self.scores.shape)}")
        if self.maps is not None and (
            self.maps.ndim != 3 or (self.scores is not None and self.maps.shape[0] != self.scores.shape[0])
        ):
            raise ValueError(f"Prediction.maps must be [B, H, W] matching the scores, got {tuple(self.maps.shape)}")

    def __len__(self) -> int:
        ref = self.scores if self.scores is not None else self.maps
        assert ref is not None
        return int(ref.shape[0])
