"""The detector contract every method implements, and the registry that names them.

Conventions borrowed from scikit-learn and PyOD, which our users already know:

- hyper-parameters are declared once as annotated class attributes (`methods.params`); the
  constructor is keyword-only and stores each value unchanged; `get_params`, `set_params`
  and `clone` work as in scikit-learn;
- validation happens in one place, `validate()`, called by `fit` and when a model file is
  loaded, and raises `InvalidParameterError`;
- `fit(train)` builds the networks (`_build`), learns (`_fit`) and returns `self`; everything
  learned is named with a trailing underscore (``memory_bank_``, ``student_``) and registered
  on the module, so it is saved as safetensors. `fit` always starts from scratch, as in
  scikit-learn, except with ``warm_start=True`` (below);
- higher score = more anomalous; `predict` before `fit` raises `NotFittedError`.

A method implements `_fit(train, progress)` and `_predict(images)`. `_predict` returns raw
maps: at feature resolution or input size, whichever the algorithm naturally produces; the
model's stored `Postprocess` upsamples them to the input size, smooths them and, for a method
that returns no image scores of its own, takes the map maximum as the score. Tensor code
throughout, so the same graph serves evaluation, the server and ONNX export.

Class attributes say what a method is, and are read by the settings layer (to refuse a
combination that makes no sense), by ``iadkit methods`` and by the report: `family`,
`paper`, `supervision` (unsupervised | semi-supervised | zero-shot), `continual`,
`multi_class`, `transductive`, `produces_maps`, `uses_depth`, and `map_sigma` (the paper's
map smoothing, a Gaussian sigma at a 224-px input).

Depth travels inside the image tensor. A method with ``uses_depth = True`` gets a model whose
`Preprocess` has ``depth=True`` (`Model.create` sets it), so every tensor it is given, in
`fit` (``ImageSet.image``) and in `predict`, is [B, 6, H, W]: channels 0-2 the normalised
colour image, channels 3-5 the sample's organised point map (x, y, z in the file's units,
nearest-resampled to the same geometry, (0, 0, 0) where the sensor saw no point); `split_depth`
separates them. Samples carry the point map (`iadkit.data.PointMapSample`, from MVTec 3D-AD
folders); nothing else changes, so settings, the benchmark, model files and the server pass
depth along without any other method knowing about it.

Learning several tasks (products) one after the other — the continual setting:

- a *continual* method (``continual = True``: DNE, the continual memory bank) learns a new
  task with `partial_fit(train)`, which never rebuilds: it adds the task to what the detector
  already holds (the scikit-learn name for incremental learning). A continual method
  implements `_fit_task(train, progress)` (learn one more task on the current state), and
  its `_fit` is `_fit_task` on a freshly built detector, so `fit` = the first task;
- any other method can be trained task after task with ``fit(train, warm_start=True)``:
  its networks and learned state are kept and `_fit` runs again on the new task's images
  only. For a trained method (STFPM, Reverse Distillation ...) that is naive sequential
  fine-tuning, the forgetting baseline of the continual literature; for a statistics
  method (PatchCore, PaDiM) `_fit` replaces the statistics, i.e. it keeps only the last
  task. `partial_fit` on such a method raises `NotContinualError` saying so.

Zero-shot methods (``supervision = "zero-shot"``, MuSc) learn nothing: `fit` accepts an
empty training set and only builds the feature extractor. A *transductive* method
(``transductive = True``) scores each image against the other images predicted with it, so
its scores depend on the batch: `Model.predict` and `iadkit.evaluate` give it the whole set
as one batch (never cut into mini-batches), and its time per image grows with the set.
"""

from __future__ import annotations

import copy
import os
import sys
import typing
from collections.abc import Iterator
from inspect import Parameter, Signature
from typing import Any, ClassVar, Self

import torch
from torch import nn

from iadkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageSet
from iadkit.errors import (
    IadkitError,
    InvalidParameterError,
    ModelFileError,
    NotFittedError,
    TrainingDataError,
    UnknownNameError,
)
from iadkit.methods.params import Check, Param, check_value, describe_param, param, unknown_parameter
from iadkit.types import GOOD, Prediction

if typing.TYPE_CHECKING:
    from iadkit.components.feature_cache import FeatureCache

