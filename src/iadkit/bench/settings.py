"""Benchmark settings: how a dataset's train/test split becomes a cell's train/test sets.

A setting is a plain function ``(train, test, *, seed, **params) -> (train, test)``
registered under a name; adding one (few-shot, noisy, semi-supervised ...) is writing one
function. Methods never see which setting produced their data, and a setting never sees
which method consumes it. The function must be deterministic given `seed`, so that every
method in a grid sees exactly the same images.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from iadkit.errors import IadkitError
from iadkit.types import Sample


class Setting(Protocol):
    def __call__(
        self, train: Sequence[Sample], test: Sequence[Sample], *, seed: int, **params: Any
    ) -> tuple[list[Sample], list[Sample]]: ...


class UnknownSettingError(IadkitError, KeyError):
    """A benchmark names a setting that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


_SETTINGS: dict[str, Setting] = {}


def register_setting(name: str) -> Callable[[Setting], Setting]:
    """Decorator: ``@register_setting("few_shot") def few_shot(train, test, *, seed, k): ...``."""

    def deco(fn: Setting) -> Setting:
        if name in _SETTINGS and _SETTINGS[name] is not fn:
            raise ValueError(f"setting {name!r} is registered twice")
        _SETTINGS[name] = fn
        return fn

    return deco


def available_settings() -> list[str]:
    return sorted(_SETTINGS)


def get_setting(name: str) -> Setting:
    if name not in _SETTINGS:
        raise UnknownSettingError(
            f"unknown benchmark setting {name!r}; available: {', '.join(available_settings())}"
        )
    return _SETTINGS[name]


def apply_setting(
    name: str, train: Sequence[Sample], test: Sequence[Sample], *, seed: int, params: dict[str, Any] | None = None
) -> tuple[list[Sample], list[Sample]]:
    return get_setting(name)(train, test, seed=seed, **(params or {}))


@register_setting("vanilla")
def vanilla(train: Sequence[Sample], test: Sequence[Sample], *, seed: int) -> tuple[list[Sample], list[Sample]]:
    """The standard unsupervised protocol: fit on the good training images, test on the whole test split."""
    return list(train), list(test)
