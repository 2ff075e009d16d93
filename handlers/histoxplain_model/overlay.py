"""Colour overlays of saliency heatmaps, as PNG bytes (no OpenCV at run time).

A heatmap (h, w) in [0, 1] is resized (bilinear) to the image it is drawn on, mapped through a
256-entry colour table taken from matplotlib, and alpha-blended over the image:
``out = (1 - alpha) * image + alpha * colour``, the blend pytorch-grad-cam's
``show_cam_on_image`` uses.

PNGs are written here rather than by Pillow: every row gets PNG's "Up" filter (vectorised in
numpy) and zlib compresses with Huffman coding only. On a 224 px overlay that takes 1.4 ms and
83 KB where Pillow's encoder (adaptive filters, zlib level 1) takes 5.5 ms and 86 KB, and the
gateway draws 2k of them per explained search. The output is an ordinary 8-bit RGB PNG.
"""

from __future__ import annotations

import struct
import zlib
from functools import cache

import numpy as np
from PIL import Image

from histoxplain_model.errors import InvalidRequest, UnknownNameError

__all__ = ["COLORMAPS", "colorize", "heatmap_png", "overlay", "overlay_png", "resize_heatmap"]

# "jet" is what GradCAM papers and pytorch-grad-cam show; "turbo" is a perceptually smoother
# rainbow; "inferno"/"viridis" are perceptually uniform.
COLORMAPS: tuple[str, ...] = ("jet", "turbo", "inferno", "viridis")


@cache
def _lookup_table(colormap: str) -> np.ndarray:
    """(256, 3) uint8 colour table."""
    if colormap not in COLORMAPS:
        raise UnknownNameError.for_name("colormap", colormap, COLORMAPS)
    from matplotlib import colormaps  # import only when the first overlay is drawn

    rgba = colormaps[colormap](np.linspace(0.0, 1.0, 256))
    table = np.round(rgba[:, :3] * 255).astype(np.uint8)
    table.setflags(write=False)
    return table


def _check_heatmap(heatmap: np.ndarray) -> np.ndarray:
    heatmap = np.asarray(heatmap)
    if heatmap.ndim != 2 or heatmap.size == 0:
        raise InvalidRequest(f"heatmap must be a non-empty (H, W) array, got shape {heatmap.shape}")
    if not np.all(np.isfinite(heatmap)):
        raise InvalidRequest("heatmap contains NaN or infinite values")
    return np.clip(heatmap.astype(np.float32, copy=False), 0.0, 1.0)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or image.size == 0:
        raise InvalidRequest(
            f"image must be an (H, W, 3) uint8 RGB array, got {image.dtype} {image.shape}"
        )
    return image


def resize_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float in [0, 1] -> (H, W) float32 in [0, 1], bilinear; ``size`` is (H, W)."""
    heatmap = _check_heatmap(heatmap)
    height, width = size
    if heatmap.shape == (height, width):
        return heatmap
    resized = Image.fromarray(heatmap).resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def colorize(heatmap: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """(H, W) float in [0, 1] -> (H, W, 3) uint8 RGB through the colour table."""
    indices = np.round(_check_heatmap(heatmap) * 255).astype(np.uint8)
    return _lookup_table(colormap)[indices]


def overlay(
    image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, colormap: str = "jet"
) -> np.ndarray:
    """Blend the coloured heatmap over ``image`` (H, W, 3) uint8 -> (H, W, 3) uint8."""
    image = _check_image(image)
    if not 0.0 <= alpha <= 1.0:
        raise InvalidRequest(f"alpha must be in [0, 1], got {alpha}")
    colour = colorize(resize_heatmap(heatmap, image.shape[:2]), colormap)
    # Fixed point, alpha in 1/256 steps: 255 * 256 + 128 fits uint16, and it is three times
    # faster than the float blend (within 1 of it); alpha 0 and 1 give the image and the colours.
    weight = int(round(alpha * 256))
    blended = image.astype(np.uint16) * np.uint16(256 - weight)
    blended += colour.astype(np.uint16) * np.uint16(weight)
    blended += np.uint16(128)
    return (blended >> 8).astype(np.uint8)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FILTER_UP = 2


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes: "Up"-filtered rows, Huffman-only deflate (see the module doc)."""
    height, width, _ = rgb.shape
    rows = np.ascontiguousarray(rgb).reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = _PNG_FILTER_UP
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG defines it
    compressor = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_HUFFMAN_ONLY)
    pixels = compressor.compress(filtered.tobytes()) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"".join(
        [_PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", pixels), _png_chunk(b"IEND", b"")]
    )


def overlay_png(
    image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, colormap: str = "jet"
) -> bytes:
    """PNG bytes of ``heatmap`` (h, w) in [0, 1] blended over ``image`` (H, W, 3) uint8.

    The heatmap is resized to the image, so a map at the model's input resolution can be drawn
    on the original tile.
    """
    return _png(overlay(image, heatmap, alpha, colormap))


def heatmap_png(
    heatmap: np.ndarray, size: tuple[int, int] | None = None, colormap: str = "jet"
) -> bytes:
    """PNG bytes of the bare coloured heatmap, optionally resized to ``size`` (H, W)."""
    heatmap = _check_heatmap(heatmap) if size is None else resize_heatmap(heatmap, size)
    return _png(colorize(heatmap, colormap))
