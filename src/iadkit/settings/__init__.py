"""Settings: how a dataset's train/test split becomes the images a method trains and is tested on.

The survey's manufacturing settings (vanilla, few-shot, semi-supervised, noisy, continual,
multi-class) are data protocols, independent of the method. A setting is a pure function

    ``setting(train, test, *, seed, **params) -> (train, test)``

registered under a name. `train` holds the dataset's good training images and, where the
dataset has them, labelled defects (label 1); `test` the labelled test images. The function
must be deterministic given `seed`, so that every method of a grid sees the same images.

A method never sees which setting produced its data, and a setting never sees which method
consumes it; `check_combination` reads the method's declared attributes (`supervision`) to
refuse what makes no sense, with a one-line message. Python, the CLI
(``--setting few_shot:k=4``) and benchmark grids use the same registry.
"""

from __future__ import annotations

import difflib
import json
from typing import Any, Callable, Protocol, Sequence

from iadkit.errors import IadkitError, UnknownNameError
from iadkit.types import ANOMALOUS, GOOD, Sample


class Setting(Protocol):
    def __call__(
        self, train: Sequence[Sample], test: Sequence[Sample], *, seed: int, **params: Any
    ) -> tuple[list[Sample], list[Sample]]: ...


class SettingError(IadkitError, ValueError):
    """A setting cannot be applied as asked (bad parameters, or a method it makes no sense for)."""


UnknownSettingError = UnknownNameError

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
        close = difflib.get_close_matches(name, available_settings(), n=2, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UnknownSettingError(f"unknown setting {name!r}; {hint}available: {', '.join(available_settings())}")
    return _SETTINGS[name]


def apply_setting(
    name: str, train: Sequence[Sample], test: Sequence[Sample], *, seed: int, params: dict[str, Any] | None = None
) -> tuple[list[Sample], list[Sample]]:
    """Run setting `name` on a split; a wrong parameter is a `SettingError` naming it."""
    fn = get_setting(name)
    try:
        return fn(train, test, seed=seed, **(params or {}))
    except TypeError as exc:
        raise SettingError(f"setting {name!r}: {exc}") from None


def check_combination(setting: str, method: Any, train: Sequence[Sample]) -> str | None:
    """Refuse a (setting, method, training set) that makes no sense; return a note for one that
    works differently than a user may expect (None when there is nothing to say).

    - a semi-supervised method needs labelled defects in its training set: refused without;
    - an unsupervised method given labelled defects trains on the good images only (noted);
    - a zero-shot method trains on nothing (noted when images were given).
    """
    supervision = getattr(method, "supervision", "unsupervised")
    name = getattr(method, "name", str(method))
    n_bad = sum(1 for s in train if s.label == ANOMALOUS)
    if supervision == "semi-supervised" and n_bad == 0:
        raise SettingError(
            f"{name} learns from labelled defects, but setting {setting!r} gives it none; "
            "use the semi_supervised setting (e.g. semi_supervised:k=4) or a dataset with labelled training defects"
        )
    if supervision == "unsupervised" and n_bad:
        return f"{name} is unsupervised: it trains on the good images only ({n_bad} labelled defects unused)"
    if supervision == "zero-shot" and train:
        return f"{name} is zero-shot: it uses no training images"
    return None


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """``"few_shot:k=4,augment=true"`` -> ``("few_shot", {"k": 4, "augment": True})`` (values JSON where they parse)."""
    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SettingError(f"setting parameters are key=value pairs, got {item!r} in {text!r}")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    get_setting(name.strip())
    return name.strip(), params


@register_setting("vanilla")
def vanilla(train: Sequence[Sample], test: Sequence[Sample], *, seed: int) -> tuple[list[Sample], list[Sample]]:
    """The standard unsupervised protocol: fit on the good training images, test on the whole test split."""
    return [s for s in train if s.label == GOOD], list(test)


__all__ = [
    "Setting",
    "SettingError",
    "UnknownSettingError",
    "apply_setting",
    "available_settings",
    "check_combination",
    "get_setting",
    "parse_setting",
    "register_setting",
    "vanilla",
]
