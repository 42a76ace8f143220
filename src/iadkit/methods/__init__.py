"""One module per method. Importing this package registers every method.

Add a method: write `methods/<name>.py` with a `Detector` subclass decorated by
`@register`, then import the module below.
"""

from importlib import import_module

from iadkit.methods.base import Detector, NotFittedError, available_methods, create, get_method, register

_METHOD_MODULES = [
    "patchcore",
    "padim",
    "spade",
    "stfpm",
    "reverse_distillation",
    "fastflow",
    "cflow",
    "cutpaste",
    "simplenet",
    "cfa",
    "dne",
    "continual_bank",
    "musc",
]

for _name in _METHOD_MODULES:
    try:
        import_module(f"iadkit.methods.{_name}")
    except ModuleNotFoundError as exc:  # a method not written yet; other import errors surface
        if exc.name != f"iadkit.methods.{_name}":
            raise

__all__ = ["Detector", "NotFittedError", "available_methods", "create", "get_method", "register"]
