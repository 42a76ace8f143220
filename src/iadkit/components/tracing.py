"""Whether the code runs under a tracer (ONNX export, ``torch.jit.trace``).

A traced graph records the Python control flow of the one call it watched: a loop over
query chunks or over the images of a batch is unrolled at the sizes of that call, and would
silently cut or reshape other inputs. Code that chunks work by a *data-dependent* size asks
`is_tracing()` and then takes a single-block path with the same arithmetic.
"""

from __future__ import annotations

import torch


def is_tracing() -> bool:
    """True inside ``torch.onnx.export`` or ``torch.jit.trace``."""
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def _bins(length: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """[n, length] averaging weights of PyTorch's adaptive bins: bin i of n over `length`
    covers floor(i L / n) .. ceil((i + 1) L / n)."""
    weights = torch.zeros(n, length, dtype=like.dtype, device=like.device)
    for i in range(n):
        start, end = (i * length) // n, -((-(i + 1) * length) // n)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def adaptive_avg_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` for [..., H, W] as two matrix products.

    The ONNX exporter refuses adaptive pooling when the output does not divide the input or
    when it cannot see the input's size; here the bin matrices are built from the concrete
    size and become constants of the exported graph (equal to torch's to float rounding).
    """
    rows = _bins(int(x.shape[-2]), size, x)
    cols = _bins(int(x.shape[-1]), size, x)
    return rows @ x @ cols.T


__all__ = ["adaptive_avg_pool", "is_tracing"]
