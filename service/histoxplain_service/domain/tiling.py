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

Planning
    :func:`plan_tile_boxes` is the one place that goes grid -> tissue mask -> tissue filter, for
    indexing, evaluation, the sample dataset and the demo's query. The callers differ only in
    the grid (stride, edge tiles, a region of the image), in where the mask comes from (a slide
    thumbnail, a resized copy, the image itself) and in what is kept when no tile has enough
    tissue, so those are its parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "TISSUE_THRESHOLD_RANGE",
    "PlannedTile",
    "Rect",
    "Thumbnail",
    "pad_tile",
    "plan_tile_boxes",
    "saturation",
    "tile_grid",
    "tissue_fractions",
    "tissue_mask",
    "otsu_threshold",
]

TISSUE_THRESHOLD_RANGE = (0.04, 0.08)
PAD_VALUE = 255

Rect = tuple[int, int, int, int]
"""A tile rectangle ``(x, y, w, h)`` in pixels of the image being tiled."""

Thumbnail = Callable[[], tuple[np.ndarray, float]]
"""Reads the image to measure tissue on: ``(thumbnail (h, w, 3) uint8, scale)``, scale being
thumbnail pixels per image pixel. A callable, so a slide's thumbnail is read only when needed."""


def _starts(length: int, tile_size: int, stride: int, edge_tiles: bool = True) -> list[int]:
    if not edge_tiles:
        return list(range(0, length - tile_size + 1, stride))
    if length <= tile_size:
        return [0]
    starts = list(range(0, length - tile_size + 1, stride))
    if starts[-1] + tile_size < length:
        starts.append(length - tile_size)
    return starts


def tile_grid(width: int, height: int, tile_size: int, stride: int, edge_tiles: bool = True) -> list[Rect]:
    """Tile rectangles ``(x, y, w, h)`` covering a ``width`` x ``height`` image, row by row.

    ``w`` and ``h`` equal ``tile_size`` except along an axis shorter than one tile. Without
    ``edge_tiles`` only the whole tiles at multiples of ``stride`` are returned (no edge-aligned
    tile, no short tile), so with ``stride == tile_size`` no two tiles share a pixel.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if tile_size <= 0 or stride <= 0:
        raise ValueError(f"tile size and stride must be positive, got {tile_size} and {stride}")
    return [
        (x, y, min(tile_size, width - x), min(tile_size, height - y))
        for y in _starts(height, tile_size, stride, edge_tiles)
        for x in _starts(width, tile_size, stride, edge_tiles)
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


@dataclass(frozen=True)
class PlannedTile:
    """A tile to cut: ``box`` in image pixels and its tissue fraction in [0, 1], or ``None``
    when the mask was not computed because it could not change the plan."""

    box: Rect
    tissue: float | None


def plan_tile_boxes(
    width: int,
    height: int,
    tile_size: int,
    stride: int,
    thumbnail: Thumbnail,
    min_tissue: float,
    *,
    origin: tuple[int, int] = (0, 0),
    edge_tiles: bool = True,
    fallback: Literal["none", "single", "best"] = "none",
) -> list[PlannedTile]:
    """The tiles worth cutting from an image, in grid order: grid -> tissue mask -> filter.

    Args:
        width, height: the tiled region's size (the whole image unless ``origin`` is set).
        tile_size, stride, edge_tiles: the grid (:func:`tile_grid`).
        thumbnail: the image to measure tissue on; called only when the mask can change the
            plan: ``min_tissue`` > 0, and more than one tile unless ``fallback`` is ``"none"``.
        min_tissue: keep tiles with at least this tissue fraction.
        origin: top-left corner of the tiled region in the image; boxes are in image pixels.
        fallback: what is kept when no tile reaches ``min_tissue``: ``"none"`` nothing;
            ``"single"`` an image that is one tile (the unit the user gave, e.g. a 224 px patch
            of a labelled dataset, background class included); ``"best"`` the tile with the most
            tissue (the first of equals).
    """
    left, top = origin
    boxes = [(left + x, top + y, w, h) for x, y, w, h in tile_grid(width, height, tile_size, stride, edge_tiles)]
    if min_tissue <= 0 or (len(boxes) == 1 and fallback != "none"):
        return [PlannedTile(box, None) for box in boxes]
    image, scale = thumbnail()
    fractions = tissue_fractions(tissue_mask(image), boxes, scale)
    kept = [PlannedTile(box, float(fraction)) for box, fraction in zip(boxes, fractions) if fraction >= min_tissue]
    if not kept and fallback == "best" and boxes:
        best = int(np.argmax(fractions))
        kept = [PlannedTile(boxes[best], float(fractions[best]))]
    return kept
