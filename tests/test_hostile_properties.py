"""Property-based tests (Hypothesis) of the two readers that take files from outside (issue 14).

Whatever bytes arrive, the image decoder (`read_image`, `read_image_bytes`) and the model-file
reader (`read_manifest`, `load_model`) either succeed with a result that keeps their contract
or raise an `IadkitError` subclass naming the file. Never another exception, a hang or a
crash. Inputs: random bytes, random headers of every supported format (PNG IHDR fields,
JPEG markers, TIFF IFDs, BMP and GIF headers) followed by random bytes, valid small images
with bytes flipped or cut off, and model files with bytes flipped, cut off or a forged header.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

import _dummy  # noqa: F401  (registers test_pixel_zscore)
from iadkit.data.io import read_image, read_image_bytes
from iadkit.errors import ImageReadError, ModelFileError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def check_decoded(arr: np.ndarray) -> None:
    """read_image's contract: HxWxC, C in {1, 3}, uint8 or uint16, at least one pixel."""
    assert arr.ndim == 3 and arr.shape[2] in (1, 3) and arr.shape[0] > 0 and arr.shape[1] > 0
    assert arr.dtype in (np.uint8, np.uint16)


def decode(data: bytes, name: str = "upload.bin") -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            arr = read_image_bytes(data, name, max_pixels=4_000_000)
        except ImageReadError as exc:
            assert name in str(exc)
            return
    check_decoded(arr)


# -- valid small images to mutate -------------------------------------------------------------------
def _encode(fmt: str, mode: str) -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (9, 7, 3) if mode == "RGB" else (9, 7), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format=fmt)
    return buf.getvalue()


VALID = {
    f"{fmt}-{mode}": _encode(fmt, mode)
    for fmt in ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP")
    for mode in ("L", "RGB")
}


def _chunk(kind: bytes, body: bytes, good_crc: bool) -> bytes:
    crc = zlib.crc32(kind + body) if good_crc else zlib.crc32(body) ^ 0xDEAD
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc & 0xFFFFFFFF)


@st.composite
def png_headers(draw) -> bytes:
    ihdr = struct.pack(
        ">IIBBBBB",
        draw(st.sampled_from([0, 1, 7, 65535, 2**31 - 1, 2**32 - 1]) | st.integers(0, 2**32 - 1)),
        draw(st.sampled_from([0, 1, 9, 65535, 2**31 - 1]) | st.integers(0, 2**32 - 1)),
        draw(st.sampled_from([1, 2, 4, 8, 16, 3, 0, 255])),
        draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7])),
        draw(st.integers(0, 2)),
        draw(st.integers(0, 2)),
        draw(st.integers(0, 2)),
    )
    body = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr, draw(st.booleans()))
    if draw(st.booleans()):
        raw = draw(st.binary(max_size=300))
        body += _chunk(b"IDAT", zlib.compress(raw) if draw(st.booleans()) else raw, draw(st.booleans()))
    if draw(st.booleans()):
        body += _chunk(b"IEND", b"", True)
    return body + draw(st.binary(max_size=100))


@st.composite
def jpeg_headers(draw) -> bytes:
    parts = [b"\xff\xd8"]
    for _ in range(draw(st.integers(0, 5))):
        marker = draw(st.sampled_from([0xC0, 0xC2, 0xC4, 0xDB, 0xDA, 0xE0, 0xE1, 0xFE, 0xDD])) | 0
        payload = draw(st.binary(max_size=60))
        if marker == 0xC0 and draw(st.booleans()):  # a frame header with random sizes
            payload = struct.pack(
                ">BHHB", 8, draw(st.integers(0, 65535)), draw(st.integers(0, 65535)), draw(st.integers(0, 4))
            )
            payload += draw(st.binary(max_size=12))
        if marker == 0xE1 and draw(st.booleans()):  # EXIF with a random orientation
            payload = (
                b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01"
                + struct.pack(">H", draw(st.integers(0, 12)))
                + b"\x00\x00\x00\x00\x00\x00"
            )
        parts.append(bytes([0xFF, marker]) + struct.pack(">H", min(len(payload) + 2, 65535)) + payload)
    parts.append(draw(st.binary(max_size=200)))
    if draw(st.booleans()):
        parts.append(b"\xff\xd9")
    return b"".join(parts)


