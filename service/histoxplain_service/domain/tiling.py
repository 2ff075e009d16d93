"""Tile grids and the tissue mask that decides which tiles are worth indexing.

Grid
    Tiles of ``tile_size`` px every ``stride`` px along each axis. When the last regular tile
    stops short of the edge, one more tile is aligned to the edge, so every pixel of the image
    is covered (the edge tile overlaps its neighbour). An axis shorter than a tile gets one tile
    covering it; its pixels are then padded with white (the colour of glass) on the right and
    bottom up to ``tile_size``, not resized: resizing would change the magnification (µm/px),
    which the encoder is sensitive to, while white padding looks like slide background.

Tissue
    A pixel is tissue when its HSV saturation exceeds a threshold: Otsu's threshold on the
    saturation of a thumbnail, clipped to [0.04, 0.08]. Glass is grey-white (saturation about
    0.01); stained tissue, even pale stroma, is above 0.04. The clip keeps Otsu from splitting
    an image that is all tissue (no background mode: Otsu would fall between dark and pale
    tissue, at 0.2-0.3 on the sample IHC image) or all glass (it would fall inside the noise).
    A tile is kept when at least ``min_tissue`` of its pixels are tissue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "TISSUE_THRESHOLD_RANGE",
    "pad_tile",
    "saturation",
    "tile_grid",
    "tissue_fractions",
    "tissue_mask",
    "otsu_threshold",
]

TISSUE_THRESHOLD_RANGE = (0.04, 0.08)
PAD_VALUE = 255


def _starts(length: int, tile_size: int, stride: int) -> list[int]:
    if length <= tile_size:
        return [0]
    starts = list(range(0, length - tile_size + 1, stride))
    if starts[-1] + tile_size < length:
        starts.append(length - tile_size)
    return starts


def tile_grid(width: int, height: int, tile_size: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Tile rectangles ``(x, y, w, h)`` covering a ``width`` x ``height`` image, row by row.

    ``w`` and ``h`` equal ``tile_size`` except along an axis shorter than one tile.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if tile_size <= 0 or stride <= 0:
        raise ValueError(f"tile size and stride must be positive, got {tile_size} and {stride}")
    return [
        (x, y, min(tile_size, width - x), min(tile_size, height - y))
        for y in _starts(height, tile_size, stride)
        for x in _starts(width, tile_size, stride)
    ]


def pad_tile(tile: np.ndarray, tile_size: int) -> np.ndarray:
    """(h, w, 3) uint8 with h, w <= tile_size -> (tile_size, tile_size, 3), white on the right/bottom."""
    height, width = tile.shape[:2]
    if (height, width) == (tile_size, tile_size):
        return np.ascontiguousarray(tile)
    padded = np.full((tile_size, tile_size, 3), PAD_VALUE, dtype=np.uint8)
    padded[:height, :width] = tile
    return padded


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (H, W) float32 in [0, 1] of an (H, W, 3) uint8 image."""
    channels = rgb.astype(np.float32)
    high = channels.max(axis=2)
    low = channels.min(axis=2)
    return np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising the between-class variance."""
    histogram, edges = np.histogram(values.ravel(), bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(histogram).astype(np.float64)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(histogram * centres)
    mean_low = np.divide(sum_low, weight_low, out=np.zeros_like(sum_low), where=weight_low > 0)
    mean_high = np.divide(sum_low[-1] - sum_low, weight_high, out=np.zeros_like(sum_low), where=weight_high > 0)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """(h, w) bool tissue mask of an (h, w, 3) uint8 thumbnail (see the module docstring)."""
    sat = saturation(thumbnail)
    low, high = TISSUE_THRESHOLD_RANGE
    threshold = min(max(otsu_threshold(sat), low), high)
    return sat > threshold


def tissue_fractions(mask: np.ndarray, boxes: Sequence[tuple[int, int, int, int]], scale: float) -> np.ndarray:
    """Fraction of tissue pixels in each box; ``scale`` = mask pixels per image pixel.

    Each box covers at least one mask pixel, so tiny tiles on a small thumbnail still get a value.
    """
    mask_h, mask_w = mask.shape
    fractions = np.empty(len(boxes), dtype=np.float64)
    for i, (x, y, w, h) in enumerate(boxes):
        x0 = min(int(x * scale), mask_w - 1)
        y0 = min(int(y * scale), mask_h - 1)
        x1 = max(min(math.ceil((x + w) * scale), mask_w), x0 + 1)
        y1 = max(min(math.ceil((y + h) * scale), mask_h), y0 + 1)
        fractions[i] = mask[y0:y1, x0:x1].mean()
    return fractions
