"""Tests for histoxplain_model.imageio: formats, conversions and every bad-input error."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from histoxplain_model.errors import ImageDecodeError, ImageTooLargeError, InvalidRequest
from histoxplain_model.imageio import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_REQUEST_PIXELS,
    MAX_PIXELS_ENV,
    MAX_REQUEST_PIXELS_ENV,
    decode_image,
    read_image,
)

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_bomb(width: int, height: int) -> bytes:
    """A PNG header claiming width x height RGB pixels followed by a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_lossless_rgb_round_trip(fmt: str) -> None:
    decoded = decode_image(_encode(Image.fromarray(RGB), fmt), DEFAULT_MAX_PIXELS)
    assert decoded.dtype == np.uint8 and decoded.shape == RGB.shape
    np.testing.assert_array_equal(decoded, RGB)


def test_jpeg_decodes_close_to_source() -> None:
    smooth = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], 48, axis=0).repeat(3, axis=2)
    decoded = decode_image(_encode(Image.fromarray(smooth), "JPEG", quality=95))
    assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - smooth.astype(int)).mean() < 3


def test_greyscale_and_palette_become_rgb() -> None:
    grey = RGB[..., 0]
    decoded = decode_image(_encode(Image.fromarray(grey, mode="L"), "PNG"))
    np.testing.assert_array_equal(decoded, np.repeat(grey[..., None], 3, axis=2))
    palette = Image.fromarray(RGB).quantize(colors=16)
    decoded = decode_image(_encode(palette, "PNG"))
    np.testing.assert_array_equal(decoded, np.asarray(palette.convert("RGB")))


def test_sixteen_bit_greyscale_png_scales_to_eight_bit() -> None:
    values = RNG.integers(0, 256, size=(20, 30)).astype(np.uint16)
    image = Image.fromarray(values * 257)  # full 16-bit range
    assert image.mode.startswith("I")
    decoded = decode_image(_encode(image, "PNG"))
    np.testing.assert_array_equal(decoded, np.repeat(values.astype(np.uint8)[..., None], 3, axis=2))


def test_rgba_is_composited_on_white() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # opaque red-ish
    rgba[0, 1, 3] = 0  # fully transparent -> white
    rgba[0, 2, 3] = 128
    decoded = decode_image(_encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    assert decoded[0, 0].tolist() == [200, 0, 0]
    assert decoded[0, 1].tolist() == [255, 255, 255]
    assert decoded[0, 2].tolist() == [round(200 * 128 / 255 + 255 * 127 / 255), 127, 127]


def test_tifffile_fallback_for_tiffs_pillow_cannot_read() -> None:
    values = RNG.random((8, 8, 3)).astype(np.float32)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, values, photometric="rgb")
    data = buffer.getvalue()
    with pytest.raises(OSError):  # precondition: Pillow alone cannot read float RGB TIFFs
        Image.open(io.BytesIO(data))
    decoded = decode_image(data)
    np.testing.assert_array_equal(decoded, np.rint(values.astype(np.float64) * 255).astype(np.uint8))


@pytest.mark.parametrize("planarconfig", ["separate", "contig"])
def test_sixteen_bit_rgb_tiff(planarconfig: str) -> None:
    # Pillow 13 decodes these wrongly (planar: samples mixed up; contig: high byte only).
    samples = RNG.integers(0, 256, size=(3, 16, 24)).astype(np.uint16) * 257
    samples[0, 0, 0] = 65535 - 128  # rounds up, where taking the high byte would not
    buffer = io.BytesIO()
    on_disk = samples if planarconfig == "separate" else np.moveaxis(samples, 0, -1)
    tifffile.imwrite(buffer, on_disk, photometric="rgb", planarconfig=planarconfig)
    decoded = decode_image(buffer.getvalue())
    expected = np.rint(np.moveaxis(samples, 0, -1) / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(decoded, expected)


def test_empty() -> None:
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_truncated(fmt: str) -> None:
    data = _encode(Image.fromarray(RGB), fmt)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data[: len(data) // 2])
    message = str(caught.value)
    assert "truncated" in message or "not a readable" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"GIF89a" + b"\x00" * 32, "unsupported image format GIF"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "unsupported image format WebP"),
        (b"%PDF-1.7\n", "unsupported image format PDF"),
        (b"hello, this is not an image", "not a recognised image"),
    ],
)
def test_unsupported_or_unknown_formats(data: bytes, needle: str) -> None:
    with pytest.raises(ImageDecodeError, match=needle) as caught:
        decode_image(data)
    assert "PNG, JPEG or TIFF" in str(caught.value)


