"""`Model`: a detector together with everything needed to use it identically everywhere.

A Model is the unit users fit, save, load, evaluate, export and serve: the detector (method
and learned tensors), the preprocessing, the post-processing (map upsampling and smoothing,
heat-map colour range) and the operating threshold. `predict`, `iadkit.evaluate`, the benchmark and the server all go through it, so
training and deployment see the same pixels and the same post-processing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iadkit.components.postprocess import Postprocess, heatmap_range
from iadkit.data.transforms import ImageSet, Preprocess, _pair, _triple
from iadkit.errors import (
    CalibrationWarning,
    ImageReadError,
    InvalidInputError,
    InvalidParameterError,
    TrainingDataError,
)
from iadkit.methods.base import Detector, get_method
from iadkit.results import PredictionResult
from iadkit.thresholds import Threshold, false_alarm_threshold, manual_threshold, resolution_note
from iadkit.tiling import Tiling, predict_tiled, resolve_tiling
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
    tiling : Tiling, optional
        Set when the model was fitted on tiles (``fit(..., tile=...)``): predictions then cut
        images larger than a tile into the same tiles (see `iadkit.tiling`).
    """

    def __init__(
        self,
        detector: Detector,
        preprocess: Preprocess,
        *,
        postprocess: Postprocess | None = None,
        threshold: Threshold | None = None,
        info: dict[str, Any] | None = None,
        tiling: Tiling | None = None,
    ) -> None:
        self.detector = detector
        self.preprocess = preprocess
        self.postprocess = postprocess if postprocess is not None else Postprocess(sigma=detector.map_sigma)
        self.threshold = threshold
        self.info = dict(info or {})
        self.tiling = tiling

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
    ) -> Model:
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
        preprocess = Preprocess(
            image_size=_pair(224 if image_size is None else image_size, "image_size"),
            crop_size=None if crop_size is None else _pair(crop_size, "crop_size"),
            mean=_triple(mean, "mean"),
            std=_triple(std, "std", positive=True),
            depth=bool(method_cls.uses_depth),  # 3D methods get the point map as channels 3-5
        )
        post = Postprocess(sigma=detector.map_sigma if sigma is None else _check_sigma(sigma))
        return cls(detector, preprocess, postprocess=post)

    @property
    def method(self) -> str:
        return self.detector.name

    @property
    def map_range(self) -> tuple[float, float] | None:
        """The heat-map colour range (``postprocess.map_range``)."""
        return self.postprocess.map_range

    def to(self, device: str | torch.device) -> Model:
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
        tile: int | None = None,
        overlap: float | None = None,
        warm_start: bool = False,
    ) -> Model:
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
        tile, overlap : optional
            Fit on tiles: every good image larger than `tile` pixels is cut into overlapping
            tiles (`overlap`: share of a tile, default 0.25) that the detector learns from as
            images of their own; the model keeps the `Tiling` and predicts and calibrates with
            it (see `iadkit.tiling`). Use the input size as the tile to avoid any resize.
        warm_start : bool
            Keep a fitted detector's networks and learned state and train it again on
            `train` only (naive sequential fine-tuning: `Detector.fit`). A continual method
            learns a new task without forgetting with `partial_fit` instead.

        A zero-shot method trains on nothing: `train` may be empty. A transductive one
        (scores relative to the batch: MuSc) gets no threshold from calibration, since a
        batch of good images alone sets none that holds for a mixed batch (`set_threshold`).
        """
        tiling = resolve_tiling(None, tile, overlap) if tile else None
        return self._train(
            train, calibration, calibration_fraction, target_fpr, seed, progress, warm_start, False, tiling
        )

    def partial_fit(
        self,
        train: Sequence[Sample] | ImageSet,
        *,
        calibration: Sequence[Sample] | None = None,
        calibration_fraction: float | None = None,
        target_fpr: float = 0.01,
        seed: int = 0,
        progress: bool = True,
    ) -> Model:
        """Learn one more task (a new product) and keep the ones learned before, then
        calibrate the threshold on the new task's held-out good images.

        Only for continual methods (``detector.continual``: dne, continual_bank); another
        method raises `NotContinualError` (``fit(..., warm_start=True)`` trains it on the new
        task, forgetting the old ones). Parameters as in `fit`; `info["n_tasks"]` counts the
        tasks learned. A model fitted on tiles learns the new task on the same tiles.
        """
        return self._train(
            train, calibration, calibration_fraction, target_fpr, seed, progress, False, True, self.tiling
        )

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
        tiling: Tiling | None,
    ) -> Model:
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
        if tiling is not None:
            self._check_tiling(tiling)
            if self.detector.supervision == "semi-supervised":
                raise InvalidParameterError(
                    f"{self.detector.name} learns from labelled defects, and a defective image's tiles are mostly "
                    "good: fit it without tiles"
                )
        samples = self._usable_training(samples) if samples else []
        if calibration is None and samples:
            if calibration_fraction is None:
                samples, calibration = split_calibration(
                    samples, DEFAULT_CALIBRATION_FRACTION, seed, MIN_TRAIN_FOR_HOLDOUT
                )
            elif calibration_fraction > 0:
                samples, calibration = split_calibration(samples, calibration_fraction, seed, 1)
        if self.detector.transductive:
            calibration = None  # its scores are relative to a batch: see fit()
        n_images = len(samples)
        if tiling is not None:
            samples = tile_samples(samples, tiling)
        self.tiling = tiling
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
            n_train=n_images,
            n_train_anomalous=sum(1 for s in samples if s.label == ANOMALOUS),
            fit_seconds=time.perf_counter() - start,
            n_tasks=int(self.info.get("n_tasks", 0)) + 1 if continuing else 1,
        )
        if tiling is not None:
            self.info.update(n_train_tiles=len(samples))
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

    def _calibrate(
        self, good: Sequence[ImageInput], target_fpr: float, batch_size: int, stacklevel: int = 3
    ) -> Threshold:
        """`calibrate`, called from `calibrate` or `fit` (the warning points at their caller)."""
        result = self.predict(good, batch_size=batch_size)
        self.threshold = false_alarm_threshold(result.scores, target_fpr)
        note = resolution_note(self.threshold)
        if note:
            warnings.warn(note, CalibrationWarning, stacklevel=stacklevel)
        if result.maps is not None:
            maps = (
                result.maps if isinstance(result.maps, np.ndarray) else np.concatenate([m.ravel() for m in result.maps])
            )
            self.postprocess = self.postprocess.with_range(heatmap_range(maps))
        return self.threshold

    def set_threshold(self, value: float) -> None:
        self.threshold = manual_threshold(value)

    # -- inference -----------------------------------------------------------------------
    @torch.inference_mode()
    def predict_tensor(self, images: torch.Tensor) -> Prediction:
        """Preprocessed images [B, 3, H, W] ([B, 6, H, W] for a method that uses depth: see
        `Preprocess`) -> scores and input-size maps on the CPU."""
        self.detector.check_fitted()
        self.detector.eval()
        raw = self.detector.predict(images.to(self.detector.device))
        pred = self.postprocess(raw, (int(images.shape[-2]), int(images.shape[-1])))
        assert pred.scores is not None
        return Prediction(scores=pred.scores.float().cpu(), maps=None if pred.maps is None else pred.maps.float().cpu())

    def predict(
        self,
        inputs: Sequence[ImageInput] | ImageSet,
        *,
        batch_size: int = 16,
        threshold: float | None = None,
        keep_maps: bool = True,
        progress: bool = False,
        tile: int | None = None,
        overlap: float | None = None,
    ) -> PredictionResult:
        """Score images (samples, paths or arrays). `threshold` overrides the stored one.

        Parameters
        ----------
        inputs : samples, paths, arrays or ImageSet
            The images.
        batch_size : int
            Images (or tiles) per forward pass.
        threshold : float, optional
            Verdict threshold for this call (default: the calibrated one).
        keep_maps : bool
            Return the anomaly maps.
        progress : bool
            Show a progress bar.
        tile, overlap : optional
            Tiling of images larger than `tile` pixels (see `iadkit.tiling`): each tile is
            scored, the image score is the maximum over its tiles and the maps are stitched at
            the image's full resolution (then `maps` is a list, one map per image). None: the
            model's stored tiling, if it was fitted with tiles; 0: no tiling.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidParameterError(f"batch_size must be a positive integer, got {batch_size!r}")
        if threshold is not None:
            threshold = manual_threshold(threshold).value  # a NaN threshold would call everything good
        tiling = resolve_tiling(self.tiling, tile, overlap)
        if tiling is not None:
            self._check_tiling(tiling)
            samples = list(inputs.samples) if isinstance(inputs, ImageSet) else as_samples(inputs)
            return self._predict_tiled(samples, tiling, batch_size, threshold, keep_maps, progress)
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

    def score_images(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Decoded image arrays (any size) -> (scores [n], maps [n, H, W] at the input size or None)."""
        pred = self.predict_tensor(self.preprocess.batch(list(images)))
        assert pred.scores is not None
        return pred.scores.numpy(), None if pred.maps is None else pred.maps.numpy()

    def _check_tiling(self, tiling: Tiling) -> None:
        if self.preprocess.crop_size is not None:
            raise InvalidParameterError(
                "tiling needs a model without a centre crop (each tile must be seen whole); "
                "create the model without crop_size"
            )

    def _predict_tiled(
        self,
        samples: list[Sample],
        tiling: Tiling,
        batch_size: int,
        threshold: float | None,
        keep_maps: bool,
        progress: bool,
    ) -> PredictionResult:
        scores, maps = [], []
        items: Iterable[Sample] = samples
        if progress:
            from iadkit.progress import track

            items = track(samples, total=len(samples), description="predict (tiled)")
        for sample in items:
            image = sample.load_image()
            try:
                self.preprocess.check_channels(image, sample.path)
                score, amap = predict_tiled(image, tiling, self.score_images, batch_size=batch_size)
            except ImageReadError as exc:  # name the image, as ImageSet does
                text = str(exc)
                raise ImageReadError(text if text.startswith(f"{sample.path}:") else f"{sample.path}: {text}") from None
            scores.append(score)
            if keep_maps and amap is not None:
                maps.append(amap)
        thr = threshold if threshold is not None else (self.threshold.value if self.threshold else None)
        return PredictionResult(
            paths=[s.path for s in samples],
            scores=np.asarray(scores, dtype=np.float32),
            maps=maps if maps else None,
            threshold=thr,
            labels=np.array([s.label if s.label is not None else UNKNOWN for s in samples]),
        )

    # -- files -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from iadkit.store import save_model

        return save_model(self, path)

    def export_onnx(self, path: str | Path, *, check: bool = True) -> Path:
        """Write the whole inference graph (normalisation, detector, map upsampling and blur,
        image score) and the model's facts (preprocessing, threshold, heat-map range, tiling)
        to one ONNX file, for `iadkit.runtime` (see `iadkit.export.onnx`).

        Parameters
        ----------
        path : str or Path
            The ``.onnx`` file to write.
        check : bool
            Compare the exported graph with this model on random pixels before writing.
        """
        from iadkit.export.onnx import export_onnx

        return export_onnx(self, path, check=check)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> Model:
        from iadkit.store import load_model

        return load_model(path, device=device)

    def __repr__(self) -> str:
        thr = f"{self.threshold.value:.4g} ({self.threshold.rule})" if self.threshold else "unset"
        tiles = f", tiling={self.tiling.tile}px/{self.tiling.overlap:g}" if self.tiling else ""
        return f"Model(method={self.method!r}, input={self.preprocess.output_size}, threshold={thr}{tiles})"


def tile_samples(samples: Sequence[Sample], tiling: Tiling) -> list[Sample]:
    """Each sample's tiles as samples of their own (in memory; path ``<path>#tile=top,left``).
    An image not larger than a tile stays as it is."""
    from dataclasses import replace

    from iadkit.tiling import cut

    out: list[Sample] = []
    for s in samples:
        image = s.load_image()
        if not tiling.applies(image.shape):
            out.append(s)
            continue
        boxes = tiling.boxes(image.shape)
        for (top, left, _, _), tile in zip(boxes, cut(image, boxes)):
            out.append(
                replace(
                    s,
                    path=f"{s.path}#tile={top},{left}",
                    image=np.ascontiguousarray(tile),
                    mask=None,
                    mask_path=None,
                    mask_paths=(),
                )
            )
    return out


def split_calibration(
    samples: list[Sample], fraction: float, seed: int, min_train: int = 1
) -> tuple[list[Sample], list[Sample] | None]:
    """(training samples, held-out good images for the threshold) — a seeded draw of
    `fraction` of the good images, at least one, only when at least `min_train` good images
    remain to train on; otherwise nothing is held out."""
    good_idx = [i for i, s in enumerate(samples) if s.label != ANOMALOUS]
    n_cal = max(1, round(float(fraction) * len(good_idx)))
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
