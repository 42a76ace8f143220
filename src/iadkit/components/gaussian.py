"""Per-position multivariate Gaussians and Mahalanobis distance maps (PaDiM and relatives).

PaDiM (Defard et al., ICPR 2021) models the embedding at every position (i, j) of the
feature grid by N(mu_ij, Sigma_ij) with Sigma_ij = sample covariance + eps * I (eps = 0.01 in
the paper) and scores a test embedding x by its Mahalanobis distance
``sqrt((x - mu)^T Sigma^-1 (x - mu))``.

Numerics: instead of inverting Sigma (the reference code calls ``np.linalg.inv`` on each
matrix), we factor Sigma = L L^T by Cholesky and keep the whitening matrix W = L^-1, so the
distance is ``||W (x - mu)||``: never negative, well conditioned for eps > 0, and one batched
matrix product at predict time. Sums are accumulated in float64 around a shift (the first
batch's mean) so the covariance does not lose precision to cancellation over many images.

Threads: on this torch build a *batched* LAPACK call with more than one intra-op thread can
stall (oneMKL prints "Parameter 6 was incorrect on entry to SLASWP" for ``linalg.inv`` on
784 152x152 matrices and hangs for minutes; one thread takes about a second). Every batched
factorisation here therefore runs under `torch_threads(1)`, which restores the caller's
thread count afterwards, also on errors.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from iadkit.errors import IadkitError

PAPER_EPS = 0.01

_thread_lock = threading.RLock()


class GaussianFitError(IadkitError, ValueError):
    """The Gaussian cannot be fitted from the given features; the message says why."""


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run the block with `n` intra-op threads, then restore the previous count (even on error).

    Guards batched LAPACK calls (Cholesky, triangular solves, inverses) against the oneMKL
    multi-thread stall described in the module docstring. Re-entrant; calls from several
    Python threads are serialised so they do not restore each other's settings.
    """
    with _thread_lock:
        previous = torch.get_num_threads()
        if previous != n:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch.get_num_threads() != previous:
                torch.set_num_threads(previous)


class GaussianAccumulator:
    """Streaming mean and covariance per position: feed ``[B, P, d]`` batches, then `finalize`.

    Memory is ``P * d * d`` float64 (PaDiM at 56x56 positions and d = 100: 250 MB).
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift: torch.Tensor | None = None
        self._s1: torch.Tensor | None = None
        self._s2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        if x.ndim != 3:
            raise GaussianFitError(f"Gaussian features must be [B, positions, dims], got {tuple(x.shape)}")
        x = x.detach().to(torch.float64)
        if self._shift is None:
            self._shift = x.mean(0)  # [P, d]
            p, d = self._shift.shape
            self._s1 = torch.zeros(p, d, dtype=torch.float64)
            self._s2 = torch.zeros(p, d, d, dtype=torch.float64)
        elif x.shape[1:] != self._shift.shape:
            raise GaussianFitError(
                f"feature shape changed from {tuple(self._shift.shape)} to {tuple(x.shape[1:])}: "
                "all training images must have the model's input size"
            )
        assert self._s1 is not None and self._s2 is not None
        xc = (x - self._shift).transpose(0, 1)  # [P, B, d]
        self._s1 += xc.sum(1)
        self._s2.baddbmm_(xc.transpose(1, 2), xc)
        self.n += int(x.shape[0])

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [P, d], unbiased covariance [P, d, d]), both float64. Needs at least 2 samples."""
        if self.n < 2 or self._shift is None:
            raise GaussianFitError(f"a covariance needs at least 2 training images, got {self.n}")
        assert self._s1 is not None and self._s2 is not None
        m1 = self._s1 / self.n  # mean of shifted data
        cov = (self._s2 - self.n * m1[:, :, None] * m1[:, None, :]) / (self.n - 1)
        cov = 0.5 * (cov + cov.transpose(1, 2))
        return m1 + self._shift, cov


def regularized_cholesky(cov: torch.Tensor, eps: float = PAPER_EPS) -> torch.Tensor:
    """Lower Cholesky factors L of ``cov + eps*I`` (batched [..., d, d]), under one thread.

    For eps > 0 the regularised matrix is positive definite in exact arithmetic; if rounding
    still makes a factorisation fail, the jitter is raised tenfold (at most 6 times) and the
    message says so when even that fails.
    """
    if cov.shape[-1] != cov.shape[-2]:
        raise GaussianFitError(f"covariance matrices must be square, got {tuple(cov.shape)}")
    if eps < 0:
        raise GaussianFitError(f"eps must be >= 0, got {eps}")
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=cov.dtype)
    jitter = 0.0
    with torch_threads(1):
        for _ in range(7):
            L, info = torch.linalg.cholesky_ex(cov + (eps + jitter) * eye)
            if int(info.max()) == 0:
                return L
            jitter = max(jitter * 10.0, 1e-10 * float(cov.diagonal(dim1=-2, dim2=-1).abs().max()) + 1e-12)
    raise GaussianFitError(
        f"covariance is not positive definite even with eps={eps} + jitter {jitter:g}; "
        "features may contain NaN/inf or eps is too small"
    )


def whitening_matrices(cov: torch.Tensor, eps: float = PAPER_EPS) -> torch.Tensor:
    """W = L^-1 with L L^T = cov + eps*I, so that ``(x-mu)^T (cov+eps I)^-1 (x-mu) = ||W (x-mu)||^2``.

    Computed by a triangular solve (no general inverse), in the input's dtype, one thread.
    """
    L = regularized_cholesky(cov, eps)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype).expand_as(L)
    with torch_threads(1):
        return torch.linalg.solve_triangular(L, eye, upper=False)


def precision_matrices(cov: torch.Tensor, eps: float = PAPER_EPS) -> torch.Tensor:
    """(cov + eps*I)^-1 via Cholesky (``cholesky_inverse``), one thread: for users and tests."""
    L = regularized_cholesky(cov, eps)
    with torch_threads(1):
        return torch.cholesky_inverse(L)


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distances of ``x [B, P, d]`` to per-position Gaussians -> ``[B, P]``.

    `mean` is [P, d], `whitening` [P, d, d] from `whitening_matrices`. One batched matrix
    product over positions; works in the dtype of `whitening` (float32 in stored models).
    """
    if x.ndim != 3 or x.shape[1:] != mean.shape:
        raise GaussianFitError(f"features {tuple(x.shape)} do not match the fitted Gaussians {tuple(mean.shape)}")
    diff = (x.to(whitening.dtype) - mean.to(whitening.dtype)).permute(1, 2, 0)  # [P, d, B]
    z = torch.bmm(whitening, diff)  # [P, d, B]
    return z.pow(2).sum(1).sqrt().T.contiguous()  # [B, P]


__all__ = [
    "PAPER_EPS",
    "GaussianAccumulator",
    "GaussianFitError",
    "mahalanobis",
    "precision_matrices",
    "regularized_cholesky",
    "torch_threads",
    "whitening_matrices",
]
