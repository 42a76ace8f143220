"""Preprocessing that is stored with every model, so that training, evaluation, the
exported model and the server all see exactly the same pixels.

An image goes: HxWxC uint8/uint16 array -> float in [0, 1] (16-bit keeps its precision)
-> 3 channels (grayscale is replicated, because the backbones are RGB networks) -> resize
(bilinear, antialiased) -> optional centre crop -> (x - mean) / std.
Masks go through the same geometry with nearest-neighbour resampling.

Grayscale or colour: `Model.fit` records in ``Preprocess.channels`` whether the training
images were grayscale (1: one channel, or three identical ones) or colour (3). An image of
the other kind is then refused with an `ImageReadError` naming it (in batch prediction: an
error row for that image), because replicating a gray image to RGB (or the reverse) gives
the model pixels unlike its training images and scores that do not mean what the threshold
assumes. A gray image stored as RGB (three equal channels) counts as gray, so the same
pixels are never refused for their container. To accept both on purpose, set
``model.preprocess = dataclasses.replace(model.preprocess, channels=None)``. Training images
that mix both kinds leave ``channels`` None (with a warning) and nothing is checked.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from iadkit.data.pixels import channel_kind, check_channels  # noqa: F401  (channel_kind: re-exported)
from iadkit.errors import ImageReadError, InvalidParameterError, MetricUndefinedError
from iadkit.types import ANOMALOUS, Sample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _pair(size: Any, name: str = "image_size") -> tuple[int, int]:
    """(h, w) from an int or a pair of ints, all positive. A string is refused: ``"64"``
    would otherwise unpack into a 6 x 4 model."""
    if _is_int(size):
        pair = (int(size), int(size))
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(v) for v in size):
        pair = (int(size[0]), int(size[1]))
    else:
        raise InvalidParameterError(f"{name} must be an integer or a pair of integers (pixels), got {size!r}")
    if min(pair) < 1:
        raise InvalidParameterError(f"{name} must be positive (pixels), got {size!r}")
    return pair


def _triple(values: Any, name: str, *, positive: bool = False) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name} must be three numbers (one per colour channel), got {values!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out) or (positive and min(out) <= 0):
        kind = "positive finite" if positive else "finite"
        raise InvalidParameterError(f"{name} must be three {kind} numbers (one per colour channel), got {values!r}")
    return out[0], out[1], out[2]


@dataclass(frozen=True)
class Preprocess:
    """Geometry and normalisation of a model's input; JSON-serialisable via `to_dict`.

    Parameters
    ----------
    image_size : int or (int, int)
        Resize to this (height, width) in pixels; an int means a square.
    crop_size : int or (int, int), optional
        Then centre-crop to this size (not larger than `image_size`).
    mean, std : three floats
        Per-channel normalisation, ``(x - mean) / std`` on values in [0, 1].
    channels : {1, 3}, optional
        The kind of image the model was trained on: 1 grayscale, 3 colour (set by
        `Model.fit`). An image of the other kind is refused (see the module docstring).
        None: not known, nothing checked.
    depth : bool
        Append each sample's point map as channels 3-5 (for methods that use depth; see the
        module docstring).
    """

    image_size: tuple[int, int] = (256, 256)
    crop_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channels: int | None = None
    depth: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _pair(self.image_size, "image_size"))
        if self.crop_size is not None:
            crop = _pair(self.crop_size, "crop_size")
            if crop[0] > self.image_size[0] or crop[1] > self.image_size[1]:
                raise InvalidParameterError(f"crop_size {crop} is larger than image_size {self.image_size}")
            object.__setattr__(self, "crop_size", crop)
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", _triple(self.std, "std", positive=True))
        if self.channels not in (None, 1, 3) or isinstance(self.channels, bool):
            raise InvalidParameterError(f"channels must be 1 (grayscale), 3 (colour) or None, got {self.channels!r}")
        if not isinstance(self.depth, bool):
            raise InvalidParameterError(f"depth must be True or False, got {self.depth!r}")

    @property
    def output_size(self) -> tuple[int, int]:
        return self.crop_size or self.image_size

    @property
    def tensor_channels(self) -> int:
        """Channels of the tensors this preprocessing makes: 3, or 6 with depth."""
        return 6 if self.depth else 3

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["crop_size"] = list(self.crop_size) if self.crop_size else None
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """The inverse of `to_dict`; a manifest without ``channels`` (older files) checks nothing,
        one without ``depth`` has none."""
        return cls(
            image_size=tuple(d["image_size"]),
            crop_size=tuple(d["crop_size"]) if d.get("crop_size") else None,
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            channels=d.get("channels"),
            depth=bool(d.get("depth", False)),
        )

    def check_channels(self, image: np.ndarray, where: str) -> int:
        """The image's kind (1 gray, 3 colour); raises `ImageReadError` naming `where` when
        it is not the kind the model was trained on."""
        return check_channels(image, self.channels, where)

    # -- images --------------------------------------------------------------------------
    def to_unit_float(self, image: np.ndarray) -> torch.Tensor:
        """HxWxC (or HxW) uint8/uint16/float array -> 3xHxW float32 in [0, 1]."""
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or 0 in arr.shape:
            raise ImageReadError(f"expected a non-empty HxWxC image with C in 1, 3 or 4, got shape {arr.shape}")
        if arr.shape[2] == 4:  # io.read_image drops alpha already; arrays from users may not
            arr = arr[:, :, :3]
        if arr.dtype == np.uint8:
            t = torch.from_numpy(arr.astype(np.float32)).div_(255.0)  # astype copies: inputs may be read-only
        elif arr.dtype == np.uint16:
            t = torch.from_numpy(arr.astype(np.float32)).div_(65535.0)
        elif np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():  # NaN pixels would give a NaN score, never a verdict
                raise ImageReadError("the image holds NaN or infinite pixel values; give finite values in [0, 1]")
            t = torch.from_numpy(np.array(arr, dtype=np.float32))
        else:
            raise ImageReadError(f"unsupported image dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
        t = t.permute(2, 0, 1)
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        return t.contiguous()

    def geometry(self, chw: torch.Tensor, *, is_mask: bool = False) -> torch.Tensor:
        """Resize then centre-crop a CxHxW tensor (images bilinear+antialias, masks nearest)."""
        x = chw[None]
        if tuple(x.shape[-2:]) != self.image_size:
            if is_mask:
                x = F.interpolate(x, size=self.image_size, mode="nearest")
            else:
                x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
        if self.crop_size is not None:
            ch, cw = self.crop_size
            top = (self.image_size[0] - ch) // 2
            left = (self.image_size[1] - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        return x[0]

    def normalize(self, chw: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=chw.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=chw.dtype).view(3, 1, 1)
        return (chw - mean) / std

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """One image array -> normalised 3xHxW float32 tensor."""
        return self.normalize(self.geometry(self.to_unit_float(image)))

    def view(self, image: np.ndarray) -> np.ndarray:
        """The image as the model sees it (resized, cropped), HxWx3 float32 in [0, 1], before
        normalisation (the torch-free `iadkit.data.pixels.PixelPreprocess.view` gives the same)."""
        return self.geometry(self.to_unit_float(image)).permute(1, 2, 0).numpy()

    def point_map(self, xyz: np.ndarray) -> torch.Tensor:
        """One HxWx3 point map -> 3xHxW float32 in the model's input geometry (nearest)."""
        arr = np.asarray(xyz)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ImageReadError(f"a point map must be an H x W x 3 array of (x, y, z), got shape {arr.shape}")
        t = torch.from_numpy(np.array(arr, dtype=np.float32)).permute(2, 0, 1)
        return self.geometry(t, is_mask=True).contiguous()

    def mask(self, mask: np.ndarray) -> torch.Tensor:
        """One HxW bool mask -> HxW bool tensor in the model's input geometry."""
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
        return self.geometry(m, is_mask=True)[0] > 0.5

    def batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.stack([self(im) for im in images])


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W] normalised ([B, 6, H, W] with depth: + x, y, z)
    labels: torch.Tensor  # [B] int64 (0 good, 1 anomalous, -1 unknown)
    masks: torch.Tensor | None  # [B, H, W] bool, or None when not requested
    indices: torch.Tensor  # [B] positions in the ImageSet


