"""Ray, for users who outgrow one machine: start or join a cluster once per process.

Used by the benchmark's Ray executor (a task per cell) and by batch prediction (a task per
shard of files). Ray is optional (``pip install 'iadkit[ray]'``); without it a clear error
says so.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from iadkit.errors import ExecutorError


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError(
            "the Ray executor needs Ray: install it with `pip install 'iadkit[ray]'` (or use --executor local)"
        ) from None
    return ray


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> Any:
    """Start (or join) Ray once per process; returns the `ray` module."""
    ray = import_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if address is None:
            kwargs["num_cpus"] = num_cpus
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ExecutorError(f"cannot start or join Ray at {address or 'a new local instance'}: {exc}") from None
    return ray


def extend_sys_path(paths: list[str]) -> None:
    """Make the driver's import paths visible in a worker (plugin modules, tests)."""
    for p in reversed(paths):
        if p and p not in sys.path and os.path.isdir(p):
            sys.path.insert(0, p)


__all__ = ["extend_sys_path", "import_ray", "init_ray"]
