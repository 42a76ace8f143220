"""Robust image and mask reading: every pixel that enters iadkit comes through here.

Why a module of its own: industrial images come as 8-bit and 16-bit PNG, JPEG from line
cameras, BMP from old inspection PCs and TIFF from scientific cameras, grayscale as often
as colour. Silent mistakes here (a 16-bit image cut to 8 bits, a truncated file decoded
half-grey, a JPEG mask with blurred edges counted as defect pixels) corrupt every result
downstream, so this module decodes strictly and fails with a message that names the file.

Contract of :func:`read_image`
------------------------------
* Returns an ``HxWxC`` array, ``C`` in {1, 3}, dtype ``uint8`` or ``uint16``.
  16-bit data keeps its precision (``Preprocess`` divides by 65535).
* Grayscale stays 1-channel; it is replicated to 3 channels only at preprocessing.
* Alpha is **dropped, not composited**: RGBA -> RGB, LA -> L, palette -> RGB. Industrial
  exports with an alpha channel are almost always fully opaque; compositing over black
  would instead change any semi-transparent pixel, so the colour values are kept as stored.
* JPEG (and any Pillow-read file carrying EXIF) gets its EXIF orientation applied, so that
  the array matches what an image viewer shows and what a mask drawn in that viewer covers.
* TIFF is read with tifffile (first page only), which keeps 16-bit and planar data intact.
  Float TIFFs are accepted only when every value is finite and within [0, 1]; they are
  converted to ``uint16`` (``round(x * 65535)``), which keeps more precision than any
  camera delivers. Integer TIFFs (e.g. 12-bit data in ``int32``) are accepted when all
  values lie in [0, 65535] and become ``uint16``. The photometric tag is honoured as image
  viewers do: in a MINISWHITE file (e.g. 1-bit TIFFs written from bool arrays) 0 is white.
* 16-bit RGB(A) PNGs are decoded with OpenCV because Pillow reduces them to 8 bits.
* Other formats Pillow can decode (WebP, PNM, first frame of a GIF) are read as well.

Errors: :class:`iadkit.errors.ImageReadError` for a missing file, an empty file, a
truncated file (decoding is forced to completion; Pillow's ``LOAD_TRUNCATED_IMAGES`` is
switched off while decoding), a file that is not an image, an image larger than
``max_pixels`` (decompression-bomb guard, default :data:`DEFAULT_MAX_PIXELS`), an
unsupported sample type, or more than 4 channels.

Masks (:func:`read_mask`) must be lossless and binary: zero is "good", and the file may
hold only one other value (1, 255, 65535, ... all accepted). JPEG masks are refused,
because compression turns a sharp 0/255 edge into many grey values. Datasets whose masks
hold instance labels (0, 1, 2, ...) use ``nonzero=True``.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from iadkit.errors import ImageReadError
from iadkit.files import atomic_target

DEFAULT_MAX_PIXELS = 80_000_000
"""Largest image (height x width) read by default: 80 megapixels, about a 9000 x 9000 frame.

Larger files are far above any inspection camera and are more likely a decompression bomb
or a wrong file; pass ``max_pixels=`` explicitly to read one anyway, or set the environment
variable ``IADKIT_MAX_PIXELS`` (what the command line reads: it changes this default for
every command; ``iadkit serve`` has ``--max-pixels``).
"""

MAX_PIXELS_ENV = "IADKIT_MAX_PIXELS"


def default_max_pixels() -> int:
    """The size guard in force when none is passed: ``IADKIT_MAX_PIXELS`` when set, else
    :data:`DEFAULT_MAX_PIXELS`."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not text:
        return DEFAULT_MAX_PIXELS
    if not text.isdigit() or int(text) < 1:
        from iadkit.errors import InvalidParameterError

        raise InvalidParameterError(
            f"{MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r}: give a positive number of pixels"
        )
    return int(text)


IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
"""File suffixes (lower case) that dataset readers treat as images."""

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True for a visible file whose suffix is one of :data:`IMAGE_EXTENSIONS`."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


@dataclass(frozen=True)
class ImageInfo:
    """What the file header says, without decoding pixels (see :func:`probe_image`)."""

    height: int
    width: int
    channels: int  # channels read_image will return (1 or 3)
    dtype: str  # dtype read_image will return: "uint8" or "uint16"
    format: str  # "PNG", "JPEG", "BMP", "TIFF", ...

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _fail(path: Path | str, problem: str) -> ImageReadError:
    return ImageReadError(f"{path}: {problem}")


