"""Frozen multi-layer feature extraction from a registered backbone.

A `FeatureExtractor` is rebuilt from three plain values — backbone name, layer names, weights
path — so a method stores those among its hyper-parameters instead of pickling the network,
and records `.sha256` so that a loader can prove the rebuilt features are the same ones.
Only the part of the network up to the deepest requested layer is kept and run: for
PatchCore on Lite0 that skips the last two stages and the 1280-channel head.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from iadkit.backbones import weights as W
from iadkit.backbones.registry import BackboneSpec, LayerInfo, get_spec, probe_layers
from iadkit.backbones.weights import BackboneError, WeightsMismatchError
from iadkit.data.transforms import Preprocess, _pair


def _load_model(spec: BackboneSpec, weights_path: str | os.PathLike[str] | None) -> tuple[nn.Module, W.WeightsFile]:
    """The full architecture with the verified weights in place (head included when shipped)."""
    wf = W.locate(spec, weights_path)
    raw = W.read_state_dict(wf.path)
    model = spec.builder.create(spec.arch)
    try:
        sd = spec.builder.convert_state_dict(raw, model)
    except KeyError as exc:
        raise WeightsMismatchError(
            f"weights file {str(wf.path)!r} does not fit backbone {spec.name!r} ({spec.arch}): {exc}"
        ) from None
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise WeightsMismatchError(
            f"weights file {str(wf.path)!r} does not fit backbone {spec.name!r} ({spec.arch}): "
            f"{str(exc).splitlines()[1:3]}"
        ) from None
    # Weights without a head (deep-sort's MobileNetV2) leave only the classifier missing.
    missing = [k for k in result.missing_keys if spec.has_head or not k.startswith("classifier.")]
    if missing or result.unexpected_keys:
        raise WeightsMismatchError(
            f"weights file {str(wf.path)!r} does not fit backbone {spec.name!r} ({spec.arch}): "
            f"missing {missing[:5]} ({len(missing)} in all), unexpected {result.unexpected_keys[:5]} "
            f"({len(result.unexpected_keys)} in all)"
        )
    return model, wf


def _freeze(module: nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


def classifier(name: str, weights_path: str | os.PathLike[str] | None = None) -> nn.Module:
    """The complete ImageNet classifier (logits over 1000 classes), frozen and in eval mode.

    Used to prove that weights are really pretrained and correctly mapped: feed an image
    normalised with `backbone_info(name).mean/std` and check the predicted class.
    """
    spec = get_spec(name)
    if not spec.has_head:
        raise BackboneError(
            f"backbone {name!r}: its packaged weights ({spec.package}) have no ImageNet classification "
            f"head, so there is no classifier; use FeatureExtractor({name!r}) for features"
        )
    model, _ = _load_model(spec, weights_path)
    _freeze(model)
    return model


class FeatureExtractor(nn.Module):
    """Frozen, ImageNet-pretrained backbone returning the feature maps of named layers.

    `forward(x)` takes images normalised with `.mean`/`.std` ([B, 3, H, W]) and returns
    ``{layer: [B, C, H/stride, W/stride]}`` in the order of `layers`. The module stays in eval
    mode whatever `train()` is called with, so batch-norm statistics are never updated.

    `channels_last` (default: on) runs the convolutions in NHWC memory format, which oneDNN
    executes about 2x faster on CPU for these networks; outputs are returned contiguous
    (NCHW) either way so callers can `.view()` them.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] | None = None,
        weights_path: str | os.PathLike[str] | None = None,
        *,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        spec = get_spec(backbone)
        if isinstance(layers, str):
            layers = [layers]
        wanted = tuple(layers) if layers is not None else spec.default_layers
        model, wf = _load_model(spec, weights_path)
        steps = spec.builder.stages(model)
        names = [n for n, _ in steps]
        unknown = [layer for layer in wanted if layer not in names]
        if not wanted or unknown or len(set(wanted)) != len(wanted):
            raise BackboneError(
                f"backbone {backbone!r}: invalid layers {list(wanted)}"
                + (f" (unknown: {unknown})" if unknown else "")
                + f"; choose one or more distinct names of: {', '.join(names)}"
            )
        deepest = max(names.index(layer) for layer in wanted)
        kept = steps[: deepest + 1]
        self.body = nn.Sequential(*[m for _, m in kept])
        self._step_names: tuple[str, ...] = tuple(n for n, _ in kept)
        self._spec = spec
        self.name = spec.name
        self.backbone = spec.name
        self.layers: tuple[str, ...] = wanted
        self.weights_path = None if weights_path is None else str(weights_path)
        self._weights = wf
        _freeze(self)
        geometry = {info.name: info for info in probe_layers(list(kept))}
        self._geometry: dict[str, LayerInfo] = {n: geometry[n] for n in wanted}
        self.channels_last = True if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.body.to(memory_format=torch.channels_last)

    # -- frozen --------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always eval: a frozen backbone's batch-norm must keep its ImageNet statistics."""
        return super().train(False)

    # -- features ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        taps: dict[str, torch.Tensor] = {}
        for name, module in zip(self._step_names, self.body):
            x = module(x)
            if name in self._geometry:
                taps[name] = x.contiguous()
        return {name: taps[name] for name in self.layers}

    # -- description ---------------------------------------------------------------------------
    @property
    def strides(self) -> dict[str, int]:
        return {n: g.stride for n, g in self._geometry.items()}

    @property
    def channels(self) -> dict[str, int]:
        return {n: g.channels for n, g in self._geometry.items()}

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel mean (RGB, on [0, 1] pixels) the weights were trained with."""
        return self._spec.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self._spec.std

    @property
    def weights_sha256(self) -> str:
        return self._weights.sha256

    @property
    def sha256(self) -> str:
        """Alias of `weights_sha256`, the value model manifests record."""
        return self._weights.sha256

    @property
    def weights_file(self) -> str:
        """The file the weights were read from (for messages; not a hyper-parameter)."""
        return str(self._weights.path)

    def preprocess(
        self, image_size: int | tuple[int, int] = 256, crop_size: int | tuple[int, int] | None = None
    ) -> Preprocess:
        """A `Preprocess` with this backbone's normalisation, to store with a model."""
        crop = None if crop_size is None else _pair(crop_size, "crop_size")
        return Preprocess(image_size=_pair(image_size, "image_size"), crop_size=crop, mean=self.mean, std=self.std)

    def config(self) -> dict[str, Any]:
        """The JSON-able values that rebuild this extractor (plus the sha256 to verify it)."""
        return {
            "backbone": self.name,
            "layers": list(self.layers),
            "weights_path": self.weights_path,
            "sha256": self.sha256,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], *, channels_last: bool | None = None) -> FeatureExtractor:
        """Rebuild from `config()`; raises WeightsMismatchError when the weights found differ."""
        fx = cls(config["backbone"], config.get("layers"), config.get("weights_path"), channels_last=channels_last)
        fx.verify(config.get("sha256"))
        return fx

    def verify(self, expected_sha256: str | None) -> None:
        """Raise WeightsMismatchError unless the loaded weights have `expected_sha256` (None: skip)."""
        W.verify_sha256(self.sha256, expected_sha256, what=f"backbone {self.name!r}")

    def extra_repr(self) -> str:
        geo = ", ".join(f"{n}: {g.channels}ch@1/{g.stride}" for n, g in self._geometry.items())
        return f"{self.name!r}, layers [{geo}], sha256={self.sha256[:12]}, channels_last={self.channels_last}"
