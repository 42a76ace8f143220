"""The detector contract every method implements, and the registry that names them.

Conventions borrowed from scikit-learn and PyOD, which our users already know:
- hyper-parameters are keyword arguments of `__init__`, stored unchanged as attributes and
  returned by `get_params()` (they go into the model file's manifest);
- `fit(train)` returns `self`; learned state lives in buffers/parameters registered on the
  module (so it is saved as safetensors), and `is_fitted` says whether it exists;
- higher score = more anomalous; `predict` before `fit` raises `NotFittedError`.

A detector is a `torch.nn.Module`: `predict` is pure tensor code wherever the method allows,
so the same graph serves evaluation, the server and ONNX export.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Self

import torch
from torch import nn

from iadkit.data.transforms import ImageSet
from iadkit.types import Prediction


class NotFittedError(RuntimeError):
    pass


class Detector(nn.Module):
    """Base class of all methods. Subclasses set `name`, implement `fit` and `predict`.

    Subclasses list their hyper-parameters as keyword arguments of `__init__` and call
    `super().__init__()` first. A method with a frozen pretrained backbone keeps it under the
    attribute name in `frozen_prefixes`, whose tensors are not written to model files (they
    are rebuilt from the backbone registry and checked by sha256 on load).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    supervision: ClassVar[str] = "unsupervised"  # | "semi-supervised" | "zero-shot"
    # Whether `fit` may be called again on a new task and keep what it learned (continual).
    continual: ClassVar[bool] = False
    frozen_prefixes: ClassVar[tuple[str, ...]] = ("backbone.",)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_fitted", torch.zeros((), dtype=torch.bool), persistent=True)

    # -- the contract ------------------------------------------------------------------------
    def fit(self, train: ImageSet, *, progress: bool = True) -> Self:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> Prediction:  # pragma: no cover - abstract
        """images: [B, 3, H, W] preprocessed. Returns scores [B] and maps [B, H, W]."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred = self.predict(images)
        assert pred.maps is not None
        return pred.scores, pred.maps

    # -- helpers for subclasses ----------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return bool(self._fitted)

    def _mark_fitted(self) -> None:
        self._fitted.fill_(True)

    def check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit() on good images first")

    @property
    def device(self) -> torch.device:
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    # -- parameters and state ------------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return [n for n, p in sig.parameters.items() if n != "self" and p.kind in kinds]

    def get_params(self) -> dict[str, Any]:
        """The hyper-parameters as given, JSON-ready (tuples become lists).

        A hyper-parameter whose attribute holds a built module (e.g. `backbone`, which names
        a backbone but is stored as its FeatureExtractor) is read from `<name>_name`.
        """
        params: dict[str, Any] = {}
        for n in self.param_names():
            value = getattr(self, n)
            if isinstance(value, nn.Module):
                value = getattr(self, f"{n}_name")
            params[n] = list(value) if isinstance(value, tuple) else value
        return params

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Learned tensors (frozen backbone excluded) and the JSON-able hyper-parameters."""
        tensors = {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if not any(k.startswith(p) for p in self.frozen_prefixes)
        }
        return tensors, {"method": self.name, "params": self.get_params()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put saved tensors in place, whatever their shape (memory banks vary in size)."""
        own = {k for k in self.state_dict() if not any(k.startswith(p) for p in self.frozen_prefixes)}
        missing = own - set(tensors)
        unexpected = set(tensors) - own
        if missing or unexpected:
            raise ValueError(
                f"model file does not match {type(self).__name__}: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        for key, value in tensors.items():
            module_path, _, leaf = key.rpartition(".")
            module = self.get_submodule(module_path) if module_path else self
            if leaf in module._parameters and module._parameters[leaf] is not None:
                param = module._parameters[leaf]
                module._parameters[leaf] = nn.Parameter(value.to(param.device), requires_grad=param.requires_grad)
            elif leaf in module._buffers:
                old = module._buffers[leaf]
                module._buffers[leaf] = value.to(old.device if old is not None else "cpu")
            else:
                raise ValueError(f"cannot place tensor {key!r} in {type(self).__name__}")

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Self:
        det = cls(**config["params"])
        det.load_tensors(tensors)
        det.eval()
        return det

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())


# -- registry --------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> dict[str, type[Detector]]:
    from iadkit import methods  # noqa: F401  (imports every method module, which registers it)

    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[Detector]:
    registry = available_methods()
    if name not in registry:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(registry)}")
    return registry[name]


def create(name: str, **params: Any) -> Detector:
    return get_method(name)(**params)
