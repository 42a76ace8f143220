"""torchvision ResNets (resnet18, resnet50, wide_resnet50_2, wide_resnet101_2): the field's default backbones.

Their weights are not redistributable inside a package here, so the user downloads
torchvision's file once; `weights.py` finds and verifies it. The torchvision naming is used
as is.
"""

from __future__ import annotations

import torch
from torch import nn

_ARCHS = ("resnet18", "resnet50", "wide_resnet50_2", "wide_resnet101_2")


def create(arch: str) -> nn.Module:
    """torchvision's architecture with random weights (weights=None: nothing is downloaded)."""
    import torchvision

    if arch not in _ARCHS:
        raise ValueError(f"unknown ResNet architecture {arch!r}; known: {', '.join(_ARCHS)}")
    return getattr(torchvision.models, arch)(weights=None)


def convert_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """torchvision files already use torchvision's names."""
    return sd


def stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """ "stem" (conv1, bn1, relu, maxpool; stride 4), then "layer1" ... "layer4" (strides 4-32)."""
    stem = nn.Sequential(*(model.get_submodule(n) for n in ("conv1", "bn1", "relu", "maxpool")))
    return [("stem", stem)] + [(f"layer{i}", model.get_submodule(f"layer{i}")) for i in range(1, 5)]
