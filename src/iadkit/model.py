"""`Model`: a detector together with everything needed to use it identically everywhere.

A Model is the unit users fit, save, load, evaluate, export and serve: the detector (method
and learned tensors), the preprocessing, the operating threshold and the heatmap display
range. `predict`, `iadkit.evaluate`, the benchmark and the server all go through it, so
training and deployment see the same pixels and the same post-processing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from iadkit.data.transforms import ImageSet, Preprocess
from iadkit.methods.base import Detector, create
from iadkit.thresholds import Threshold, f1_optimal_threshold, false_alarm_threshold, manual_threshold
from iadkit.types import UNKNOWN, Prediction, Sample

log = logging.getLogger(__name__)

ImageInput = Sample | str | Path | np.ndarray


def as_samples(inputs: Iterable[ImageInput]) -> list[Sample]:
    """Accept samples, file paths and arrays alike."""
    samples = []
    for i, item in enumerate(inputs):
        if isinstance(item, Sample):
            samples.append(item)
        elif isinstance(item, (str, Path)):
            samples.append(Sample(path=str(item)))
        elif isinstance(item, np.ndarray):
            samples.append(Sample(path=f"array://{i}", image=item))
        else:
            raise TypeError(f"cannot predict on {type(item).__name__}: give a Sample, a path or an HxWxC array")
    return samples


@dataclass
class PredictionResult:
    """Per-image scores, verdicts and anomaly maps (maps at the model's input size)."""

    paths: list[str]
    scores: np.ndarray  # [N] float
    maps: np.ndarray | None  # [N, H, W] float32
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


class Model:
    """A fitted detector plus preprocessing, threshold and display range."""

    def __init__(
        self,
        detector: Detector,
        preprocess: Preprocess,
        *,
        threshold: Threshold | None = None,
        map_range: tuple[float, float] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.detector = detector
        self.preprocess = preprocess
        self.threshold = threshold
        self.map_range = map_range
        self.info = dict(info or {})

    # -- construction --------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        method: str,
        *,
        image_size: int | tuple[int, int] = 224,
        crop_size: int | tuple[int, int] | None = None,
        **params: Any,
    ) -> "Model":
        """A new, unfitted model. `params` are the method's hyper-parameters.

        The normalisation comes from the method's backbone (its weights were trained with
        particular mean/std), or ImageNet statistics for methods without one.
        """
        detector = create(method, **params)
        mean, std = detector_normalization(detector)
        return cls(detector, Preprocess(image_size=image_size, crop_size=crop_size, mean=mean, std=std))

    @property
    def method(self) -> str:
        return self.detector.name

    def to(self, device: str | torch.device) -> "Model":
        self.detector.to(device)
        return self

    # -- training ------------------------------------------------------------------------
    def fit(
        self,
        train: Sequence[Sample] | ImageSet,
        *,
        calibration: Sequence[Sample] | None = None,
        calibration_fraction: float = 0.0,
        target_fpr: float = 0.01,
        seed: int = 0,
        progress: bool = True,
    ) -> "Model":
        """Fit the detector on good images, then calibrate the threshold.

        The threshold needs good images the detector has not seen (scores of training images
        are optimistically low). Give them as `calibration`, or set `calibration_fraction` to
        hold out that share of `train`. Without either, the threshold is left unset and a
        warning says so; it can be set later with `calibrate`.
        """
        samples = list(train.samples) if isinstance(train, ImageSet) else list(train)
        if not samples:
            raise ValueError("no training images")
        if calibration is None and calibration_fraction > 0:
            rng = np.random.default_rng(seed)
            order = rng.permutation(len(samples))
            n_cal = max(1, int(round(calibration_fraction * len(samples))))
            if len(samples) - n_cal < 1:
                raise ValueError("calibration_fraction leaves no training images")
            calibration = [samples[i] for i in order[:n_cal]]
            samples = [samples[i] for i in sorted(order[n_cal:])]
        self.detector.fit(ImageSet(samples, self.preprocess), progress=progress)
        self.info.update(n_train=len(samples))
        if calibration:
            self.calibrate(calibration, target_fpr=target_fpr)
        else:
            log.warning("no calibration images: the model has no threshold yet (use calibrate())")
        return self

    def calibrate(self, good: Sequence[ImageInput], *, target_fpr: float = 0.01, batch_size: int = 16) -> Threshold:
        """Set the threshold for a target false-alarm rate on good images only."""
        result = self.predict(good, batch_size=batch_size)
        self.threshold = false_alarm_threshold(result.scores, target_fpr)
        self._set_map_range(result)
        return self.threshold

    def calibrate_f1(self, labelled: Sequence[Sample], *, batch_size: int = 16) -> Threshold:
        """Set the F1-optimal threshold from labelled good and defective images."""
        result = self.predict(labelled, batch_size=batch_size)
        labels = np.array([s.label for s in labelled])
        self.threshold = f1_optimal_threshold(labels, result.scores)
        good = labels == 0
        if good.any() and result.maps is not None:
            self._set_map_range(
                PredictionResult(paths=[], scores=result.scores[good], maps=result.maps[good], threshold=None)
            )
        return self.threshold

    def set_threshold(self, value: float) -> None:
        self.threshold = manual_threshold(value)

    def _set_map_range(self, good_result: PredictionResult) -> None:
        """Heatmap colour range fixed from good images, so a good part never looks alarming:
        the low end is the median good pixel, the high end the largest good pixel."""
        if good_result.maps is None or good_result.maps.size == 0:
            return
        lo = float(np.median(good_result.maps))
        hi = float(good_result.maps.max())
        if hi <= lo:
            hi = lo + 1e-6
        self.map_range = (lo, hi)

    # -- inference -----------------------------------------------------------------------
    @torch.inference_mode()
    def predict_tensor(self, images: torch.Tensor) -> Prediction:
        """Preprocessed images [B, 3, H, W] -> scores and maps on the CPU."""
        self.detector.check_fitted()
        self.detector.eval()
        pred = self.detector.predict(images.to(self.detector.device))
        return Prediction(
            scores=pred.scores.float().cpu(), maps=None if pred.maps is None else pred.maps.float().cpu()
        )

    def predict(
        self,
        inputs: Sequence[ImageInput] | ImageSet,
        *,
        batch_size: int = 16,
        threshold: float | None = None,
        keep_maps: bool = True,
        progress: bool = False,
    ) -> PredictionResult:
        """Score images (samples, paths or arrays). `threshold` overrides the stored one."""
        dataset = inputs if isinstance(inputs, ImageSet) else ImageSet(as_samples(inputs), self.preprocess, cache=False)
        scores, maps = [], []
        batches = dataset.batches(batch_size)
        if progress:
            from iadkit.progress import track

            batches = track(batches, total=dataset.num_batches(batch_size), description="predict")
        for batch in batches:
            pred = self.predict_tensor(batch.images)
            scores.append(pred.scores.numpy())
            if keep_maps and pred.maps is not None:
                maps.append(pred.maps.numpy())
        thr = threshold if threshold is not None else (self.threshold.value if self.threshold else None)
        return PredictionResult(
            paths=[s.path for s in dataset.samples],
            scores=np.concatenate(scores) if scores else np.zeros(0),
            maps=np.concatenate(maps) if maps else None,
            threshold=thr,
            labels=np.array([s.label if s.label is not None else UNKNOWN for s in dataset.samples]),
        )

    # -- files -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from iadkit.store import save_model

        return save_model(self, path)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> "Model":
        from iadkit.store import load_model

        return load_model(path, device=device)

    def __repr__(self) -> str:
        thr = f"{self.threshold.value:.4g} ({self.threshold.rule})" if self.threshold else "unset"
        return f"Model(method={self.method!r}, input={self.preprocess.output_size}, threshold={thr})"


def detector_normalization(detector: Detector) -> tuple[tuple[float, ...], tuple[float, ...]]:
    backbone = getattr(detector, "backbone", None)
    if backbone is not None and hasattr(backbone, "mean") and hasattr(backbone, "std"):
        return tuple(backbone.mean), tuple(backbone.std)
    from iadkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    return IMAGENET_MEAN, IMAGENET_STD
