"""Overlay PNGs: size, colours, blending and validation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from histoxplain_model.errors import InvalidRequest, UnknownNameError
from histoxplain_model.overlay import colorize, heatmap_png, overlay, overlay_png, resize_heatmap


def decode(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_overlay_png_has_the_image_size_and_blends():
    image = np.full((50, 80, 3), 200, np.uint8)
    heatmap = np.zeros((7, 7), np.float32)
    heatmap[3, 3] = 1.0
    decoded = decode(overlay_png(image, heatmap, alpha=0.5, colormap="jet"))
    assert decoded.shape == (50, 80, 3)
    np.testing.assert_array_equal(decoded, overlay(image, heatmap, 0.5, "jet"))
    # Where the map is 0, jet is dark blue (0, 0, 127.5): 0.5 * 200 + 0.5 * colour
    jet_low = colorize(np.zeros((1, 1), np.float32))[0, 0].astype(float)
    np.testing.assert_allclose(decoded[0, 0], np.round(0.5 * 200 + 0.5 * jet_low), atol=1)
    assert jet_low[2] > 100 and jet_low[0] == 0  # blue
    # the centre (map 1) is dark red in jet
    centre = colorize(np.ones((1, 1), np.float32))[0, 0]
    assert centre[0] > 100 and centre[2] == 0


def test_alpha_zero_is_the_image_and_alpha_one_the_colours():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    heatmap = rng.random((32, 32)).astype(np.float32)
    np.testing.assert_array_equal(overlay(image, heatmap, alpha=0.0), image)
    np.testing.assert_array_equal(overlay(image, heatmap, alpha=1.0), colorize(heatmap))


def test_resize_keeps_range_and_constant_maps():
    resized = resize_heatmap(np.full((4, 4), 0.3, np.float32), (17, 23))
    assert resized.shape == (17, 23)
    np.testing.assert_allclose(resized, 0.3, atol=1e-6)
    ramp = resize_heatmap(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), (40, 40))
    assert ramp.min() >= 0 and ramp.max() <= 1


def test_heatmap_png_sizes():
    heatmap = np.random.default_rng(1).random((7, 9)).astype(np.float32)
    assert decode(heatmap_png(heatmap)).shape == (7, 9, 3)
    assert decode(heatmap_png(heatmap, size=(30, 20), colormap="inferno")).shape == (30, 20, 3)


@pytest.mark.parametrize(
    "image, heatmap",
    [
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8))),
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8))),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((2, 8, 8))),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), np.nan)),
    ],
)
def test_bad_inputs_raise(image, heatmap):
    with pytest.raises(InvalidRequest):
        overlay_png(image, heatmap)


def test_unknown_colormap_lists_known():
    with pytest.raises(UnknownNameError, match="jet"):
        overlay_png(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)), colormap="rainbow")


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 17, 3), (23, 1, 3), (224, 224, 3), (97, 131, 3)])
def test_png_writer_is_lossless_for_pillow_and_libpng(shape) -> None:
    import cv2  # OpenCV's libpng: a second, independent decoder (pytorch-grad-cam brings it)

    from histoxplain_model.overlay import _png

    rgb = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    png = _png(rgb)
    np.testing.assert_array_equal(decode(png), rgb)
    bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(bgr[..., ::-1].reshape(shape), rgb)


def test_png_writer_compresses_an_overlay() -> None:
    from skimage import data

    image = np.ascontiguousarray(data.immunohistochemistry()[:224, :224])
    y, x = np.mgrid[0:7, 0:7]
    png = overlay_png(image, np.exp(-((y - 3.0) ** 2 + (x - 2.0) ** 2) / 4.0))
    assert len(png) < 0.7 * image.nbytes
    assert decode(png).shape == image.shape


def test_blend_is_within_one_of_the_float_blend() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    heatmap = rng.random((40, 40)).astype(np.float32)
    for alpha in (0.25, 0.4, 0.5, 0.8):
        exact = (1 - alpha) * image.astype(np.float64) + alpha * colorize(heatmap).astype(np.float64)
        assert np.max(np.abs(overlay(image, heatmap, alpha).astype(np.float64) - exact)) <= 1.0
