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

The survey's settings (protocols of the IM-IAD benchmark, one module each):

- ``vanilla``: the good training images; the whole test set.
- ``few_shot(k, augment=False, n_augment=4, augmentations="rotation")`` (`fewshot`): k good
  images per category, optionally each expanded into n_augment + 1 variants.
- ``noisy(ratio)`` (`noise`): ``int(ratio * n_good)`` anomalous test images per category join
  the training set labelled good (capped at 75 % of the category's test anomalies), and leave
  the test set. `injected_noise` finds them again.
- ``semi_supervised(k)`` (`semi`): k labelled anomalies per category move from test to
  training (same cap).

Settings of the second kind, ``kind="tasks"``, span several categories of a dataset in one
experiment and return a task plan (`iadkit.settings.tasks.Task`) instead of one split:

- ``continual(split=None)`` (`continual`): the categories in the given order become a
  sequence of tasks (one per category, or class-incremental groups such as "3+1+1"); the
  model learns them one after the other and is tested on every task seen so far after each;
- ``multi_class`` (`multi_class`): one model learns the union of the categories' good
  images and is tested on each category.

`apply_task_setting` runs one; `setting_kind` tells the kinds apart (the benchmark makes one
cell per category for a split setting and one per dataset for a tasks setting).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Sequence
from typing import Any

from iadkit.errors import IadkitError, UnknownNameError
from iadkit.types import ANOMALOUS, GOOD, Sample

Setting = Callable[..., Any]
"""``fn(train, test, *, seed, **its own keyword parameters)`` -> ``(train, test)`` lists of
samples for a "split" setting, or a list of `Task` for a "tasks" setting. (Each setting declares
its own parameters, so no signature narrower than ``...`` fits them all.)"""


class SettingError(IadkitError, ValueError):
    """A setting cannot be applied as asked (bad parameters, or a method it makes no sense for)."""


UnknownSettingError = UnknownNameError

_SETTINGS: dict[str, Setting] = {}
_KINDS: dict[str, str] = {}
SETTING_KINDS = ("split", "tasks")


def register_setting(name: str, *, kind: str = "split") -> Callable[[Setting], Setting]:
    """Decorator: ``@register_setting("few_shot") def few_shot(train, test, *, seed, k): ...``.

    `kind` "split" (the default): the function returns one (train, test) split and runs per
    category; "tasks": it returns a list of `iadkit.settings.tasks.Task` over several
    categories (continual, multi-class)."""
    if kind not in SETTING_KINDS:
        raise ValueError(f"setting kind must be one of {SETTING_KINDS}, got {kind!r}")

    def deco(fn: Setting) -> Setting:
        if name in _SETTINGS and _SETTINGS[name] is not fn:
            raise ValueError(f"setting {name!r} is registered twice")
        _SETTINGS[name] = fn
        _KINDS[name] = kind
        return fn

    return deco


def setting_kind(name: str) -> str:
    """ "split" (one (train, test) per category) or "tasks" (a task plan over several categories)."""
    get_setting(name)
    return _KINDS.get(name, "split")


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
    if setting_kind(name) != "split":
        raise SettingError(
            f"setting {name!r} spans several categories (a task plan, not one split): run it in a benchmark grid "
            f"(settings: [{name}]) or with iadkit.settings.apply_task_setting"
        )
    try:
        return fn(train, test, seed=seed, **(params or {}))
    except TypeError as exc:
        raise SettingError(f"setting {name!r}: {exc}") from None


def apply_task_setting(
    name: str, train: Sequence[Sample], test: Sequence[Sample], *, seed: int, params: dict[str, Any] | None = None
) -> list[Any]:
    """Run a tasks setting (continual, multi_class) on the samples of several categories
    (each sample's `category` says which, in order of first appearance) -> list of `Task`."""
    fn = get_setting(name)
    if setting_kind(name) != "tasks":
        raise SettingError(f"setting {name!r} gives one split per category, not a task plan: use apply_setting")
    try:
        return fn(train, test, seed=seed, **(params or {}))
    except TypeError as exc:
        raise SettingError(f"setting {name!r}: {exc}") from None


def check_combination(setting: str, method: Any, train: Sequence[Sample]) -> str | None:
    """Refuse a (setting, method, training set) that makes no sense; return a one-line note
    for one that works differently than a user may expect (None when there is nothing to say).

    - a semi-supervised method needs labelled defects in its training set: refused without
      (vanilla, few_shot and noisy give none; semi_supervised does);
    - an unsupervised method given labelled defects trains on the good images only (noted;
      callers then drop the defects themselves, so the note is said once, not again by
      `Model.fit`);
    - a zero-shot method trains on nothing (noted when images were given).

    Parameters
    ----------
    setting : str
        The setting's name (for the message).
    method : Detector or Model
        Anything with ``name`` and ``supervision`` attributes.
    train : sequence of Sample
        The training set the setting produced.
    """
    supervision = getattr(method, "supervision", "unsupervised")
    name = getattr(method, "name", str(method))
    if setting in _KINDS and _KINDS[setting] == "tasks" and supervision == "zero-shot":
        raise SettingError(
            f"{name} is zero-shot: it learns nothing from the tasks of setting {setting!r}; "
            "run it in the vanilla setting (it is tested on each category's test set alone)"
        )
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


def usable_training(method: Any, train: Sequence[Sample]) -> list[Sample]:
    """The images `method` learns from: everything for a semi-supervised method, the good
    (and unlabelled) ones otherwise - what `Model.fit` keeps, taken out beforehand by callers
    that have already said so with `check_combination`'s note. A zero-shot method learns
    from nothing: the settings layer gives it an empty training set."""
    supervision = getattr(method, "supervision", "unsupervised")
    if supervision == "zero-shot":
        return []
    if supervision == "semi-supervised":
        return list(train)
    return [s for s in train if s.label != ANOMALOUS]


def injected_noise(train: Sequence[Sample]) -> list[Sample]:
    """The training samples presented as good that are really defective (the noisy setting's
    injected images, marked ``true_label = 1``)."""
    return [s for s in train if s.label == GOOD and s.true_label == ANOMALOUS]


def sequence_parameters(name: str) -> set[str]:
    """Parameters of setting `name` whose value is itself a sequence (few_shot's
    `augmentations`): in a grid, a list given to one of them is one value, not a sweep."""
    import collections.abc
    import inspect
    import types
    import typing

    fn = get_setting(name)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # a plugin with unresolvable annotations: every list is a sweep
        return set()

    def is_sequence(t: Any) -> bool:
        origin = typing.get_origin(t) or t
        return isinstance(origin, type) and issubclass(origin, collections.abc.Sequence) and not issubclass(origin, str)

    out = set()
    for pname in inspect.signature(fn).parameters:
        hint = hints.get(pname)
        union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        if any(is_sequence(h) for h in (typing.get_args(hint) if union else (hint,))):
            out.add(pname)
    return out - {"train", "test"}


@register_setting("vanilla")
def vanilla(train: Sequence[Sample], test: Sequence[Sample], *, seed: int) -> tuple[list[Sample], list[Sample]]:
    """The standard unsupervised protocol: fit on the good training images, test on the whole test split."""
    return [s for s in train if s.label == GOOD], list(test)


__all__ = [
    "SETTING_KINDS",
    "Setting",
    "SettingError",
    "UnknownSettingError",
    "apply_setting",
    "apply_task_setting",
    "available_settings",
    "check_combination",
    "continual",
    "few_shot",
    "get_setting",
    "injected_noise",
    "multi_class",
    "noisy",
    "parse_setting",
    "register_setting",
    "semi_supervised",
    "sequence_parameters",
    "setting_kind",
    "usable_training",
    "vanilla",
]

# The survey's settings register themselves on import (they need the registry above).
from iadkit.settings.continual import continual  # noqa: E402
from iadkit.settings.fewshot import few_shot  # noqa: E402
from iadkit.settings.multi_class import multi_class  # noqa: E402
from iadkit.settings.noise import noisy  # noqa: E402
from iadkit.settings.semi import semi_supervised  # noqa: E402
