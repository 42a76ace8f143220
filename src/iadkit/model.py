"""`Model`: a detector together with everything needed to use it identically everywhere.

A Model is the unit users fit, save, load, evaluate, export and serve: the detector (method
and learned tensors), the preprocessing, the post-processing (map upsampling and smoothing,
heat-map colour range) and the operating threshold. `predict`, `iadkit.evaluate`, the benchmark and the server all go through it, so
training and deployment see the same pixels and the same post-processing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from iadkit.components.postprocess import Postprocess, heatmap_range
from iadkit.data.transforms import ImageSet, Preprocess
from iadkit.errors import (
    CalibrationWarning,
    InvalidInputError,
    InvalidParameterError,
    NonFiniteScoreError,
    TrainingDataError,
)
from iadkit.methods.base import Detector, get_method
from iadkit.thresholds import Threshold, false_alarm_threshold, manual_threshold, resolution_note
from iadkit.types import ANOMALOUS, GOOD, UNKNOWN, Prediction, Sample

log = logging.getLogger(__name__)

ImageInput = Sample | str | Path | np.ndarray

# One default for the API and the CLI: hold out 10 % of the good training images to set the
# threshold, when at least 10 good images remain to train on.
DEFAULT_CALIBRATION_FRACTION = 0.1
MIN_TRAIN_FOR_HOLDOUT = 10


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
            raise InvalidInputError(f"cannot predict on {type(item).__name__}: give a Sample, a path or an HxWxC array")
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
        """True = defective. Needs a threshold (set by calibration or given at predict time).

        Raises `NonFiniteScoreError` when any score is NaN or infinite: a comparison with NaN
        is always false, so such an image would silently pass as good. `rows()` gives the
        other images their verdicts and marks those with an error instead.
        """
        if self.threshold is None:
            raise ValueError("this model has no threshold: calibrate it or pass threshold=...")
        if not math.isfinite(self.threshold):
            raise InvalidParameterError(f"the threshold is {self.threshold}, not a finite number: no verdict can be given")
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


class Model:
    """A fitted detector plus its preprocessing, post-processing and operating threshold.

    Parameters
    ----------
    detector : Detector
        The method, fitted or not.
    preprocess : Preprocess
        How image files become the detector's input tensors.
    postprocess : Postprocess, optional
        How the detector's raw maps become anomaly maps at input size (upsampling, the
        paper's smoothing, the map maximum as score) and the heat-map colour range.
        Default: the method's own smoothing, no colour range yet.
    threshold : Threshold, optional
        The operating point: a score above it is a defect.
    info : dict, optional
        Facts about training (dataset, category, image counts, timings), saved with the model.
    """

    def __init__(
        self,
        detector: Detector,
        preprocess: Preprocess,
        *,
        postprocess: Postprocess | None = None,
        threshold: Threshold | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.detector = detector
        self.preprocess = preprocess
        self.postprocess = postprocess if postprocess is not None else Postprocess(sigma=detector.map_sigma)
        self.threshold = threshold
        self.info = dict(info or {})

    # -- construction --------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        method: str,
        *,
        image_size: int | tuple[int, int] | None = None,
        crop_size: int | tuple[int, int] | None = None,
        sigma: float | None = None,
        paper: bool = False,
        **params: Any,
    ) -> "Model":
        """A new, unfitted model.

        Parameters
        ----------
        method : str
            A registered method name (``iadkit methods`` lists them).
        image_size, crop_size : int or (int, int)
            Resize to `image_size` (default 224, or the paper's with `paper`), then optionally
            centre-crop to `crop_size` (pixels).
        sigma : float, optional
            Map smoothing, Gaussian sigma in pixels of a 224-px input (scaled to the input
            size). Default: the method's paper value (``Detector.map_sigma``).
        paper : bool
            Start from the paper's configuration (``Detector.paper_params``: its backbone,
            epochs, widths; and its input size) instead of the CPU-sized defaults; `params`
            still override it. Torchvision backbones need the user's weight file
            (``weights_path=``, see ``iadkit weights``).
        **params
            The method's hyper-parameters (see its class docstring).
        """
        method_cls = get_method(method)
        if paper:
            params = {**method_cls.paper_params, **params}
            if image_size is None:
                image_size = method_cls.paper_image_size
        detector = method_cls(**params)
        mean, std = detector.input_normalization()
        preprocess = Preprocess(image_size=224 if image_size is None else image_size, crop_size=crop_size, mean=mean, std=std)
        post = Postprocess(sigma=detector.map_sigma if sigma is None else _check_sigma(sigma))
        return cls(detector, preprocess, postprocess=post)

    @property
    def method(self) -> str:
        return self.detector.name

    @property
    def map_range(self) -> tuple[float, float] | None:
        """The heat-map colour range (``postprocess.map_range``)."""
        return self.postprocess.map_range

    def to(self, device: str | torch.device) -> "Model":
        self.detector.to(device)
        return self

    # -- training ------------------------------------------------------------------------
    def fit(
        self,
        train: Sequence[Sample] | ImageSet,
        *,
        calibration: Sequence[Sample] | None = None,
        calibration_fraction: float | None = None,
        target_fpr: float = 0.01,
        seed: int = 0,
        progress: bool = True,
        warm_start: bool = False,
    ) -> "Model":
        """Fit the detector on good images, then calibrate the threshold.

        Parameters
        ----------
        train : samples or ImageSet
            Good images; labelled defects (label 1) too for semi-supervised methods. An
            unsupervised method is given the good ones only.
        calibration : samples, optional
            Good images the detector does not train on, to set the threshold.
        calibration_fraction : float, optional
            Without `calibration`, hold out this share of the good training images (at
            least one) to set the threshold. Default: 10 %, and only when at least 10 good
            images remain to train on (the CLI's default too); 0 holds out nothing.
        target_fpr : float
            False-alarm rate on good images that the threshold allows.
        seed : int
            Seed of the hold-out draw.
        progress : bool
            Show progress bars (plain lines when not on a terminal).
        warm_start : bool
            Keep a fitted detector's networks and learned state and train it again on
            `train` only (naive sequential fine-tuning: `Detector.fit`). A continual method
            learns a new task without forgetting with `partial_fit` instead.

        A zero-shot method trains on nothing: `train` may be empty. A transductive one
        (scores relative to the batch: MuSc) gets no threshold from calibration, since a
        batch of good images alone sets none that holds for a mixed batch (`set_threshold`).
        """
        return self._train(train, calibration, calibration_fraction, target_fpr, seed, progress, warm_start, False)

    def partial_fit(
        self,
        train: Sequence[Sample] | ImageSet,
        *,
        calibration: Sequence[Sample] | None = None,
        calibration_fraction: float | None = None,
        target_fpr: float = 0.01,
        seed: int = 0,
        progress: bool = True,
    ) -> "Model":
        """Learn one more task (a new product) and keep the ones learned before, then
        calibrate the threshold on the new task's held-out good images.

        Only for continual methods (``detector.continual``: dne, continual_bank); another
        method raises `NotContinualError` (``fit(..., warm_start=True)`` trains it on the new
        task, forgetting the old ones). Parameters as in `fit`; `info["n_tasks"]` counts the
        tasks learned.
        """
        return self._train(train, calibration, calibration_fraction, target_fpr, seed, progress, False, True)

    def _train(
        self,
        train: Sequence[Sample] | ImageSet,
        calibration: Sequence[Sample] | None,
        calibration_fraction: float | None,
        target_fpr: float,
        seed: int,
        progress: bool,
        warm_start: bool,
        new_task: bool,
    ) -> "Model":
        from iadkit.methods.base import NotContinualError

        if new_task and not self.detector.continual:
            raise NotContinualError(
                f"{self.detector.name} is not a continual method: it cannot learn a new task and keep the old ones. "
                "Use fit(train, warm_start=True) for naive sequential fine-tuning (it forgets), "
                "or a continual method such as dne or continual_bank"
            )
        samples = list(train.samples) if isinstance(train, ImageSet) else list(train)
        zero_shot = self.detector.supervision == "zero-shot"
        if not samples and not zero_shot:
            raise TrainingDataError("no training images")
        if calibration_fraction is not None and not 0.0 <= calibration_fraction < 1.0:
            raise InvalidParameterError(f"calibration_fraction must be in [0, 1), got {calibration_fraction}")
        if isinstance(target_fpr, bool) or not isinstance(target_fpr, (int, float)) or not 0.0 <= target_fpr < 1.0:
            # checked before training, not after it
            raise InvalidParameterError(f"target_fpr must be a number in [0, 1), got {target_fpr!r}")
        samples = self._usable_training(samples) if samples else []
        if calibration is None and samples:
            if calibration_fraction is None:
                samples, calibration = split_calibration(samples, DEFAULT_CALIBRATION_FRACTION, seed, MIN_TRAIN_FOR_HOLDOUT)
            elif calibration_fraction > 0:
                samples, calibration = split_calibration(samples, calibration_fraction, seed, 1)
        if self.detector.transductive:
            calibration = None  # its scores are relative to a batch: see fit()
        start = time.perf_counter()
        train_set = ImageSet(samples, dataclasses.replace(self.preprocess, channels=None))
        continuing = (new_task or warm_start) and self.detector.is_fitted
        if new_task:
            self.detector.partial_fit(train_set, progress=progress)
        else:
            self.detector.fit(train_set, warm_start=warm_start, progress=progress)
        if samples:
            channels = self._training_channels(train_set)
            if continuing and channels != self.preprocess.channels:
                channels = None  # tasks of both kinds (gray and colour): accept both
            self.preprocess = dataclasses.replace(self.preprocess, channels=channels)
        self.info.update(
            n_train=len(samples),
            n_train_anomalous=sum(1 for s in samples if s.label == ANOMALOUS),
            fit_seconds=time.perf_counter() - start,
            n_tasks=int(self.info.get("n_tasks", 0)) + 1 if continuing else 1,
        )
        if calibration:
            start = time.perf_counter()
            self._calibrate(calibration, target_fpr, 16, stacklevel=4)  # the user's fit()/partial_fit()
            self.info.update(n_calibration=len(calibration), calibration_seconds=time.perf_counter() - start)
        else:
            self.threshold = None
            if self.detector.transductive or (zero_shot and not samples):
                log.info(
                    "%s is %s: the model has no threshold (set one with set_threshold())",
                    self.detector.name,
                    "transductive (scores relative to the batch)" if self.detector.transductive else "zero-shot",
                )
            else:
                log.warning(
                    "no calibration images (%d good training images): the model has no threshold yet; "
                    "give calibration= good images or call calibrate()",
                    sum(1 for s in samples if s.label == GOOD),
                )
        return self

    @staticmethod
    def _training_channels(train_set: ImageSet) -> int | None:
        """Grayscale (1) or colour (3), as the training images were; None when they mix both
        (a warning) or none was read. Predicting then refuses images of the other kind."""
        kinds = set(train_set.channel_kinds)
        if not kinds:  # the detector read its images through another ImageSet
            from iadkit.data.transforms import channel_kind

            kinds = {channel_kind(s.load_image()) for s in train_set.samples}
        if len(kinds) == 1:
            return next(iter(kinds))
        if kinds:
            log.warning(
                "the training images mix grayscale and colour images: the model will accept both, "
                "but gray images are scored as three equal colour channels"
            )
        return None

    def _usable_training(self, samples: list[Sample]) -> list[Sample]:
        """The images the detector may learn from: an unsupervised method gets the good ones."""
        if self.detector.supervision == "semi-supervised":
            return samples
        good = [s for s in samples if s.label != ANOMALOUS]
        if len(good) < len(samples):
            log.info(
                "%s is unsupervised: training on the %d good images, ignoring %d labelled defects",
                self.detector.name,
                len(good),
                len(samples) - len(good),
            )
        if not good:
            raise TrainingDataError(f"{self.detector.name} needs good training images; got labelled defects only")
        return good

    def calibrate(self, good: Sequence[ImageInput], *, target_fpr: float = 0.01, batch_size: int = 16) -> Threshold:
        """Set the threshold for a target false-alarm rate on good images only, and the
        heat-map colour range from their maps.

        The threshold's details record how many images set it (``n_good``) and the
        false-alarm resolution they give (``resolution`` = 1/n). A `CalibrationWarning`
        says so when the target is finer than that resolution.
        """
        return self._calibrate(good, target_fpr, batch_size)

    def _calibrate(self, good: Sequence[ImageInput], target_fpr: float, batch_size: int, stacklevel: int = 3) -> Threshold:
        """`calibrate`, called from `calibrate` or `fit` (the warning points at their caller)."""
        result = self.predict(good, batch_size=batch_size)
        self.threshold = false_alarm_threshold(result.scores, target_fpr)
        note = resolution_note(self.threshold)
        if note:
            warnings.warn(note, CalibrationWarning, stacklevel=stacklevel)
        if result.maps is not None:
            self.postprocess = self.postprocess.with_range(heatmap_range(result.maps))
        return self.threshold

    def set_threshold(self, value: float) -> None:
        self.threshold = manual_threshold(value)

    # -- inference -----------------------------------------------------------------------
    @torch.inference_mode()
    def predict_tensor(self, images: torch.Tensor) -> Prediction:
        """Preprocessed images [B, 3, H, W] -> scores and input-size maps on the CPU."""
        self.detector.check_fitted()
        self.detector.eval()
        raw = self.detector.predict(images.to(self.detector.device))
        pred = self.postprocess(raw, (int(images.shape[-2]), int(images.shape[-1])))
        assert pred.scores is not None
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
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidParameterError(f"batch_size must be a positive integer, got {batch_size!r}")
        if threshold is not None:
            threshold = manual_threshold(threshold).value  # a NaN threshold would call everything good
        dataset = inputs if isinstance(inputs, ImageSet) else ImageSet(as_samples(inputs), self.preprocess, cache=False)
        if self.detector.transductive:  # scores relative to the other images: one batch
            batch_size = max(1, len(dataset))
        scores, maps = [], []
        batches = dataset.batches(batch_size)
        if progress:
            from iadkit.progress import track

            batches = track(batches, total=dataset.num_batches(batch_size), description="predict")
        for batch in batches:
            pred = self.predict_tensor(batch.images)
            assert pred.scores is not None
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


def split_calibration(
    samples: list[Sample], fraction: float, seed: int, min_train: int = 1
) -> tuple[list[Sample], list[Sample] | None]:
    """(training samples, held-out good images for the threshold) — a seeded draw of
    `fraction` of the good images, at least one, only when at least `min_train` good images
    remain to train on; otherwise nothing is held out."""
    good_idx = [i for i, s in enumerate(samples) if s.label != ANOMALOUS]
    n_cal = max(1, int(round(fraction * len(good_idx))))
    if len(good_idx) - n_cal < max(1, min_train):
        return samples, None
    order = np.random.default_rng(seed).permutation(len(good_idx))
    held = {good_idx[i] for i in order[:n_cal]}
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


def check_device(device: str, option: str = "device") -> str:
    """`device` if torch knows it and this machine has it; else `InvalidParameterError`
    naming `option` (``"--device"`` in the CLI) and what to use instead."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidParameterError(f"{option} {device!r} is not a device name; use cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError(f"{option} {device}: no CUDA GPU is available here; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidParameterError(
            f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s) (cuda:0 ...); choose one of them"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidParameterError(f"{option} {device}: Apple MPS is not available here; use cpu")
    return device


def _check_sigma(sigma: Any) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0 or sigma == float("inf"):
        raise InvalidParameterError(f"sigma must be a finite number >= 0 (pixels at a 224-px input), got {sigma!r}")
    return float(sigma)
