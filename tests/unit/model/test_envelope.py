"""The HXP1 envelope between the gateway and the TorchServe handler (``histoxplain_model.wire.envelope``)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from histoxplain_model import errors
from histoxplain_model.wire.envelope import (
    decode_envelope,
    decode_request_image,
    encode_envelope,
    encode_error,
    encode_request_image,
)


def test_envelope_round_trips_arrays_and_meta() -> None:
    embeddings = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32)
    heatmaps = np.linspace(0, 1, 2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    payload = encode_envelope(
        {"mode": "explain", "method": "gradcam"},
        {
            "embeddings": embeddings,
            "query_heatmaps": heatmaps.astype(np.float16),
            "empty": np.zeros((0, 3), np.float32),
        },
    )
    meta, arrays = decode_envelope(payload)
    assert meta == {"mode": "explain", "method": "gradcam"}
    np.testing.assert_array_equal(arrays["embeddings"], embeddings)
    assert arrays["query_heatmaps"].dtype == np.float16
    assert np.max(np.abs(arrays["query_heatmaps"].astype(np.float32) - heatmaps)) <= 2.0**-12
    assert arrays["empty"].shape == (0, 3)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (errors.ImageDecodeError("image.0 is not an image"), errors.ImageDecodeError),
        (errors.UnknownNameError.for_name("method", "gradcat", ["gradcam"]), errors.UnknownNameError),
        (errors.InvalidRequest("no images"), errors.InvalidRequest),
        (errors.DeadlineExceeded("late"), errors.DeadlineExceeded),
    ],
)
def test_error_envelope_raises_the_same_class(error, expected) -> None:
    with pytest.raises(expected) as raised:
        decode_envelope(encode_error(error))
    assert type(raised.value) is expected
    assert str(raised.value) == str(error)


def test_unexpected_error_becomes_generic_internal() -> None:
    with pytest.raises(RuntimeError, match="TorchServe log") as raised:
        decode_envelope(encode_error(ZeroDivisionError("secret detail")))
    assert "secret" not in str(raised.value)


def test_not_an_envelope_is_rejected() -> None:
    with pytest.raises(RuntimeError, match="not a histoxplain envelope"):
        decode_envelope(b'{"embeddings": []}')


@pytest.fixture
def tile() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.immunohistochemistry()[100:300, 50:274])  # (200, 224, 3) real IHC


@pytest.mark.parametrize("raw", [True, False])
def test_request_image_round_trips_exactly(tile, raw) -> None:
    data = encode_request_image(tile, raw=raw)
    assert data.startswith(b"HXP1") is raw
    assert data.startswith(b"\x89PNG") is not raw
    decoded = decode_request_image(data, max_pixels=10**6, source="query")
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, tile)


def test_pixel_envelope_is_the_pixels_plus_a_small_header(tile) -> None:
    # Raw pixels are the image's bytes plus a small header; PNG is smaller but costs an encode.
    raw = encode_request_image(tile)
    assert tile.nbytes < len(raw) < tile.nbytes + 256
    assert len(encode_request_image(tile, raw=False)) < len(raw)


def test_request_image_accepts_jpeg_files_too(tile) -> None:
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="JPEG", quality=95)
    decoded = decode_request_image(buffer.getvalue(), max_pixels=10**6)
    assert decoded.shape == tile.shape
    assert float(np.mean(np.abs(decoded.astype(np.float32) - tile))) < 4.0


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({}, "no 'pixels' array"),
        ({"pixels": np.zeros((4, 4), np.uint8)}, r"pixels \(4, 4\) uint8"),
        ({"pixels": np.zeros((4, 4, 4), np.uint8)}, r"pixels \(4, 4, 4\) uint8"),
        ({"pixels": np.zeros((4, 4, 3), np.float32)}, "float32"),
        ({"pixels": np.zeros((0, 4, 3), np.uint8)}, "empty"),
    ],
)
def test_malformed_pixel_envelope_is_a_decode_error(arrays, message) -> None:
    with pytest.raises(errors.ImageDecodeError, match=message):
        decode_request_image(encode_envelope({}, arrays), max_pixels=10**6, source="reference.3")


def test_truncated_pixel_envelope_is_a_decode_error(tile) -> None:
    data = encode_request_image(tile)
    with pytest.raises(errors.ImageDecodeError, match="reference.0 is a malformed pixel envelope.*send a PNG"):
        decode_request_image(data[:-10], max_pixels=10**6, source="reference.0")
    with pytest.raises(errors.ImageDecodeError, match="malformed pixel envelope"):
        decode_request_image(b"HXP1\xff\xff\x00\x00{", max_pixels=10**6)


def test_pixel_envelope_over_the_pixel_limit_is_refused(tile) -> None:
    with pytest.raises(errors.ImageTooLargeError, match="224x200 px .*limit is 1,000 pixels"):
        decode_request_image(encode_request_image(tile), max_pixels=1000, source="query")


def test_request_image_must_be_rgb_uint8() -> None:
    with pytest.raises(errors.InvalidRequest, match=r"\(H, W, 3\) uint8"):
        encode_request_image(np.zeros((4, 4), np.uint8))