SUPERVISION_KINDS = ("unsupervised", "semi-supervised", "zero-shot")

# The two layer presets most methods share (`BackboneDetector.layer_presets`), per backbone
# family: the three stages at strides 4, 8 and 16 (ResNet layer1-3: STFPM, RD, PaDiM, ...) and
# the two at strides 8 and 16 (layer2-3: PatchCore, SimpleNet).
PRESET_STRIDES_4_8_16: dict[str, tuple[str, ...]] = {
    "efficientnet": ("blocks.1", "blocks.2", "blocks.4"),
    "resnet": ("layer1", "layer2", "layer3"),
    "mobilenet": ("features.3", "features.6", "features.13"),
}
PRESET_STRIDES_8_16: dict[str, tuple[str, ...]] = {
    "efficientnet": ("blocks.2", "blocks.4"),
    "resnet": ("layer2", "layer3"),
    "mobilenet": ("features.6", "features.13"),
}


def split_depth(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A depth method's input [B, 6, H, W] -> (colour [B, 3, H, W], point map [B, 3, H, W]).

    Raises InvalidParameterError for a tensor without the three point-map channels (a model
    whose preprocessing was built without ``depth``)."""
    if images.ndim != 4 or images.shape[1] != 6:
        raise InvalidParameterError(
            f"a method that uses depth takes [B, 6, H, W] tensors (colour + x, y, z), got {tuple(images.shape)}; "
            "create the model with Model.create so that its preprocessing appends the point maps"
        )
    return images[:, :3], images[:, 3:]


class NotContinualError(IadkitError, TypeError):
    """`partial_fit` was called on a method that cannot learn a task without forgetting."""


def jsonable(value: Any) -> Any:
    """Hyper-parameter values as JSON has them: tuples become lists, paths strings."""
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


@typing.dataclass_transform(kw_only_default=True, field_specifiers=(param,))
class Detector(nn.Module):
    """Base class of all methods.

    Subclasses set `name` (and the descriptive class attributes), declare hyper-parameters
    with `param`, and implement `_fit` and `_predict`; methods with networks to build
    before training or loading (a backbone, a student, a flow) build them in `_build`.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    supervision: ClassVar[str] = "unsupervised"
    # Whether `partial_fit` learns one more task and keeps what was learned (continual): see
    # the module docstring. Other methods are trained task after task by warm-started `fit`.
    continual: ClassVar[bool] = False
    # Whether the method is designed to learn several categories in one model (UniAD). Any
    # method can be trained on a union of categories (the multi_class setting) without
    # knowing; this says that the method was built for it.
    multi_class: ClassVar[bool] = False
    # Whether a prediction depends on the other images predicted with it (MuSc's mutual
    # scoring): `Model.predict` and `evaluate` then predict the whole set as one batch.
    transductive: ClassVar[bool] = False
    # Whether `predict` draws anomaly maps (False: image scores only).
    produces_maps: ClassVar[bool] = True
    # Whether samples must carry depth / point maps (3D methods): inputs are then [B, 6, H, W]
    # (colour + x, y, z; see the module docstring and `split_depth`).
    uses_depth: ClassVar[bool] = False
    # The paper's map smoothing: Gaussian sigma in pixels of a 224-px input (0: none).
    map_sigma: ClassVar[float] = 4.0
    # Tensors under these prefixes are rebuilt on load, never written to model files.
    frozen_prefixes: ClassVar[tuple[str, ...]] = ()
    # The smallest configuration that still runs every code path (seconds on a CPU at 64 px):
    # what the contract test (tests/test_contract.py) fits for every registered method.
    smoke_params: ClassVar[dict[str, Any]] = {}
    # The paper's configuration (backbone, epochs, widths ...) and input size, one switch away:
    # ``Model.create(name, paper=True, weights_path=...)``; the defaults are CPU-sized.
    paper_params: ClassVar[dict[str, Any]] = {}
    paper_image_size: ClassVar[int] = 256

    seed: int = param(0, "Seed of every random choice the method makes (initialisation, sampling, order).")

    _params: ClassVar[dict[str, tuple[Param, Any]]] = {}

    # -- declarations -> constructor, signature, docs ------------------------------------------
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The method's own hyper-parameters first (in declaration order), then those of its
        # bases; a redeclared name takes the most derived declaration.
        found: dict[str, tuple[Param, Any]] = {}
        for klass in cls.__mro__:
            for attr, value in vars(klass).items():
                if isinstance(value, Param) and attr not in found:
                    found[attr] = (value, _annotation(klass, attr))
        cls._params = found
        cls.__signature__ = Signature(  # type: ignore[attr-defined]
            [Parameter(n, Parameter.KEYWORD_ONLY, default=p.default, annotation=a) for n, (p, a) in found.items()]
        )
        if cls.__doc__ and found and "Parameters\n    ----" not in cls.__doc__:
            entries = "\n".join(describe_param(n, a, p) for n, (p, a) in found.items())
            body = "\n".join("    " + line if line else line for line in entries.splitlines())
            cls.__doc__ = f"{cls.__doc__.rstrip()}\n\n    Parameters\n    ----------\n{body}\n"

    def __init__(self, **params: Any) -> None:
        super().__init__()
        known = self._params
        for key in params:
            if key not in known:
                raise unknown_parameter(type(self).__name__, key, list(known))
        for key, (spec, _) in known.items():
            setattr(self, key, params.get(key, spec.default))
        self._is_fitted = False
        self._target_device = torch.device("cpu")

    @classmethod
    def param_names(cls) -> list[str]:
        return list(cls._params)

    # -- scikit-learn conventions ------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """The hyper-parameters exactly as stored (``jsonable`` turns them into JSON values)."""
        return {n: getattr(self, n) for n in self._params}

    def set_params(self, **params: Any) -> Self:
        """Change hyper-parameters. Changing one that shapes what `fit` learns forgets the fit
        (refit before predicting); an inference knob (e.g. the search backend) keeps it."""
        for key in params:
            if key not in self._params:
                raise unknown_parameter(type(self).__name__, key, self.param_names())
        changed = [k for k, v in params.items() if getattr(self, k) != v]
        for key, value in params.items():
            setattr(self, key, value)
        if changed:
            self.validate()
            if any(not self._params[k][0].inference for k in changed):
                self._is_fitted = False
            elif self._is_fitted:
                self._params_changed(changed)
        return self

    def clone(self) -> Self:
        """An unfitted detector with the same hyper-parameters."""
        return type(self)(**copy.deepcopy(self.get_params()))

    def validate(self) -> None:
        """Check every hyper-parameter (type, bounds, choices, then `_check_params`); raise
        `InvalidParameterError` naming the first one that cannot work."""
        owner = type(self).__name__
        for key, (spec, annotation) in self._params.items():
            check_value(owner, key, getattr(self, key), annotation, spec)
        self._check_params()

    # -- the contract --------------------------------------------------------------------------------
    def fit(self, train: ImageSet, *, warm_start: bool = False, progress: bool = True) -> Self:
        """Learn from `train` (good images; labelled defects too for semi-supervised methods).

        Validates the hyper-parameters, builds the networks afresh, runs `_fit` with the
        global random generator seeded by `seed` (and restored afterwards), returns `self`.

        Parameters
        ----------
        train : ImageSet
            The training images. May be empty for a zero-shot method (it learns nothing).
        warm_start : bool
            On a fitted detector, keep its networks and learned state and run the method's
            training again on `train` alone (naive sequential fine-tuning; see the module
            docstring). Ignored on an unfitted detector.
        progress : bool
            Show progress bars.
        """
        self.validate()
        if len(train) == 0 and self.supervision != "zero-shot":
            raise TrainingDataError(f"{type(self).__name__}: the training set is empty")
        keep = warm_start and self._is_fitted
        self._is_fitted = False
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(self.seed)
            if not keep:
                self._build()
            super().to(self._target_device)
            self._fit(train, progress=progress)
        self._is_fitted = True
        self.eval()
        return self

    def partial_fit(self, train: ImageSet, *, progress: bool = True) -> Self:
        """Learn one more task from `train` and keep every task learned before (continual
        methods only); on an unfitted detector the same as `fit`.

        Raises
        ------
        NotContinualError
            The method is not continual (``continual = False``): it would forget. Use
            ``fit(train, warm_start=True)`` for naive sequential training, knowing that.
        """
        if not self.continual:
            raise NotContinualError(
                f"{self.name} is not a continual method: it cannot learn a new task and keep the old ones. "
                "Use fit(train, warm_start=True) for naive sequential fine-tuning (it forgets), "
                "or a continual method such as dne or continual_bank"
            )
        if not self._is_fitted:
            return self.fit(train, progress=progress)
        self.validate()
        if len(train) == 0:
            raise TrainingDataError(f"{type(self).__name__}: the new task's training set is empty")
        self._is_fitted = False
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(self.seed)
            super().to(self._target_device)
            self._fit_task(train, progress=progress)
        self._is_fitted = True
        self.eval()
        return self

    def predict(self, images: torch.Tensor) -> Prediction:
        """Preprocessed images [B, 3, H, W] -> scores [B] (or None: the map maximum after
        post-processing) and raw maps [B, h, w] (or None for image-level methods)."""
        self.check_fitted()
        return self._predict(images)

    def forward(self, images: torch.Tensor) -> Prediction:
        return self.predict(images)

    # -- what a method implements ------------------------------------------------------------------
    def _check_params(self) -> None:
        """Rules that involve several hyper-parameters; raise InvalidParameterError."""

    def _build(self) -> None:
        """Create the networks and empty learned buffers the hyper-parameters call for."""

    def _fit(self, train: ImageSet, *, progress: bool) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _predict(self, images: torch.Tensor) -> Prediction:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fit_task(self, train: ImageSet, *, progress: bool) -> None:  # pragma: no cover - abstract
        """Continual methods: learn one more task on top of the current (built) state."""
        raise NotImplementedError

    def _params_changed(self, names: list[str]) -> None:
        """A fitted detector's inference knobs changed: rebuild what depends on them."""

    def _after_load(self) -> None:
        """Tensors were just loaded from a model file: rebuild what depends on them."""

    # -- helpers -----------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self._is_fitted

    def check_fitted(self) -> None:
        if not self._is_fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit() on good images first")

    @property
    def device(self) -> torch.device:
        return self._target_device

    def to(self, *args: Any, **kwargs: Any) -> Self:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            self._target_device = torch.device(device)
        return super().to(*args, **kwargs)

    def _rng_devices(self) -> list[torch.device]:
        return [self._target_device] if self._target_device.type == "cuda" else []

    def draws_maps(self) -> bool:
        """Whether this instance draws maps (a method may draw them only in some configurations)."""
        return bool(self.produces_maps)

    def input_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and std (RGB, on [0, 1] pixels) the model's preprocessing should use."""
        return IMAGENET_MEAN, IMAGENET_STD

    @staticmethod
    def good_only(train: ImageSet) -> ImageSet:
        """The good images of `train` (a semi-supervised split may also hold labelled defects)."""
        keep = [s for s in train.samples if s.label == GOOD]
        if len(keep) == len(train.samples):
            return train
        return ImageSet(keep, train.preprocess, cache=train.cache_enabled)

    # -- parameters and state ------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Learned tensors (frozen backbone excluded) and the JSON-able hyper-parameters."""
        tensors = {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if not any(k.startswith(p) for p in self.frozen_prefixes)
        }
        return tensors, {"method": self.name, "params": jsonable(self.get_params())}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put saved tensors in place, whatever their shape (memory banks vary in size)."""
        own = {k for k in self.state_dict() if not any(k.startswith(p) for p in self.frozen_prefixes)}
        missing = own - set(tensors)
        unexpected = set(tensors) - own
        if missing or unexpected:
            raise ModelFileError(
                f"model file does not match {type(self).__name__}: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        for key, value in tensors.items():
            module_path, _, leaf = key.rpartition(".")
            module = self.get_submodule(module_path) if module_path else self
            old_param = module._parameters.get(leaf)
            if old_param is not None:
                module._parameters[leaf] = nn.Parameter(
                    value.to(old_param.device), requires_grad=old_param.requires_grad
                )
            elif leaf in module._buffers:
                old = module._buffers[leaf]
                module._buffers[leaf] = value.to(old.device if old is not None else self._target_device)
            else:
                raise ModelFileError(f"cannot place tensor {key!r} in {type(self).__name__}")

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Self:
        """Rebuild a fitted detector from `state()`'s output (what a model file holds)."""
        params = dict(config["params"])
        missing = [n for n in cls._params if n not in params]
        extra = [n for n in params if n not in cls._params]
        if missing or extra:
            raise ModelFileError(
                f"the model file's {cls.name} hyper-parameters do not match this iadkit: "
                + (f"missing {missing} " if missing else "")
                + (f"unknown {extra} " if extra else "")
                + "(was it written by another version? refit the model with this one)"
            )
        det = cls(**{k: _from_json(v, cls._params[k][1]) for k, v in params.items()})
        det.validate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(det.seed)
            det._build()
        det.load_tensors(tensors)
        det._after_load()
        det._is_fitted = True
        det.eval()
        return det

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())