def test_real_gif_is_unsupported() -> None:
    with pytest.raises(ImageDecodeError, match="GIF"):
        decode_image(_encode(Image.fromarray(RGB), "GIF"))


def test_decompression_bomb_is_refused_from_the_header() -> None:
    data = _png_bomb(100_000, 100_000)  # 10^10 pixels claimed in 100 bytes
    with pytest.raises(ImageTooLargeError) as caught:
        decode_image(data, DEFAULT_MAX_PIXELS)
    message = str(caught.value)
    assert "100000x100000" in message and MAX_PIXELS_ENV in message
    assert isinstance(caught.value, InvalidRequest)


def test_pixel_limit_is_the_callers() -> None:
    data = _encode(Image.fromarray(RGB), "PNG")
    with pytest.raises(ImageTooLargeError, match="53x37"):
        decode_image(data, max_pixels=53 * 37 - 1)
    assert decode_image(data, max_pixels=53 * 37).shape == RGB.shape


def _tiff_bomb(width: int, height: int, bits: int, sample_format: int) -> bytes:
    """A little-endian greyscale TIFF whose header claims width x height pixels, with 16 data bytes."""
    entries = [  # (tag, type 3=SHORT 4=LONG, value)
        (256, 4, width),
        (257, 4, height),
        (258, 3, bits),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 8),
        (277, 3, 1),
        (278, 4, height),
        (279, 4, 16),
        (339, 3, sample_format),
    ]
    ifd_offset = 8 + 16
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", ifd_offset) + b"\x00" * 16 + ifd + struct.pack("<I", 0)


@pytest.mark.parametrize(("bits", "sample_format"), [(8, 1), (32, 3)], ids=["uint8-pillow", "float32-tifffile"])
def test_tiff_bomb_is_refused_before_decoding(bits: int, sample_format: int) -> None:
    data = _tiff_bomb(60_000, 60_000, bits, sample_format)
    with pytest.raises(ImageTooLargeError, match=f"60000x60000.*{MAX_PIXELS_ENV}"):
        decode_image(data, max_pixels=DEFAULT_MAX_PIXELS)
    # The same header within the limit is decoded and found truncated, not accepted.
    with pytest.raises(ImageDecodeError):
        decode_image(_tiff_bomb(64, 64, bits, sample_format), max_pixels=DEFAULT_MAX_PIXELS)


def test_read_image_real_histology_and_path_errors(tmp_path) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    ihc = skimage_data.immunohistochemistry()
    path = tmp_path / "ihc.png"
    Image.fromarray(ihc).save(path)
    np.testing.assert_array_equal(read_image(path, DEFAULT_MAX_PIXELS), ihc)
    with pytest.raises(ImageDecodeError, match="does not exist"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageDecodeError, match="directory"):
        read_image(tmp_path)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty.png.*empty"):
        read_image(empty)


def test_imageio_errors_and_options_do_not_import_torch() -> None:
    code = (
        "import sys, histoxplain_model.imageio, histoxplain_model.errors, histoxplain_model.options; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_tiff_declaring_thousands_of_samples_per_pixel_is_refused_before_decoding() -> None:
    """Within the pixel limit, but 60000 samples per pixel: 60 GB if the page were read."""
    data = bytearray(_tiff_bomb(1000, 1000, 8, 1))
    entry = data.index(struct.pack("<HHI", 277, 3, 1))  # SamplesPerPixel = 1
    data[entry + 8 : entry + 10] = struct.pack("<H", 60_000)
    with pytest.raises(ImageDecodeError, match=r"shape \(.*60000.*\).*one 2-D RGB or greyscale image"):
        decode_image(bytes(data), max_pixels=DEFAULT_MAX_PIXELS)


def test_request_images_name_the_request_pixel_setting() -> None:
    with pytest.raises(ImageTooLargeError, match=f"query image is 100000x100000.*{MAX_REQUEST_PIXELS_ENV}"):
        decode_image(_png_bomb(100_000, 100_000), DEFAULT_MAX_REQUEST_PIXELS, source="query image",
                     setting=MAX_REQUEST_PIXELS_ENV)
    assert DEFAULT_MAX_REQUEST_PIXELS == 4096 * 4096 < DEFAULT_MAX_PIXELS
