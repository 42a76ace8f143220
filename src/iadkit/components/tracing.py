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


__all__ = ["is_tracing"]
