"""Decode untrusted image bytes (PNG, JPEG, TIFF) into (H, W, 3) uint8 RGB arrays.

The image size is read from the header and checked against a pixel limit BEFORE any pixel is
decoded, so a decompression bomb costs a few bytes of parsing, not gigabytes of memory. Pillow
plugins are opened directly (not through ``Image.open``) so Pillow's process-wide
``MAX_IMAGE_PIXELS`` is neither relied on nor modified. TIFFs Pillow cannot decode (planar
16-bit RGB, JPEG 2000, float samples, ...) fall back to tifffile. 16-bit, greyscale, palette
and alpha images are converted to 8-bit RGB (alpha composited onto white, the slide
background). Every failure is an :class:`ImageDecodeError` or :class:`ImageTooLargeError` with
a one-line message saying what to do. This module does not import torch.

Two pixel limits
    ``HISTOXPLAIN_MAX_PIXELS`` (default 400 Mpx) bounds files the CLI reads from its own disk.
    ``HISTOXPLAIN_MAX_REQUEST_PIXELS`` (default :data:`DEFAULT_MAX_REQUEST_PIXELS`, 16 Mpx =
    4096 x 4096) bounds images sent as bytes: to the gateway over gRPC and from the gateway to
    the TorchServe worker. Whole slides arrive by path (later from the PACS), never as bytes,
    so a request image is a query or a region. The default is sized to the gateway's memory:
    decoding a 16 Mpx image and encoding it for TorchServe peaks at about 240 MB over the
    process (15 bytes per pixel, measured for PNG, JPEG and 1-bit PNG bombs), so the four
    worker threads (``HISTOXPLAIN_WORKER_THREADS``) stay near 1 GB with every thread on such an
    image, under the Kubernetes limit of 2 GiB with room for the received messages (64 MiB
    each) and the process itself. A 100 Mpx bomb of 12 KB cost 2.6 GB before this limit.

Messages name ``source`` as given: the CLI passes its own file paths, the gateway and the
handler pass a word and a position (``"query image"``, ``"image 3"``), never the caller's text.
"""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

from .errors import ImageDecodeError, ImageTooLargeError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_REQUEST_PIXELS",
    "MAX_PIXELS_ENV",
    "MAX_REQUEST_PIXELS_ENV",
    "SUPPORTED_FORMATS",
    "decode_image",
    "read_image",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 20_000 * 20_000
"""Default pixel limit (width * height); the service reads its own from HISTOXPLAIN_MAX_PIXELS."""
MAX_PIXELS_ENV = "HISTOXPLAIN_MAX_PIXELS"
DEFAULT_MAX_REQUEST_PIXELS = 4096 * 4096
"""Default pixel limit of images sent as bytes (gateway, TorchServe worker); see the module docstring."""
MAX_REQUEST_PIXELS_ENV = "HISTOXPLAIN_MAX_REQUEST_PIXELS"
# Decoded samples per pixel we accept before allocating (RGBA); more is a bomb in another axis.
_MAX_SAMPLES_PER_PIXEL = 4
SUPPORTED_FORMATS = ("PNG", "JPEG", "TIFF")

_PLUGINS: dict[str, type[ImageFile.ImageFile]] = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.JpegImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,
}
# Signatures of formats we recognise but do not accept, to name them in the error.
_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "Photoshop PSD"),
    (b"\x1f\x8b", "gzip archive"),
    (b"PK\x03\x04", "ZIP archive"),
)
_HINT = "send a PNG, JPEG or TIFF file"


