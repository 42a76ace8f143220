"""Trainable copies of a pretrained backbone's stages, for methods that fine-tune it.

Methods on a frozen backbone use `iadkit.backbones.FeatureExtractor`. Methods that train the
network itself (DevNet, DRA, RegAD) need the same pretrained stages as ordinary trainable
modules: `pretrained_stages` loads them (offline, from the packaged or given weights) and
hands out deep copies, so the frozen extractor and the trained copy never share tensors.

Batch-norm statistics: a fine-tuning batch of a few dozen images of one product would
overwrite the ImageNet running statistics with those of a single texture; `freeze_batchnorm`
keeps every batch-norm layer in eval mode (its affine weights still train), the choice the
CutPaste method of this toolkit makes too.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn


def pretrained_stages(
    backbone: str, last: str, weights_path: str | os.PathLike[str] | None = None
) -> list[tuple[str, nn.Module]]:
    """(name, module) of every stage of `backbone` up to and including `last`, trainable.

    Parameters
    ----------
    backbone
        A registered backbone name (see `iadkit weights`).
    last
        The deepest stage to return (a layer name of that backbone, e.g. ``"blocks.6"``).
    weights_path
        A weight file, for backbones whose weights do not ship in a package.
    """
    from iadkit.backbones import FeatureExtractor

    # Building the architecture draws random initial weights (then overwritten by the
    # pretrained ones): keep those draws out of the caller's seeded random stream.
    with torch.random.fork_rng(devices=[]):
        full = FeatureExtractor(backbone, [last], weights_path, channels_last=False)
    stages = [(name, copy.deepcopy(module)) for name, module in zip(full._step_names, full.body)]
    for _, module in stages:
        module.train()
        for p in module.parameters():
            p.requires_grad_(True)
    return stages


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Put every batch-norm layer of `module` in eval mode (running statistics kept); returns it."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return module


__all__ = ["freeze_batchnorm", "pretrained_stages"]
