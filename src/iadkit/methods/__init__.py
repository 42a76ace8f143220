"""One module per method. Importing this package registers every method.

Add a method: write `methods/<name>.py` with a `Detector` subclass decorated by
`@register`; every module of the package is imported (and so registered) here.
"""

import pkgutil
from importlib import import_module

from iadkit.methods.base import Detector, NotFittedError, available_methods, create, get_method, register

# Every module of this package except the contract's own defines and registers one method.
_NOT_METHODS = {"base", "params"}

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _NOT_METHODS and not _info.name.startswith("_"):
        import_module(f"{__name__}.{_info.name}")

__all__ = ["Detector", "NotFittedError", "available_methods", "create", "get_method", "register"]
