"""Test-only pieces for the hostile-input and fault tests: detectors that score NaN, that are
slow on purpose, and that log every fit to a file (so tests can count fits across processes),
plus small builders for data trees and model files. No tests live here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import _dummy  # noqa: F401  (registers test_pixel_zscore)
import test_bench_support  # noqa: F401  (registers the tinybench source and its detectors)
from iadkit.data.transforms import ImageSet
from iadkit.methods.base import Detector, register
from iadkit.types import Prediction

FIT_LOG_ENV = "IADKIT_TEST_FIT_LOG"  # file that every fit of test_hostile_logged appends a line to
FIT_SLEEP_ENV = "IADKIT_TEST_FIT_SLEEP"  # seconds each such fit sleeps (widens the kill windows)
PREDICT_SLEEP_ENV = "IADKIT_TEST_PREDICT_SLEEP"  # seconds each prediction batch sleeps


class _MeanDiff(Detector):
    """Mean-image difference (a test detector)."""

    family = "test"
    map_sigma = 0.0

    def _build(self) -> None:
        self.register_buffer("mean_", torch.empty(0))

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        self.mean_ = torch.cat([b.images for b in train.batches(8)]).mean(0)

    def _predict(self, images: torch.Tensor) -> Prediction:
        maps = (images - self.mean_).abs().mean(1)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)


@register
class NanForBright(_MeanDiff):
    """Scores NaN for bright images (mean normalised value above 1): a broken model."""

    name = "test_hostile_nan"

    def _predict(self, images: torch.Tensor) -> Prediction:
        pred = super()._predict(images)
        bright = images.mean(dim=(1, 2, 3)) > 1.0
        scores = torch.where(bright, torch.full_like(pred.scores, float("nan")), pred.scores)
        return Prediction(scores=scores, maps=pred.maps)


@register
class Logged(_MeanDiff):
    """Appends 'cell-ish identity pid' to $IADKIT_TEST_FIT_LOG on every fit, after sleeping
    $IADKIT_TEST_FIT_SLEEP seconds; sleeps $IADKIT_TEST_PREDICT_SLEEP per prediction batch."""

    name = "test_hostile_logged"

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        time.sleep(float(os.environ.get(FIT_SLEEP_ENV, "0")))
        log = os.environ.get(FIT_LOG_ENV)
        if log:
            line = f"{train.samples[0].category} seed={self.seed} pid={os.getpid()}\n"
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        super()._fit(train, progress=progress)

    def _predict(self, images: torch.Tensor) -> Prediction:
        time.sleep(float(os.environ.get(PREDICT_SLEEP_ENV, "0")))
        return super()._predict(images)


def write_images(
    folder: Path, n: int, *, size: int = 24, color: bool = False, seed: int = 0, spot: bool = False
) -> list[Path]:
    """n PNGs of a flat grey (or coloured) part with noise; `spot`: a bright 3x3 defect."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        shape = (size, size, 3) if color else (size, size)
        base = np.array([150, 90, 60]) if color else 120
        a = (base + rng.normal(0, 3, shape)).clip(0, 255).astype(np.uint8)
        if spot:
            y, x = rng.integers(3, size - 6, 2)
            a[y : y + 3, x : x + 3] = 250
        p = folder / f"{i:03d}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def mvtec_tree(root: Path, *, n_train: int = 12, size: int = 24, color: bool = False, masks: bool = True) -> Path:
    """root/plate/{train/good, test/good, test/spot, ground_truth/spot} (MVTec layout)."""
    cat = root / "plate"
    write_images(cat / "train/good", n_train, size=size, color=color, seed=1)
    write_images(cat / "test/good", 3, size=size, color=color, seed=2)
    bad = write_images(cat / "test/spot", 3, size=size, color=color, seed=3, spot=True)
    if masks:
        (cat / "ground_truth/spot").mkdir(parents=True)
        for p in bad:
            arr = np.asarray(Image.open(p))
            gray = arr if arr.ndim == 2 else arr[..., 0]
            Image.fromarray(((gray > 200) * 255).astype(np.uint8)).save(
                cat / "ground_truth/spot" / f"{p.stem}_mask.png"
            )
    return root


def edit_manifest(src: Path, dst: Path, edit) -> Path:
    """Copy a model file with its manifest changed by `edit` (tensors untouched)."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from iadkit.store import MANIFEST_KEY

    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    manifest = json.loads(json.loads(raw[8 : 8 + n])["__metadata__"][MANIFEST_KEY])
    edit(manifest)
    dst.write_bytes(st_save(st_load(raw), metadata={MANIFEST_KEY: json.dumps(manifest)}))
    return dst


def tensor_data_offset(path: Path) -> int:
    """Where the tensor bytes of a safetensors file begin."""
    raw = path.read_bytes()
    return 8 + int.from_bytes(raw[:8], "little")
