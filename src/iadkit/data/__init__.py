"""Images in: robust decoding (io), dataset layouts, ELPV, the synthetic generator, preprocessing.

Typical use::

    from iadkit.data import load_dataset, list_categories
    list_categories("data/mvtec_ad")                   # ['bottle', 'cable', ...]
    split = load_dataset("data/mvtec_ad", "bottle")    # DatasetSplit(train=..., test=...)
    split = load_dataset("elpv", "mono")               # built-in real solar-cell images

The synthetic generator lives in ``iadkit.data.synthetic`` (imported on demand).
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

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ELPV_CATEGORIES",
    "ELPV_LICENSE",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "DatasetSplit",
    "ImageInfo",
    "detect_layout",
    "image_shape",
    "list_categories",
    "load_dataset",
    "load_elpv",
    "register_source",
    "probe_image",
    "read_image",
    "read_mask",
    "write_image_atomic",
]