class ImageSet(torch.utils.data.Dataset):
    """Samples + the preprocessing a model uses: what `Detector.fit` receives.

    Decoded, preprocessed images are cached in memory as float16 when `cache` is on (the
    default for sets under ~1 GB), because multi-epoch methods would otherwise decode every
    file on every epoch. With ``preprocess.depth`` an image is [6, H, W] (colour, then the
    point map) and its point map is cached in float32: float16 would round a depth of 0.3 m
    to 0.24 mm steps, the size of the dents a 3D method looks for.
    """

    def __init__(self, samples: Sequence[Sample], preprocess: Preprocess, *, cache: bool | None = None):
        self.samples = list(samples)
        self.preprocess = preprocess
        h, w = preprocess.output_size
        est_bytes = len(self.samples) * (3 * 2 + (3 * 4 if preprocess.depth else 0)) * h * w
        self.cache_enabled = cache if cache is not None else est_bytes < 1_000_000_000
        self._cache: dict[int, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}
        self.channel_kinds: set[int] = set()  # kinds of the images read so far (1 gray, 3 colour)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([s.label for s in self.samples], dtype=torch.long)

    def image(self, index: int) -> torch.Tensor:
        if index in self._cache:
            cached = self._cache[index]
            return cached.float() if isinstance(cached, torch.Tensor) else torch.cat([cached[0].float(), cached[1]])
        sample = self.samples[index]
        image = sample.load_image()
        try:
            self.channel_kinds.add(self.preprocess.check_channels(image, sample.path))
            x = self.preprocess(image)
            if self.preprocess.depth:
                from iadkit.data.point_maps import point_map_of

                xyz = self.preprocess.point_map(point_map_of(sample, shape=image.shape[:2]))
        except ImageReadError as exc:
            text = str(exc)
            raise ImageReadError(text if text.startswith(f"{sample.path}:") else f"{sample.path}: {text}") from None
        if self.preprocess.depth:
            if self.cache_enabled:
                self._cache[index] = (x.half(), xyz)
            return torch.cat([x, xyz])
        if self.cache_enabled:
            self._cache[index] = x.half()
        return x

    def mask(self, index: int) -> torch.Tensor:
        """The sample's mask in model geometry; all-False for good images without a mask file.

        Raises a clear error for an anomalous image without a mask, because pixel metrics
        would silently be wrong otherwise.
        """
        s = self.samples[index]
        if not s.has_mask:
            if s.label == ANOMALOUS:
                raise MetricUndefinedError(
                    f"{s.path}: anomalous image has no ground-truth mask; pixel metrics need one "
                    "(add the mask, or evaluate with pixel_metrics=False)"
                )
            return torch.zeros(self.preprocess.output_size, dtype=torch.bool)
        from iadkit.data.io import image_shape

        shape = s.image.shape[:2] if s.image is not None else image_shape(s.path)
        mask = s.load_mask(shape=shape)
        assert mask is not None  # the sample has a mask (checked above)
        return self.preprocess.mask(mask)

    def has_all_masks(self) -> bool:
        return all(s.label == 0 or s.has_mask for s in self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.image(index), "label": self.samples[index].label, "index": index}

    def batches(
        self,
        batch_size: int = 16,
        *,
        shuffle: bool = False,
        seed: int = 0,
        with_masks: bool = False,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        order = np.arange(len(self))
        if shuffle:
            order = np.random.default_rng(seed).permutation(len(self))
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) == 0:
                break
            images = torch.stack([self.image(int(i)) for i in idx])
            labels = torch.tensor([self.samples[int(i)].label for i in idx], dtype=torch.long)
            masks = torch.stack([self.mask(int(i)) for i in idx]) if with_masks else None
            yield Batch(images=images, labels=labels, masks=masks, indices=torch.as_tensor(idx))

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)
