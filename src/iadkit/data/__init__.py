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

from iadkit.data.elpv import ELPV_CATEGORIES, ELPV_LICENSE, load_elpv
from iadkit.data.io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageInfo,
    image_shape,
    probe_image,
    read_image,
    read_mask,
    write_image_atomic,
)
from iadkit.data.layouts import (
    LAYOUTS,
    DatasetSplit,
    detect_layout,
    list_categories,
    load_dataset,
    register_source,
)
from iadkit.data.loco import DefectsConfig, LocoSample, read_defects_config
from iadkit.data.point_maps import PointMapSample, read_xyz, remove_background_plane

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
    "register_source",
    "probe_image",
    "read_image",
    "read_defects_config",
    "read_mask",
    "read_xyz",
    "remove_background_plane",
    "write_image_atomic",
]
