"""Hyper-parameters declared once, next to their type, default, bounds and meaning.

A method lists its hyper-parameters as annotated class attributes, the way a dataclass does::

    class PatchCore(BackboneDetector):
        coreset_ratio: float = param(0.1, "share of training patches kept (paper: 0.1)",
                                     check=Interval(0, 1, closed="right"))

From these declarations `Detector` derives everything scikit-learn users expect, so no method
writes it again: a keyword-only constructor that stores each value unchanged, its signature
(for ``help()``, IDEs and type checkers), ``get_params``/``set_params``/``clone``, the numpydoc
"Parameters" section of the class docstring, and `validate`, the one place where values are
checked (called by ``fit`` and when a model file is loaded), raising `InvalidParameterError`.

Types are checked from the annotation: ``int`` (not bool), ``float`` (ints accepted), ``str``,
``bool``, ``X | None``, ``tuple[X, ...]`` / ``Sequence[X]`` (a list or a tuple; a JSON round
trip turns tuples into lists), ``Literal[...]``. Bounds and choices come from ``check``.
"""

from __future__ import annotations

import difflib
import math
import numbers
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from iadkit.errors import InvalidParameterError


class Check:
    """A constraint on a value beyond its type; `describe` says it in words for messages and docs."""

    def holds(self, value: Any) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class Interval(Check):
    """A number between `low` and `high` (None: unbounded); `closed` says which ends are included:
    "both", "left", "right" or "neither". For a sequence, every element must lie in it."""

    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def _one(self, v: Any) -> bool:
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or math.isnan(x := float(v)):
            return False
        lo_ok = self.low is None or (x >= self.low if self.closed in ("both", "left") else x > self.low)
        hi_ok = self.high is None or (x <= self.high if self.closed in ("both", "right") else x < self.high)
        return lo_ok and hi_ok

    def holds(self, value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(self._one(v) for v in value)
        return self._one(value)

    def describe(self) -> str:
        if self.high is None and self.low is not None:
            return (">= " if self.closed in ("both", "left") else "> ") + f"{self.low:g}"
        if self.low is None and self.high is not None:
            return ("<= " if self.closed in ("both", "right") else "< ") + f"{self.high:g}"
        left = "[" if self.closed in ("both", "left") else "("
        right = "]" if self.closed in ("both", "right") else ")"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"in {left}{lo}, {hi}{right}"


@dataclass(frozen=True)
class OneOf(Check):
    """One of a fixed set of values (kept in the given order for messages)."""

    options: tuple[Any, ...]

    def holds(self, value: Any) -> bool:
        return value in self.options

    def describe(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)


@dataclass(frozen=True)
class Length(Check):
    """A sequence of `low`..`high` elements."""

    low: int = 1
    high: int | None = None

    def holds(self, value: Any) -> bool:
        n = len(value)
        return n >= self.low and (self.high is None or n <= self.high)

    def describe(self) -> str:
        if self.high == self.low:
            return f"exactly {self.low} element(s)"
        return f"at least {self.low} element(s)" + ("" if self.high is None else f" and at most {self.high}")


@dataclass(frozen=True)
class Divisible(Check):
    """An integer multiple of `by` (e.g. a positional encoding's channels split four ways)."""

    by: int

    def holds(self, value: Any) -> bool:
        return isinstance(value, numbers.Integral) and int(value) % self.by == 0

    def describe(self) -> str:
        return f"a multiple of {self.by}"


def positive() -> Interval:
    """A number > 0."""
    return Interval(0, None, closed="neither")


def at_least(low: float) -> Interval:
    return Interval(low, None, closed="both")


@dataclass(frozen=True)
class Param:
    """One declared hyper-parameter (what `param` returns at run time)."""

    default: Any
    doc: str
    check: Check | tuple[Check, ...] | None = None
    # True for knobs that only change how a fitted model predicts (search backend, feature
    # runtime): `set_params` keeps the fit for them and forgets it for anything else.
    inference: bool = False

    def checks(self) -> tuple[Check, ...]:
        if self.check is None:
            return ()
        return self.check if isinstance(self.check, tuple) else (self.check,)


def param(default: Any, doc: str, *, check: Check | tuple[Check, ...] | None = None, inference: bool = False) -> Any:
    """Declare a hyper-parameter (see the module docstring). Typed `Any` so that
    ``x: float = param(...)`` type-checks, as ``dataclasses.field`` does."""
    if isinstance(default, (list, dict, set)):
        raise TypeError(f"hyper-parameter defaults must be immutable (use a tuple), got {default!r}")
    return Param(default=default, doc=doc, check=check, inference=inference)


# -- type checks from annotations ---------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list, Sequence, typing.Sequence) or (origin is not None and _is_sequence_origin(origin)):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "None"
    if origin is not None and isinstance(origin, type):
        return "a path" if origin.__name__ == "PathLike" else origin.__name__
    return getattr(tp, "__name__", str(tp))


def _is_sequence_origin(origin: Any) -> bool:
    import collections.abc

    return origin in (collections.abc.Sequence, tuple, list)


def matches_type(value: Any, tp: Any) -> bool:
    """Whether `value` fits annotation `tp` (the subset of typing iadkit's parameters use)."""
    if tp is Any:
        return True
    if tp is type(None) or tp is None:
        return value is None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin is not None and _is_sequence_origin(origin):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and len(args) > 1 and Ellipsis not in typing.get_args(tp):
            return len(value) == len(args) and all(matches_type(v, a) for v, a in zip(value, args))
        return not args or all(matches_type(v, args[0]) for v in value)
    if origin is not None and isinstance(origin, type):  # e.g. os.PathLike[str]
        return isinstance(value, origin)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def check_value(owner: str, name: str, value: Any, annotation: Any, spec: Param) -> None:
    """Raise `InvalidParameterError` unless `value` has the annotated type and passes the checks."""
    if not matches_type(value, annotation):
        raise InvalidParameterError(
            f"{owner}: {name}={value!r} is not valid; expected {_type_name(annotation)}" + _example(spec)
        )
    if value is None:
        return
    for c in spec.checks():
        if not c.holds(value):
            raise InvalidParameterError(
                f"{owner}: {name}={value!r} is not valid; it must be {c.describe()}" + _example(spec)
            )


def _example(spec: Param) -> str:
    return f" (default {spec.default!r})"


def unknown_parameter(owner: str, name: str, known: Sequence[str]) -> InvalidParameterError:
    """The error for a keyword the method does not have, suggesting the closest names."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return InvalidParameterError(
        f"{owner} has no hyper-parameter {name!r}; {hint}its hyper-parameters are: {', '.join(known)}"
    )


def describe_param(name: str, annotation: Any, spec: Param) -> str:
    """One numpydoc entry: ``name : type, default=...`` then the indented description."""
    constraint = "; ".join(c.describe() for c in spec.checks())
    text = spec.doc + (f" Must be {constraint}." if constraint else "")
    if spec.inference:
        text += " Can be changed on a fitted model."
    return f"{name} : {_type_name(annotation)}, default={spec.default!r}\n    {text}"


__all__ = [
    "Check",
    "Divisible",
    "Interval",
    "Length",
    "OneOf",
    "Param",
    "at_least",
    "check_value",
    "describe_param",
    "matches_type",
    "param",
    "positive",
    "unknown_parameter",
]