def _check_file(path: Path) -> bytes:
    """Existence and non-emptiness; returns the first 32 bytes (to sniff the format)."""
    if not path.exists():
        raise _fail(path, "file not found. Check the path (relative paths are resolved from the current folder).")
    if path.is_dir():
        raise _fail(path, "is a folder, not an image file.")
    try:
        size = path.stat().st_size
        if size == 0:
            raise _fail(
                path, "file is empty (0 bytes); the copy or download was probably interrupted. Replace the file."
            )
        with open(path, "rb") as fh:
            return fh.read(32)
    except PermissionError:
        raise _fail(path, "permission denied; make the file readable.") from None


def _is_tiff(head: bytes) -> bool:
    return head[:4] in _TIFF_MAGIC


def _check_pixels(path: Path, height: int, width: int, max_pixels: int | None) -> None:
    if max_pixels == DEFAULT_MAX_PIXELS:
        max_pixels = default_max_pixels()
    if max_pixels is not None and height * width > max_pixels:
        raise _fail(
            path,
            f"image is {width}x{height} = {height * width:,} pixels, above the limit of {max_pixels:,} "
            "(guard against decompression bombs). If the file is genuine, raise the limit: max_pixels= in Python, "
            f"the environment variable {MAX_PIXELS_ENV}=N for the iadkit commands, --max-pixels for `iadkit serve`.",
        )


