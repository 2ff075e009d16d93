"""The ``HXP1`` envelope: how the gateway and the TorchServe handler exchange arrays.

One format in both directions, so one encoder and one decoder serve both ends:

    b"HXP1" | uint32 little-endian header length | header (UTF-8 JSON) | array bytes

The header is ``{"status": "ok", "meta": {...}, "arrays": [{"name", "dtype", "shape", "offset",
"nbytes"}]}`` with offsets into the bytes after the header, or ``{"status": "error", "error":
{"kind": <histoxplain_model.errors class name or "InternalError">, "code": <gRPC status name>,
"message": ...}}``. Arrays are little-endian, C order.

Responses (handler -> gateway) are envelopes. Request images (gateway -> handler) are either
encoded files (PNG, JPEG, TIFF) or a *pixel envelope*: an ``ok`` envelope holding one ``pixels``
array, (H, W, 3) uint8 RGB. Pixel envelopes skip the PNG encode in the gateway and the decode in
the worker (about 8 ms and 2 ms per 224 px tile on one core; an explanation at k=10 sends 11
images); the sender falls back to PNG where raw pixels would not fit its message limit. This module imports numpy and Pillow, never torch.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from histoxplain_model import errors
from histoxplain_model.imageio import MAX_REQUEST_PIXELS_ENV, decode_image

__all__ = [
    "ENVELOPE_MAGIC",
    "decode_envelope",
    "decode_request_image",
    "encode_envelope",
    "encode_error",
    "encode_request_image",
]

ENVELOPE_MAGIC = b"HXP1"
_HEADER_LENGTH = struct.Struct("<I")

def encode_envelope(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> bytes:
    """An ``ok`` envelope: JSON ``meta`` plus raw little-endian ``arrays`` (C order)."""
    specs = []
    payloads = []
    offset = 0
    for name, array in arrays.items():
        contiguous = np.ascontiguousarray(array)
        if contiguous.dtype.byteorder == ">":
            contiguous = contiguous.astype(contiguous.dtype.newbyteorder("<"))
        data = contiguous.tobytes()
        specs.append(
            {"name": name, "dtype": contiguous.dtype.name, "shape": list(contiguous.shape),
             "offset": offset, "nbytes": len(data)}
        )
        payloads.append(data)
        offset += len(data)
    return _pack({"status": "ok", "meta": dict(meta), "arrays": specs}, payloads)


def encode_error(error: BaseException) -> bytes:
    """An ``error`` envelope; unexpected errors get a generic message (the log has the trace)."""
    if isinstance(error, errors.HistoxplainError) and error.status_code != "INTERNAL":
        kind, code, message = type(error).__name__, error.status_code, str(error)
    else:
        kind, code = "InternalError", "INTERNAL"
        message = "the model failed on this request; the TorchServe log has the details"
    return _pack({"status": "error", "error": {"kind": kind, "code": code, "message": message}}, [])


def decode_envelope(payload: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """An envelope -> ``(meta, arrays)``; an error envelope raises its error class.

    The arrays are read-only views of ``payload`` (no copy).

    Raises:
        HistoxplainError subclass: the handler's per-request error (kind -> class, or the
            class for its gRPC code); RuntimeError for INTERNAL or a malformed envelope.
    """
    if len(payload) < 8 or payload[:4] != ENVELOPE_MAGIC:
        raise RuntimeError("TorchServe answered with something that is not a histoxplain envelope (wrong handler?)")
    (header_length,) = _HEADER_LENGTH.unpack_from(payload, 4)
    body_start = 8 + header_length
    try:
        header = json.loads(bytes(payload[8:body_start]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RuntimeError(f"the envelope header is not JSON: {error}") from None
    if header.get("status") == "error":
        raise _error_from(header.get("error", {}))
    arrays = {}
    body = memoryview(payload)[body_start:]
    for spec in header.get("arrays", []):
        start, nbytes = int(spec["offset"]), int(spec["nbytes"])
        dtype = np.dtype(spec["dtype"]).newbyteorder("<")
        shape = [int(size) for size in spec["shape"]]
        if start < 0 or start + nbytes > len(body) or nbytes != dtype.itemsize * int(np.prod(shape)):
            raise RuntimeError(f"the envelope is truncated or inconsistent (array {spec['name']!r})")
        arrays[spec["name"]] = np.frombuffer(body[start : start + nbytes], dtype=dtype).reshape(shape)
    return header.get("meta", {}), arrays


def encode_request_image(image: np.ndarray, raw: bool = True) -> bytes:
    """(H, W, 3) uint8 RGB -> a pixel envelope (``raw``) or a lossless PNG (about 3x smaller).

    Either way the worker decodes exactly these pixels.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise errors.InvalidRequest(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    if raw:
        return encode_envelope({}, {"pixels": image})
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_request_image(data: bytes, max_pixels: int, source: str = "image") -> np.ndarray:
    """A request image (pixel envelope or encoded file) -> (H, W, 3) uint8 RGB.

    ``max_pixels`` is the request limit (``HISTOXPLAIN_MAX_REQUEST_PIXELS``), checked before
    any pixel is allocated; ``source`` names the image by its input key, never by caller text.

    Raises:
        ImageDecodeError: a malformed pixel envelope or image file.
        ImageTooLargeError: more than ``max_pixels`` pixels.
    """
    if not data.startswith(ENVELOPE_MAGIC):
        return decode_image(data, max_pixels, source=source, setting=MAX_REQUEST_PIXELS_ENV)
    try:
        _, arrays = decode_envelope(data)
    except (RuntimeError, errors.HistoxplainError, KeyError, TypeError, ValueError) as error:
        raise errors.ImageDecodeError(f"{source} is a malformed pixel envelope ({error}); send a PNG instead") from None
    pixels = arrays.get("pixels")
    if pixels is None or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        found = "no 'pixels' array" if pixels is None else f"pixels {pixels.shape} {pixels.dtype}"
        raise errors.ImageDecodeError(f"{source} is a pixel envelope with {found}; it must hold (H, W, 3) uint8 RGB")
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    if height == 0 or width == 0:
        raise errors.ImageDecodeError(f"{source} is an empty {width}x{height} px image; send at least one pixel")
    if height * width > max_pixels:
        raise errors.ImageTooLargeError(
            f"{source} is {width}x{height} px ({width * height:,} pixels); the limit is {max_pixels:,} pixels "
            f"(set {MAX_REQUEST_PIXELS_ENV} to raise it)"
        )
    return pixels


def _pack(header: Mapping[str, Any], payloads: Sequence[bytes]) -> bytes:
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return b"".join([ENVELOPE_MAGIC, _HEADER_LENGTH.pack(len(header_bytes)), header_bytes, *payloads])


def _error_from(error: Mapping[str, Any]) -> Exception:
    kind = str(error.get("kind", ""))
    message = str(error.get("message", "the model failed on this request"))
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.HistoxplainError):
        return cls(message)
    code_cls = errors.error_class_for_status(str(error.get("code", "")))
    if code_cls is not None:
        return code_cls(message)
    return RuntimeError(f"TorchServe model error: {message}")
