"""Images in: robust decoding (io), dataset layouts, ELPV, the synthetic generator, preprocessing.

Typical use::

    from iadkit.data import load_dataset, list_categories
    list_categories("data/mvtec_ad")                   # ['bottle', 'cable', ...]
    split = load_dataset("data/mvtec_ad", "bottle")    # DatasetSplit(train=..., test=...)
    split = load_dataset("elpv", "mono")               # built-in real solar-cell images

MVTec LOCO test samples read their per-defect regions for sPRO (``LocoSample``), MVTec
3D-AD samples their point maps (``PointMapSample.load_xyz``). The synthetic generator lives
in ``iadkit.data.synthetic`` (imported on demand).
"""

from importlib import import_module
from typing import Any

# Names are imported on first use: `iadkit.data.io` (the image reader) is torch-free, and the
# exported-model runtime (`iadkit.runtime`) reads images through it without pulling in torch,
# which the dataset readers and the preprocessing import.
_LAZY = {
    "DEFAULT_MAX_PIXELS": "iadkit.data.io",
    "IMAGE_EXTENSIONS": "iadkit.data.io",
    "ImageInfo": "iadkit.data.io",
    "image_shape": "iadkit.data.io",
    "probe_image": "iadkit.data.io",
    "read_image": "iadkit.data.io",
    "read_mask": "iadkit.data.io",
    "write_image_atomic": "iadkit.data.io",
    "ELPV_CATEGORIES": "iadkit.data.elpv",
    "ELPV_LICENSE": "iadkit.data.elpv",
    "load_elpv": "iadkit.data.elpv",
    "LAYOUTS": "iadkit.data.layouts",
    "DatasetSplit": "iadkit.data.layouts",
    "detect_layout": "iadkit.data.layouts",
    "list_categories": "iadkit.data.layouts",
    "load_dataset": "iadkit.data.layouts",
    "register_source": "iadkit.data.layouts",
    "DefectsConfig": "iadkit.data.loco",
    "LocoSample": "iadkit.data.loco",
    "read_defects_config": "iadkit.data.loco",
    "PointMapSample": "iadkit.data.point_maps",
    "read_xyz": "iadkit.data.point_maps",
    "remove_background_plane": "iadkit.data.point_maps",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'iadkit.data' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ELPV_CATEGORIES",
    "ELPV_LICENSE",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "DatasetSplit",
    "DefectsConfig",
    "ImageInfo",
    "LocoSample",
    "PointMapSample",
    "detect_layout",
    "image_shape",
    "list_categories",
    "load_dataset",
    "load_elpv",
    "probe_image",
    "read_defects_config",
    "read_image",
    "read_mask",
    "read_xyz",
    "register_source",
    "remove_background_plane",
    "write_image_atomic",
]