@contextlib.contextmanager
def _strict_pillow() -> Iterator[None]:
    """Force complete decoding (no silently grey-filled truncated files)."""
    from PIL import Image, ImageFile

    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # our own max_pixels check replaces Pillow's warning; its hard error (2x its
            # limit) still fires and is turned into an ImageReadError by the caller
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _png_ihdr(head: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG header, or None if not a PNG."""
    if head[:8] != _PNG_MAGIC or head[12:16] != b"IHDR" or len(head) < 26:
        return None
    width = int.from_bytes(head[16:20], "big")
    height = int.from_bytes(head[20:24], "big")
    return width, height, head[24], head[25]


def _integer_to_uint16(path: Path, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint16:
        return arr
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise _fail(
            path,
            f"integer image ({arr.dtype}) has values in [{arr.min()}, {arr.max()}], outside 0..65535; "
            "iadkit reads 8- and 16-bit images. Rescale it to 16 bits and save again.",
        )
    return arr.astype(np.uint16)


def _float_to_uint16(path: Path, arr: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(arr)):
        raise _fail(path, "float image contains NaN or infinite values; iadkit accepts float images only in [0, 1].")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < 0.0 or hi > 1.0:
        raise _fail(
            path,
            f"float image has values in [{lo:.4g}, {hi:.4g}]; iadkit accepts float images only in [0, 1] "
            "(they are stored as 16-bit). Normalise it or save it as a 16-bit integer image.",
        )
    return np.round(arr.astype(np.float64) * 65535.0).astype(np.uint16)


def _to_sample_type(path: Path, arr: np.ndarray) -> np.ndarray:
    """Any decoded array -> uint8 or uint16 (bool becomes 0/255)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype.kind in "ui":
        return _integer_to_uint16(path, arr)
    if arr.dtype.kind == "f":
        return _float_to_uint16(path, arr)
    raise _fail(path, f"unsupported sample type {arr.dtype}; use 8- or 16-bit integers (or float in [0, 1] for TIFF).")


def _channels_last(path: Path, arr: np.ndarray, *, gray_alpha: bool = False) -> np.ndarray:
    """HxW / HxWxC array -> HxWx{1,3}: alpha dropped, >4 channels refused."""
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim != 3:
        raise _fail(path, f"expected a 2-D image, got an array of shape {arr.shape} (a stack or volume?).")
    c = arr.shape[2]
    if c == 1:
        return arr
    if c == 2 or gray_alpha:  # gray + alpha
        return arr[:, :, :1]
    if c == 3:
        return arr
    if c == 4:  # RGB + alpha: alpha dropped (see module docstring)
        return arr[:, :, :3]
    raise _fail(path, f"image has {c} channels; iadkit reads 1 (gray), 3 (RGB) or 4 (RGBA) channels.")


# --------------------------------------------------------------------------------------
# decoders
# --------------------------------------------------------------------------------------
def _decode_tiff(path: Path, max_pixels: int | None, data: bytes | None = None) -> np.ndarray | None:
    """TIFF via tifffile; None when the photometric interpretation is better left to Pillow."""
    import tifffile

    try:
        with tifffile.TiffFile(path if data is None else io.BytesIO(data)) as tif:
            if not tif.pages:
                raise _fail(path, "TIFF file has no pages.")
            page = cast("tifffile.TiffPage", tif.pages[0])  # the first page is always a full TiffPage
            _check_pixels(path, int(page.imagelength), int(page.imagewidth), max_pixels)
            photometric = int(page.photometric)
            # 0 MINISWHITE, 1 MINISBLACK, 2 RGB, 3 PALETTE; others (CMYK, YCbCr, Lab): Pillow
            if photometric not in (0, 1, 2, 3):
                return None
            arr = page.asarray()
            axes = page.axes
            colormap = page.colormap if photometric == 3 else None
    except ImageReadError:
        raise
    except Exception as exc:  # truncated strips, bad compression, corrupt IFD, ...
        raise _fail(
            path, f"cannot decode TIFF ({type(exc).__name__}: {exc}); the file is truncated or corrupt."
        ) from None

    if "S" in axes and arr.ndim == len(axes):
        arr = np.moveaxis(arr, axes.index("S"), -1)  # planar (SYX) -> YXS
    if photometric == 3 and colormap is not None:  # palette -> RGB
        rgb = np.asarray(colormap)[:, arr.reshape(arr.shape[0], arr.shape[1])].transpose(1, 2, 0)
        arr = (rgb // 257).astype(np.uint8) if np.all(rgb % 257 == 0) else rgb.astype(np.uint16)
    arr = _to_sample_type(path, arr)
    if photometric == 0 and (arr.ndim == 2 or arr.shape[-1] == 1):
        arr = np.iinfo(arr.dtype).max - arr  # MINISWHITE: 0 means white
    return _channels_last(path, arr)


def _decode_png16_color(path: Path, data: bytes | None = None) -> np.ndarray:
    """16-bit RGB / RGBA / gray+alpha PNG via OpenCV (Pillow would cut it to 8 bits)."""
    import cv2

    if data is None:
        arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    else:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise _fail(path, "cannot decode 16-bit PNG; the file is truncated or corrupt.")
    if arr.ndim == 3 and arr.shape[2] >= 3:
        arr = arr[:, :, [2, 1, 0] + ([3] if arr.shape[2] == 4 else [])]  # BGR(A) -> RGB(A)
    return arr


def _decode_pillow(path: Path, max_pixels: int | None, data: bytes | None = None) -> tuple[np.ndarray, bool]:
    """Pillow decode; returns (array, is_gray_alpha)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with _strict_pillow(), Image.open(path if data is None else io.BytesIO(data)) as im:
            _check_pixels(path, im.height, im.width, max_pixels)
            im.load()  # full decode now: truncation raises here, not later
            img = ImageOps.exif_transpose(im)
            mode = img.mode
            gray_alpha = False
            if mode == "1":
                img = img.convert("L")
            elif mode in ("P", "PA"):
                img = img.convert("RGBA" if ("transparency" in img.info or mode == "PA") else "RGB")
            elif mode in ("LA", "La"):
                gray_alpha = True
            elif mode in ("RGBa",):
                img = img.convert("RGBA")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
            arr = np.asarray(img)
            if mode.startswith("I;16"):
                arr = arr.astype(np.uint16)  # big-endian variants -> native byte order
            return arr, gray_alpha
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise _fail(path, "not an image, or a format Pillow cannot read (expected PNG, JPEG, BMP or TIFF).") from None
    except Image.DecompressionBombError as exc:
        raise _fail(path, f"rejected as a possible decompression bomb by Pillow's hard limit ({exc}).") from None
    except OSError as exc:
        raise _fail(path, f"cannot decode image ({exc}); the file is truncated or corrupt. Replace it.") from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise _fail(path, f"cannot decode image ({type(exc).__name__}: {exc}); the file is corrupt.") from None


def _decode(path: Path, max_pixels: int | None, data: bytes | None = None) -> tuple[np.ndarray, str]:
    """Decoded array (any dtype, HxW or HxWxC) and the format name.

    With `data`, the image is decoded from those bytes and `path` only names it in errors.
    """
    if data is None:
        head = _check_file(path)
    elif not data:
        raise _fail(path, "file is empty (0 bytes); the upload or copy was probably interrupted. Send the file again.")
    else:
        head = data[:32]
    if _is_tiff(head):
        arr = _decode_tiff(path, max_pixels, data)
        if arr is not None:
            return arr, "TIFF"
    ihdr = _png_ihdr(head)
    if ihdr is not None and ihdr[2] == 16 and ihdr[3] in (2, 4, 6):
        _check_pixels(path, ihdr[1], ihdr[0], max_pixels)
        arr = _decode_png16_color(path, data)
        return _channels_last(path, _to_sample_type(path, arr), gray_alpha=ihdr[3] == 4), "PNG"
    arr, gray_alpha = _decode_pillow(path, max_pixels, data)
    fmt = "JPEG" if head[:3] == _JPEG_MAGIC else ("PNG" if ihdr is not None else _sniff_name(head))
    return _channels_last(path, _to_sample_type(path, arr), gray_alpha=gray_alpha), fmt


def _sniff_name(head: bytes) -> str:
    if head[:2] == b"BM":
        return "BMP"
    if _is_tiff(head):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return "other"


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def read_image(path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to an ``HxWxC`` array (C in {1, 3}; uint8 or uint16).

    See the module docstring for the exact rules (alpha dropped, 16-bit kept, EXIF
    orientation applied, floats in [0, 1] -> uint16). Raises ImageReadError naming the
    file and the problem. ``max_pixels=None`` disables our size guard (Pillow's own hard
    limit of about 179 megapixels still applies to the formats it decodes); the default
    is :func:`default_max_pixels` (``IADKIT_MAX_PIXELS`` when set).
    """
    p = Path(path)
    arr, _ = _decode(p, max_pixels)
    return np.ascontiguousarray(arr)


def read_image_bytes(data: bytes, name: str, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image held in memory (e.g. an upload) exactly as :func:`read_image` decodes a file.

    Parameters
    ----------
    data
        The encoded file's bytes (PNG, JPEG, BMP, TIFF, ...).
    name
        What to call the image in error messages (e.g. the uploaded file's name). It is
        never opened: nothing touches the disk.
    max_pixels
        Decompression-bomb guard, as in :func:`read_image`.
    """
    arr, _ = _decode(Path(name), max_pixels, bytes(data))
    return np.ascontiguousarray(arr)


def read_mask(
    path: str | os.PathLike[str],
    expected_shape: tuple[int, int] | None = None,
    *,
    nonzero: bool = False,
    image_path: str | os.PathLike[str] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read a ground-truth mask as an ``HxW`` bool array (True = defective pixel).

    A mask must be lossless (PNG, BMP, TIFF; JPEG is refused) and binary: zero plus at most
    one other value, so 0/1, 0/255 and 0/65535 masks all work. A file with more values is
    refused because it usually means a JPEG-compressed or anti-aliased mask, where a
    threshold would silently move the defect's border. With ``nonzero=True`` every nonzero
    value counts as defect, for instance-label masks (VisA stores 0, 1, 2, ...).

    A colour mask is accepted when its channels are identical (with ``nonzero=True``, a
    pixel is defective when any channel is nonzero). ``expected_shape`` (H, W) is the size
    of the image the mask belongs to; a different size is an error that names both sizes
    (and the image file when ``image_path`` is given).
    """
    p = Path(path)
    head = _check_file(p)
    if head[:3] == _JPEG_MAGIC:
        raise _fail(
            p,
            "masks must be lossless (PNG, BMP or TIFF); this is a JPEG, whose compression blurs a binary "
            "0/255 mask into many grey values. Export the mask as PNG.",
        )
    arr, _ = _decode(p, max_pixels)
    if arr.shape[2] == 3:
        if nonzero:
            mask_values = arr.max(axis=2)
        elif np.array_equal(arr[:, :, 0], arr[:, :, 1]) and np.array_equal(arr[:, :, 0], arr[:, :, 2]):
            mask_values = arr[:, :, 0]
        else:
            raise _fail(
                p,
                "colour mask with differing channels; a mask must be grayscale, 0 = good and one value "
                "(e.g. 255) = defect. Save it as a single-channel PNG.",
            )
    else:
        mask_values = arr[:, :, 0]
    if not nonzero:
        values = np.unique(mask_values)
        positive = values[values != 0]
        if len(positive) > 1:
            shown = ", ".join(str(int(v)) for v in values[:8]) + (", ..." if len(values) > 8 else "")
            raise _fail(
                p,
                f"mask is not binary: it holds {len(values)} distinct values ({shown}). A mask must hold 0 "
                "(good) and one other value (1 or 255) for defective pixels. Re-export it as a binary PNG "
                "(a JPEG-compressed or anti-aliased mask is the usual cause).",
            )
    mask = mask_values != 0
    if expected_shape is not None and tuple(mask.shape) != tuple(expected_shape):
        image_txt = f"its image {image_path}" if image_path is not None else "its image"
        raise _fail(
            p,
            f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but {image_txt} is "
            f"{expected_shape[1]}x{expected_shape[0]}; a mask must have exactly the size of its image. "
            "Check that the mask belongs to this image (file names) and was not resized.",
        )
    return mask


def probe_image(path: str | os.PathLike[str]) -> ImageInfo:
    """Size, channels and sample type from the file header only (cheap: no pixel decoding).

    The size is the one :func:`read_image` returns, i.e. after EXIF orientation. Raises
    ImageReadError for missing, empty or unidentifiable files (not for truncated pixel
    data, which only a full decode finds).
    """
    p = Path(path)
    head = _check_file(p)
    if _is_tiff(head):
        import tifffile

        try:
            with tifffile.TiffFile(p) as tif:
                page = cast("tifffile.TiffPage", tif.pages[0])  # the first page is always a full TiffPage
                h, w = int(page.imagelength), int(page.imagewidth)
                spp = int(page.samplesperpixel)
                photometric = int(page.photometric)
                dtype = np.dtype(page.dtype) if page.dtype is not None else np.dtype(np.uint8)
        except Exception as exc:
            raise _fail(p, f"cannot read TIFF header ({type(exc).__name__}: {exc}).") from None
        channels = 3 if (photometric == 3 or spp >= 3) else 1
        # what read_image returns: bool -> 0/255 uint8; float in [0, 1] and wider integers -> uint16
        out_dtype = "uint8" if dtype in (np.uint8, np.bool_) else "uint16"
        return ImageInfo(h, w, channels, out_dtype, "TIFF")

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                mode = im.mode
                fmt = im.format or _sniff_name(head)
                try:
                    orientation = im.getexif().get(0x0112, 1)
                except Exception:
                    orientation = 1
    except UnidentifiedImageError:
        raise _fail(p, "not an image, or a format Pillow cannot read (expected PNG, JPEG, BMP or TIFF).") from None
    except Image.DecompressionBombError as exc:
        raise _fail(p, f"rejected as a possible decompression bomb by Pillow's hard limit ({exc}).") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise _fail(p, f"cannot read image header ({exc}).") from None
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: read_image swaps the sides
        h, w = w, h
    ihdr = _png_ihdr(head)
    if ihdr is not None and ihdr[2] == 16:
        channels = 1 if ihdr[3] in (0, 4) else 3
        return ImageInfo(h, w, channels, "uint16", "PNG")
    channels = 1 if mode in ("1", "L", "LA", "La", "I", "F") or mode.startswith("I;16") else 3
    out_dtype = "uint16" if (mode in ("I", "F") or mode.startswith("I;16")) else "uint8"
    return ImageInfo(h, w, channels, out_dtype, fmt)


def image_shape(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(H, W) of the image :func:`read_image` would return, read from the header only."""
    return probe_image(path).shape


def write_image_atomic(path: str | os.PathLike[str], array: np.ndarray, *, quality: int = 95) -> Path:
    """Write an image so that readers never see a half-written file.

    The data go to a temporary file in the same folder, then ``os.replace`` renames it over
    ``path`` (atomic on POSIX and Windows). The format follows the suffix: ``.png``
    (uint8/uint16, 1/3/4 channels), ``.tif``/``.tiff`` (anything tifffile writes),
    ``.jpg``/``.jpeg``/``.bmp`` (uint8 only). Bool arrays (masks) are written as 0/255.
    Creates the parent folder. Returns the path.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * np.uint8(255)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"write_image_atomic: expected HxW or HxWx{{1,3,4}}, got shape {arr.shape}")
    if suffix not in (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"):
        raise ValueError(f"write_image_atomic: unsupported suffix {p.suffix!r} for {p}; use .png, .tif, .jpg or .bmp")
    if suffix in (".jpg", ".jpeg", ".bmp") and arr.dtype != np.uint8:
        raise ValueError(f"write_image_atomic: {suffix} holds 8-bit data only, got {arr.dtype}; use .png or .tif")
    if suffix == ".png" and arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"write_image_atomic: PNG holds uint8 or uint16, got {arr.dtype}; use .tif")
    with atomic_target(p) as tmp:
        tmp_name = str(tmp)
        if suffix in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp_name, np.ascontiguousarray(arr), photometric="rgb" if arr.ndim == 3 else "minisblack")
        elif suffix == ".png" and arr.dtype == np.uint16 and arr.ndim == 3:
            import cv2

            bgr = arr[:, :, [2, 1, 0] + ([3] if arr.shape[2] == 4 else [])]
            if not cv2.imwrite(tmp_name, np.ascontiguousarray(bgr)):
                raise OSError(f"OpenCV could not write {tmp_name}")
        else:
            from PIL import Image

            im = Image.fromarray(np.ascontiguousarray(arr))
            fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}[suffix]
            im.save(tmp_name, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return p
