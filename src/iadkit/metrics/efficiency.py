"""Efficiency measurements: inference time per image and peak memory.

Time (FIELD.md section 3, IM-IAD): seconds per image = wall time of the whole pass over a
task's test loader (data loading and post-processing included) / number of test images;
FPS = 1 / that. `measure_time_per_image` times exactly that loop. When CUDA is in use the
device is synchronised before the clock is read, otherwise queued kernels would be missed.

Memory: IM-IAD's measurement code was not published; we report what is well defined.
- Host: peak resident set size (RSS). `peak_rss_mb()` is the process-lifetime peak from
  `getrusage` (ru_maxrss, KiB on Linux, bytes on macOS). `PeakMemory` measures the peak
  during a block: on Linux it resets the kernel's high-water mark (writing "5" to
  /proc/self/clear_refs) and reads VmHWM from /proc/self/status at the end - exact, no
  polling. Where that is not permitted it samples VmRSS in a background thread (may miss
  spikes shorter than the interval), and without /proc it falls back to ru_maxrss (an upper
  bound: the lifetime peak). `method` says which was used.
- GPU: `torch.cuda.max_memory_allocated` (tensors held by PyTorch's caching allocator),
  reset at the start of the block, when CUDA is already initialised; also read at the end if
  the block initialised it. CUDA is never initialised by this module.
All memory values are MiB (2**20 bytes).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

_MIB = float(1 << 20)
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _cuda_in_use() -> bool:
    """True when torch is imported and has initialised CUDA (we never import or init it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_available() and torch.cuda.is_initialized())
    except Exception:  # pragma: no cover - broken CUDA setups must not break timing
        return False


def _cuda_sync() -> None:
    if _cuda_in_use():
        sys.modules["torch"].cuda.synchronize()


class Timer:
    """Wall-clock timer (`time.perf_counter`) as a context manager; CUDA-synchronised.

    >>> with Timer() as t:
    ...     run()
    >>> t.elapsed  # seconds
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._elapsed: float | None = None

    def __enter__(self) -> Timer:
        _cuda_sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        _cuda_sync()
        assert self._start is not None
        self._elapsed = time.perf_counter() - self._start

    @property
    def elapsed(self) -> float:
        """Seconds between enter and exit (or until now, while still inside the block)."""
        if self._start is None:
            raise RuntimeError("Timer was not started: use it as `with Timer() as t:`")
        if self._elapsed is None:
            return time.perf_counter() - self._start
        return self._elapsed


@dataclass(frozen=True)
class TimingResult:
    """Total seconds, image count, seconds per image and images per second."""

    total_s: float
    n_images: int
    seconds_per_image: float
    fps: float


def time_per_image(total_s: float, n_images: int) -> TimingResult:
    """IM-IAD's speed figures from a total time and an image count."""
    if n_images <= 0:
        raise ValueError(f"time per image needs at least one image, got n_images={n_images}")
    spi = total_s / n_images
    return TimingResult(total_s, n_images, spi, (1.0 / spi) if spi > 0 else float("inf"))


def batch_size(batch: Any) -> int:
    """Images in a batch: leading dimension of an array/tensor, or of the first element of a
    tuple/list/dict (the usual (images, labels, ...) or {"image": ...} batches), else len()."""
    if hasattr(batch, "shape") and len(batch.shape) > 0:
        return int(batch.shape[0])
    if isinstance(batch, dict) and batch:
        return batch_size(next(iter(batch.values())))
    if (
        isinstance(batch, (tuple, list))
        and batch
        and (hasattr(batch[0], "shape") or isinstance(batch[0], (tuple, list, dict)))
    ):
        return batch_size(batch[0])
    return len(batch)


def measure_time_per_image(
    predict: Callable[[Any], Any],
    batches: Iterable[Any],
    *,
    count: Callable[[Any], int] = batch_size,
) -> TimingResult:
    """Run `predict` on every batch of `batches` and time the whole loop, iteration (i.e.
    data loading) included, as IM-IAD does; `count(batch)` gives the images in a batch."""
    n = 0
    with Timer() as timer:
        for batch in batches:
            predict(batch)
            n += count(batch)
    return time_per_image(timer.elapsed, n)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (since the last `PeakMemory` reset on Linux)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / _MIB if sys.platform == "darwin" else maxrss / 1024.0


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def high_water_mark_mb() -> float:
    """Peak resident memory of this process, MiB: VmHWM from /proc where it exists (it honours
    a `PeakMemory` reset), else the getrusage maximum."""
    kib = _status_kib("VmHWM")
    return kib / 1024.0 if kib is not None else peak_rss_mb()


def current_rss_mb() -> float | None:
    """Resident memory now, MiB (None where /proc is unavailable)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024.0


class PeakMemory:
    """Peak host RSS (and CUDA memory) during a `with` block; see the module doc.

    After the block: `peak_rss_mb` (peak RSS of the process during the block), `start_rss_mb`,
    `extra_mb` (= peak - start: what the block added at its worst), `cuda_peak_mb` (None
    without CUDA) and `method` ("vmhwm", "sampling" or "ru_maxrss").

    Note: the "vmhwm" method resets the process-wide high-water mark, so `peak_rss_mb()`
    afterwards reports the peak since this block began rather than since process start.
    """

    def __init__(self, *, sample_interval_s: float = 0.002, reset_hwm: bool = True) -> None:
        self.sample_interval_s = sample_interval_s
        self.reset_hwm = reset_hwm
        self.method = ""
        self.start_rss_mb = float("nan")
        self.peak_rss_mb = float("nan")
        self.cuda_peak_mb: float | None = None
        self._samples_kib = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cuda_at_start = False
        self._ru_start_mb = 0.0

    @property
    def extra_mb(self) -> float:
        return self.peak_rss_mb - self.start_rss_mb

    @property
    def peak_mb(self) -> float:
        """Alias of `peak_rss_mb`."""
        return self.peak_rss_mb

    def _sample(self) -> None:
        while not self._stop.is_set():
            kib = _status_kib("VmRSS")
            if kib is not None and kib > self._samples_kib:
                self._samples_kib = kib
            self._stop.wait(self.sample_interval_s)

    def __enter__(self) -> PeakMemory:
        self._cuda_at_start = _cuda_in_use()
        self._ru_start_mb = peak_rss_mb()
        if self._cuda_at_start:
            torch = sys.modules["torch"]
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rss = current_rss_mb()
        if rss is None:
            self.method = "ru_maxrss"
            self.start_rss_mb = peak_rss_mb()
            return self
        self.start_rss_mb = rss
        if self.reset_hwm and os.path.exists(_CLEAR_REFS):
            try:
                with open(_CLEAR_REFS, "w") as f:
                    f.write("5")
                self.method = "vmhwm"
                return self
            except OSError:
                pass
        self.method = "sampling"
        self._samples_kib = int(rss * 1024)
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="iadkit-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.method == "vmhwm":
            hwm = _status_kib("VmHWM")
            self.peak_rss_mb = hwm / 1024.0 if hwm is not None else peak_rss_mb()
        elif self.method == "sampling":
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            now = _status_kib("VmRSS") or 0
            self.peak_rss_mb = max(self._samples_kib, now) / 1024.0
            # A new lifetime peak reached inside the block is exact, and catches short spikes.
            ru_end = peak_rss_mb()
            if ru_end > self._ru_start_mb:
                self.peak_rss_mb = max(self.peak_rss_mb, ru_end)
        else:
            self.peak_rss_mb = peak_rss_mb()
        if _cuda_in_use():
            torch = sys.modules["torch"]
            torch.cuda.synchronize()
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / _MIB