def _sniff_format(data: bytes) -> str:
    """Name of the container format from the magic bytes; raises for anything unsupported."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        raise ImageDecodeError(f"unsupported image format WebP; {_HINT}")
    if data[128:132] == b"DICM":
        raise ImageDecodeError(f"unsupported image format DICOM; {_HINT} (export the frame)")
    for signature, name in _OTHER_SIGNATURES:
        if data.startswith(signature):
            raise ImageDecodeError(f"unsupported image format {name}; {_HINT}")
    raise ImageDecodeError(f"not a recognised image (unknown format, starts with {data[:8]!r}); {_HINT}")


def _check_size(width: int, height: int, max_pixels: int, source: str, setting: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"{source} has an invalid size {width}x{height} px; the file is corrupt")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{source} is {width}x{height} px ({width * height:,} pixels); the limit is "
            f"{max_pixels:,} pixels (set {setting} to raise it, or tile the image first)"
        )


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale integer or float samples to uint8 (16-bit: divide by 257; float: [0,1] or [0,255])."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        if array.dtype.itemsize == 1:  # int8
            return np.clip(array, 0, None).astype(np.uint8)
        maximum = int(array.max()) if array.size else 0
        # 16-bit data: full range. Pillow returns 16-bit greyscale PNG as int32 "I" mode.
        scale = 257.0 if maximum <= 65535 else maximum / 255.0
        return np.clip(np.rint(array.astype(np.float64) / scale), 0, 255).astype(np.uint8)
    values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if values.size and values.max() <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    alpha_f = alpha.astype(np.float32)[..., None] / 255.0
    out = rgb.astype(np.float32) * alpha_f + 255.0 * (1.0 - alpha_f)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _array_to_rgb(array: np.ndarray, source: str) -> np.ndarray:
    """(H,W), (H,W,1), (H,W,2) grey+alpha, (H,W,3) or (H,W,4) RGBA samples -> (H,W,3) uint8."""
    array = _to_uint8(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ImageDecodeError(f"{source} has unsupported pixel layout {array.shape}; {_HINT} with RGB pixels")
    channels = array.shape[2]
    if channels == 1:
        return np.repeat(array, 3, axis=2)
    if channels == 2:
        return _composite_on_white(np.repeat(array[..., :1], 3, axis=2), array[..., 1])
    if channels == 3:
        return np.ascontiguousarray(array)
    if channels == 4:
        return _composite_on_white(array[..., :3], array[..., 3])
    raise ImageDecodeError(f"{source} has {channels} channels; {_HINT} with RGB or greyscale pixels")


def _pil_to_rgb(image: Image.Image, source: str) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
        return _composite_on_white(rgba[..., :3], rgba[..., 3])
    if mode.startswith(("I", "F")):
        return _array_to_rgb(np.asarray(image), source)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


class _PillowUnsuitable(Exception):
    """Pillow opens this TIFF but would decode it wrongly; use tifffile."""


def _pillow_decodes_tiff_exactly(image: ImageFile.ImageFile) -> bool:
    # Pillow 13 mis-decodes planar 16-bit RGB (samples interleaved wrongly) and truncates
    # 16-bit RGB to its high byte: only 1- and 8-bit unsigned samples go through Pillow.
    bits = image.tag_v2.get(258, (1,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    sample_format = image.tag_v2.get(339, (1,))
    sample_format = sample_format if isinstance(sample_format, tuple) else (sample_format,)
    return all(b in (1, 8) for b in bits) and all(f == 1 for f in sample_format)


def _decode_with_pil(data: bytes, fmt: str, max_pixels: int, source: str, setting: str) -> np.ndarray:
    try:
        image = _PLUGINS[fmt](io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # The decoder's own text names its internals (struct, zlib): the log gets it, the caller not.
        log.debug("%s: %s header unreadable: %s", source, fmt, exc)
        raise ImageDecodeError(f"{source} is not a readable {fmt} file; {_HINT} that opens in an image viewer") from exc
    with image:
        width, height = image.size
        _check_size(width, height, max_pixels, source, setting)
        if fmt == "TIFF" and not _pillow_decodes_tiff_exactly(image):
            raise _PillowUnsuitable(f"{source}: {image.tag_v2.get(258)} bits per sample")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            log.debug("%s: %s pixels unreadable: %s", source, fmt, exc)
            raise ImageDecodeError(
                f"{source} is truncated or corrupt ({fmt}); re-export or re-send the complete file"
            ) from exc
        if fmt == "JPEG":
            image = ImageOps.exif_transpose(image)
        return _pil_to_rgb(image, source)


def _decode_tiff_with_tifffile(data: bytes, max_pixels: int, source: str, setting: str) -> np.ndarray:
    import tifffile  # optional fallback, imported only when Pillow cannot read the TIFF

    with tifffile.TiffFile(io.BytesIO(data)) as tiff:
        if not tiff.pages:
            raise ImageDecodeError(f"{source} is a TIFF file without images; {_HINT}")
        page = tiff.pages.first
        axes = page.axes
        shape = dict(zip(axes, page.shape))
        width, height = int(shape.get("X", 0)), int(shape.get("Y", 0))
        _check_size(width, height, max_pixels, source, setting)
        # Every declared axis, not just Y and X: 65535 samples per pixel or a stack of planes
        # would allocate thousands of times the pixel count before the layout check below.
        if math.prod(int(size) for size in page.shape) > width * height * _MAX_SAMPLES_PER_PIXEL:
            raise ImageDecodeError(
                f"{source} is a TIFF of shape {tuple(page.shape)} ({axes}); {_HINT} with one 2-D RGB or greyscale image"
            )
        array = page.asarray()
    # Bring the sample axis last and drop singleton axes other than Y, X, S.
    order = [axes.index(a) for a in "YXS" if a in axes]
    rest = [i for i in range(len(axes)) if i not in order]
    if any(array.shape[i] != 1 for i in rest):
        raise ImageDecodeError(f"{source} is a multi-dimensional TIFF ({axes}); {_HINT} with one 2-D image")
    array = np.transpose(array, rest + order)
    return _array_to_rgb(array.reshape(array.shape[len(rest):]), source)


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, source: str = "image", setting: str = MAX_PIXELS_ENV
) -> np.ndarray:
    """Decode PNG, JPEG or TIFF bytes to an (H, W, 3) uint8 RGB array.

    Args:
        data: the encoded file.
        max_pixels: width * height limit, checked from the header before decoding.
        source: how messages name the image (a file name or "image"; see the module docstring).
        setting: the variable that sets ``max_pixels``, named in the too-large message
            (:data:`MAX_REQUEST_PIXELS_ENV` for images sent as bytes).

    Raises:
        ImageDecodeError: empty, truncated, corrupt or unsupported data.
        ImageTooLargeError: more than ``max_pixels`` pixels.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    data = bytes(data)
    if not data:
        raise ImageDecodeError(f"{source} is empty (0 bytes); {_HINT}")
    fmt = _sniff_format(data)
    try:
        return _decode_with_pil(data, fmt, max_pixels, source, setting)
    except (ImageDecodeError, _PillowUnsuitable) as pil_error:
        if fmt != "TIFF":
            raise
        log.debug("Pillow cannot read %s (%s); trying tifffile", source, pil_error)
        try:
            return _decode_tiff_with_tifffile(data, max_pixels, source, setting)
        except (ImageDecodeError, ImageTooLargeError):
            raise
        except Exception as exc:  # tifffile and its codecs raise many types for bad data
            log.debug("%s: TIFF unreadable by tifffile: %s", source, exc)
            raise ImageDecodeError(
                f"{source} is truncated, corrupt or an unsupported TIFF variant; "
                "re-export it as a plain RGB TIFF or PNG"
            ) from exc


def read_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a PNG, JPEG or TIFF file to an (H, W, 3) uint8 RGB array (errors as :func:`decode_image`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"image file {str(path)!r} does not exist; check the path") from exc
    except IsADirectoryError as exc:
        raise ImageDecodeError(f"{str(path)!r} is a directory, not an image file") from exc
    except OSError as exc:
        raise ImageDecodeError(f"cannot read image file {str(path)!r}: {exc.strerror or exc}") from exc
    return decode_image(data, max_pixels, source=repr(str(path)))