def _from_json(value: Any, annotation: Any) -> Any:
    """A JSON list back to the tuple a ``tuple[...]``-annotated hyper-parameter holds."""
    if isinstance(value, list):
        origins = {typing.get_origin(a) for a in (typing.get_args(annotation) or (annotation,))}
        if tuple in origins or typing.get_origin(annotation) is tuple:
            return tuple(_from_json(v, Any) for v in value)
    return value


def _annotation(klass: type, attr: str) -> Any:
    """The evaluated annotation of `attr` in `klass` (modules use ``from __future__ import annotations``)."""
    raw = vars(klass).get("__annotations__", {}).get(attr, Any)
    if not isinstance(raw, str):
        return raw
    namespace = {**vars(typing), **vars(sys.modules[klass.__module__])}
    return eval(raw, namespace)


# -- methods on a frozen pretrained backbone --------------------------------------------------------
class BackboneDetector(Detector):
    """Base of methods built on a frozen ImageNet backbone tapped at named layers.

    It owns what those methods share: the backbone and weight-file hyper-parameters, the
    validation of those and of the tapped layers (a method declares `layers`, or overrides
    `backbone_layers` when it taps the network differently), the frozen `FeatureExtractor` (``backbone_``, rebuilt from the
    registry on load and checked by sha256, never written to model files), the input
    normalisation its weights were trained with, and `single_pass`, the streaming pass over
    the training images that feature-statistics methods (PatchCore, PaDiM, SPADE ...) make.
    """

    frozen_prefixes: ClassVar[tuple[str, ...]] = ("backbone_.",)

    backbone: str = param(
        "efficientnet_lite0",
        "Frozen ImageNet backbone (see `iadkit weights`); its weights load offline from a package "
        "or from `weights_path`.",
    )
    weights_path: str | os.PathLike[str] | None = param(
        None, "A weight file for the backbone (needed for the torchvision backbones, which do not ship offline)."
    )

    def _check_params(self) -> None:
        from iadkit.backbones import backbone_names, layer_names

        if self.backbone not in backbone_names():
            raise InvalidParameterError(
                f"{type(self).__name__}: unknown backbone {self.backbone!r}; choose one of {', '.join(backbone_names())}"
            )
        if self.weights_path is not None and not os.path.isfile(self.weights_path):
            raise InvalidParameterError(
                f"{type(self).__name__}: weights_path {os.fspath(self.weights_path)!r} is not a file; "
                f"give the path of the {self.backbone} weight file (see `iadkit weights`)"
            )
        names = [info.name for info in layer_names(self.backbone)]
        layers = self.tapped_layers()
        unknown = [layer for layer in self.backbone_layers() if layer not in names]
        if unknown or len(set(layers)) != len(layers):
            raise InvalidParameterError(
                f"{type(self).__name__}: layers {layers} are not distinct layers of {self.backbone!r}"
                + (f" (unknown: {unknown})" if unknown else "")
                + f"; choose among {', '.join(names)}"
            )

    # A method's layers for each backbone family (efficientnet | resnet | mobilenet), used when
    # its `layers` hyper-parameter is None: the paper's layers on the paper's backbone are then
    # one parameter away (``backbone="wide_resnet50_2"`` with the user's weight file).
    layer_presets: ClassVar[dict[str, tuple[str, ...]]] = {}

    def tapped_layers(self) -> list[str]:
        """The method's layers: its `layers` hyper-parameter, or when that is None the method's
        preset for the backbone's family (`layer_presets`)."""
        if "layers" not in self._params:
            return []  # a method that taps the backbone its own way (CutPaste)
        layers = getattr(self, "layers", None)
        if layers is not None:
            return list(layers)
        from iadkit.backbones import get_spec

        family = get_spec(self.backbone).family
        if family not in self.layer_presets:
            raise InvalidParameterError(
                f"{type(self).__name__} has no default layers for backbone {self.backbone!r}; give layers=[...] "
                "(see `iadkit weights` and the backbone's layer names)"
            )
        return list(self.layer_presets[family])

    def backbone_layers(self) -> list[str]:
        """Every layer the backbone must output (`layers` plus any extra tap a method needs)."""
        return self.tapped_layers()

    def _build(self) -> None:
        from iadkit.backbones import FeatureExtractor

        # Building the architecture draws random initial weights (then overwritten): keep those
        # draws out of the seeded stream, so a method's own networks start the same whatever
        # the backbone.
        with torch.random.fork_rng(devices=[]):
            self.backbone_ = FeatureExtractor(self.backbone, self.backbone_layers(), self.weights_path)

    def input_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        from iadkit.backbones import get_spec

        spec = get_spec(self.backbone)
        return spec.mean, spec.std

    def layer_channels(self) -> list[int]:
        """Channels of each of `layers` (from the architecture; no weights needed)."""
        from iadkit.backbones import layer_names

        info = {i.name: i for i in layer_names(self.backbone)}
        return [info[layer].channels for layer in self.tapped_layers()]

    def layer_strides(self) -> list[int]:
        from iadkit.backbones import layer_names

        info = {i.name: i for i in layer_names(self.backbone)}
        return [info[layer].stride for layer in self.tapped_layers()]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen feature maps of `layers`, in order, without gradients."""
        with torch.no_grad():
            taps = self.backbone_(images)
        return [taps[layer] for layer in self.tapped_layers()]

    def frozen_features(
        self,
        train: ImageSet,
        *,
        head: nn.Module | None = None,
        batch_size: int = 32,
        progress: bool = True,
        keep_pixels: bool = False,
        description: str | None = None,
    ) -> FeatureCache:
        """The frozen backbone's output for every training image, computed once
        (`components.feature_cache`): the maps of `layers` (or `head` applied to them),
        through ONNX Runtime on a CPU when it is installed, torch otherwise."""
        from iadkit.components.feature_cache import cache_features
        from iadkit.components.features import FeaturePath, LayerTaps

        path = FeaturePath(self.backbone_, head if head is not None else LayerTaps(), self.tapped_layers(), "auto")
        return cache_features(
            path,
            train,
            batch_size=batch_size,
            device=self.device,
            description=description or f"{self.name}: frozen features",
            progress=progress,
            keep_pixels=keep_pixels,
        )

    def single_pass(
        self, train: ImageSet, batch_size: int, description: str, *, progress: bool = True
    ) -> Iterator[torch.Tensor]:
        """Preprocessed training batches on the detector's device, each read once.

        Decoded pixels are not cached (one pass gains nothing from a cache, and ELPV's would
        take 227 MB); batches come under `torch.no_grad` (not inference mode: a method may keep
        tensors computed from them, e.g. CFA's memory, for training).
        """
        batches = train.batches(batch_size)
        if progress:
            from iadkit.progress import track

            batches = track(batches, total=train.num_batches(batch_size), description=description)
        caching, train.cache_enabled = train.cache_enabled, False
        try:
            with torch.no_grad():
                for batch in batches:
                    yield batch.images.to(self.device)
        finally:
            train.cache_enabled = caching


# -- registry ------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    if cls.supervision not in SUPERVISION_KINDS:
        raise ValueError(f"{cls.__name__}.supervision must be one of {SUPERVISION_KINDS}")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> dict[str, type[Detector]]:
    from iadkit import methods  # noqa: F401  (imports every method module, which registers it)

    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[Detector]:
    registry = available_methods()
    if name not in registry:
        import difflib

        close = difflib.get_close_matches(str(name), list(registry), n=2, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UnknownNameError(
            f"unknown method {name!r}; {hint}available: {', '.join(registry)} (see `iadkit methods`)"
        )
    return registry[name]


def create(name: str, **params: Any) -> Detector:
    return get_method(name)(**params)


__all__ = [
    "BackboneDetector",
    "Check",
    "Detector",
    "NotContinualError",
    "NotFittedError",
    "available_methods",
    "create",
    "get_method",
    "jsonable",
    "param",
    "register",
    "split_depth",
]