@st.composite
def tiff_headers(draw) -> bytes:
    order = draw(st.sampled_from(["<", ">"]))
    magic = b"II*\x00" if order == "<" else b"MM\x00*"
    entries = []
    for tag in draw(
        st.lists(st.sampled_from([256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 339]), max_size=10)
    ):
        typ = draw(st.sampled_from([3, 4]))
        entries.append(struct.pack(order + "HHII", tag, typ, draw(st.integers(0, 4)), draw(st.integers(0, 2**32 - 1))))
    ifd = struct.pack(order + "H", len(entries)) + b"".join(entries) + struct.pack(order + "I", 0)
    offset = draw(st.sampled_from([8, 0, 3, 2**32 - 1]))
    return magic + struct.pack(order + "I", offset) + ifd + draw(st.binary(max_size=200))


@st.composite
def bmp_headers(draw) -> bytes:
    width = draw(st.integers(-(2**31), 2**31 - 1))
    height = draw(st.integers(-(2**31), 2**31 - 1))
    bpp = draw(st.sampled_from([1, 4, 8, 16, 24, 32, 0, 7]))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bpp, draw(st.integers(0, 6)), 0, 0, 0, 0, 0)
    head = b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 14 + 40)
    return head + info + draw(st.binary(max_size=200))


@st.composite
def gif_headers(draw) -> bytes:
    return (
        b"GIF89a"
        + struct.pack(
            "<HHBBB", draw(st.integers(0, 65535)), draw(st.integers(0, 65535)), draw(st.integers(0, 255)), 0, 0
        )
        + draw(st.binary(max_size=200))
    )


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


# -- the decoder ------------------------------------------------------------------------------------
@SETTINGS
@given(st.binary(max_size=2048))
def test_decoder_random_bytes(data: bytes) -> None:
    decode(data)


@SETTINGS
@given(st.one_of(png_headers(), jpeg_headers(), tiff_headers(), bmp_headers(), gif_headers()))
def test_decoder_random_headers(data: bytes) -> None:
    decode(data, "header.img")


@SETTINGS
@given(mutated_images())
def test_decoder_damaged_images(data: bytes) -> None:
    decode(data, "damaged.img")


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.one_of(st.binary(max_size=512), png_headers(), mutated_images()),
    st.sampled_from([".png", ".jpg", ".tif", ".bmp", ""]),
)
def test_decoder_files(data: bytes, suffix: str) -> None:
    """read_image on a file: the same rules as for bytes, the file named in the error."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / f"input{suffix}"
        path.write_bytes(data)
        try:
            arr = read_image(path, max_pixels=4_000_000)
        except ImageReadError as exc:
            assert "input" in str(exc)
            return
        check_decoded(arr)


def test_the_valid_images_decode() -> None:
    """The mutation seeds are valid: each decodes (so mutations start from real files)."""
    for name, data in VALID.items():
        arr = read_image_bytes(data, name)
        check_decoded(arr)
        assert arr.shape[:2] == (9, 7)


# -- the model-file reader --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    from iadkit.model import Model
    from iadkit.types import Sample

    rng = np.random.default_rng(0)
    train = [Sample(path=f"mem://{i}", image=(100 + rng.normal(0, 3, (8, 8))).astype(np.uint8)) for i in range(4)]
    model = Model.create("test_pixel_zscore", image_size=8).fit(train, calibration_fraction=0, progress=False)
    return model.save(tmp_path_factory.mktemp("model") / "m.iad").read_bytes()


def load(data: bytes) -> None:
    from iadkit.store import load_model, read_manifest

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.iad"
        path.write_bytes(data)
        for reader in (read_manifest, load_model):
            try:
                reader(path)
            except ModelFileError as exc:
                assert str(path) in str(exc)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.binary(max_size=1024))
def test_model_reader_random_bytes(data: bytes) -> None:
    load(data)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.integers(0, 2**64 - 1),
    st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda d: json.dumps(d).encode(),
            st.dictionaries(st.text(max_size=8), st.text(max_size=8) | st.integers(), max_size=4),
        ),
    ),
)
def test_model_reader_forged_headers(length: int, header: bytes) -> None:
    """A header length that lies, and headers of random bytes or random JSON."""
    load(length.to_bytes(8, "little") + header)
    load(len(header).to_bytes(8, "little") + header)


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_model_reader_damaged_files(model_bytes: bytes, data) -> None:
    raw = bytearray(model_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    assume(bytes(raw) != model_bytes)
    load(bytes(raw))
