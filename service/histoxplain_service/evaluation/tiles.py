"""Apply a dataset's tiling policy to one image: resize to the target um/px, grid, tissue filter."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from histoxplain_model.imageio import read_image
from histoxplain_service.evaluation.datasets import DatasetImage, TilingPolicy
from histoxplain_service.domain.tiling import pad_tile, plan_tile_boxes

__all__ = ["Tile", "tile_image", "resize_to_policy"]


@dataclass(frozen=True)
class Tile:
    """pixels (tile_size, tile_size, 3) uint8 RGB (short images padded white);
    box (x, y, w, h) in the resized image; tissue fraction in [0, 1], ``None`` where it was not
    measured (``min_tissue`` 0, or an image that is one tile: the tile is kept either way)."""

    pixels: np.ndarray
    box: tuple[int, int, int, int]
    tissue: float | None


def resize_to_policy(pixels: np.ndarray, mpp: float | None, policy: TilingPolicy) -> np.ndarray:
    """Resize (H, W, 3) uint8 so one pixel is ``policy.target_mpp`` um (no-op if unknown)."""
    scale = policy.scale_for(mpp)
    if abs(scale - 1.0) < 1e-3:
        return pixels
    height, width = pixels.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS if scale > 1 else Image.Resampling.BOX))


def _thumbnail(pixels: np.ndarray, longest: int = 1024) -> tuple[np.ndarray, float]:
    height, width = pixels.shape[:2]
    scale = min(1.0, longest / max(height, width))
    if scale == 1.0:
        return pixels, 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX)), scale


def tile_image(image: DatasetImage, policy: TilingPolicy, max_pixels: int) -> list[Tile]:
    """Tiles of one dataset image under ``policy``; deterministic for a given image id.

    Uses the service's tile planner (:func:`histoxplain_service.domain.tiling.plan_tile_boxes`): tiles every
    ``tile_size`` px (the last one aligned to the edge, short axes padded white). Keeps tiles
    with tissue >= ``policy.min_tissue`` (the best tile when none passes), then at most
    ``policy.max_tiles`` of them, drawn with a seed derived from the image id.
    """
    pixels = resize_to_policy(read_image(image.path, max_pixels), image.mpp, policy)
    height, width = pixels.shape[:2]
    size = policy.tile_size
    candidates = plan_tile_boxes(width, height, size, size, lambda: _thumbnail(pixels), policy.min_tissue, fallback="best")
    if len(candidates) > policy.max_tiles:
        seed = int(hashlib.sha1(image.image_id.encode()).hexdigest()[:8], 16)
        chosen = np.sort(np.random.default_rng(seed).choice(len(candidates), policy.max_tiles, replace=False))
        candidates = [candidates[i] for i in chosen]
    tiles = []
    for planned in candidates:
        x, y, w, h = planned.box
        crop = pad_tile(pixels[y : y + h, x : x + w], size)
        tiles.append(Tile(crop, planned.box, planned.tissue))
    return tiles
