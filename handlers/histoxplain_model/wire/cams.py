"""Finishing class activation maps with numpy: bilinear upsampling and per-map min-max.

The TorchServe handler sends GradCAM/GradCAM++/simmap maps at the target layer's resolution (7x7 for
EfficientNet-Lite0: 200 bytes a map instead of 100 KB at 224x224 float16), and the gateway, which
does not need torch for this, finishes them here exactly as ``saliency.base`` does with torch:
``normalise(upsample(cam))``, bilinear with half-pixel centres (``F.interpolate(...,
align_corners=False)``), both by matrix products with :func:`bilinear_weights`. Both agree with
``F.interpolate`` itself to float32 rounding (tests/unit/model/test_maps.py).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["bilinear_weights", "finish_cams", "normalise_maps", "upsample_bilinear"]


@lru_cache(maxsize=64)
def bilinear_weights(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) float32 interpolation matrix of torch's bilinear, align_corners=False, read-only
    (cached: one per grid and image size). ``weights @ column`` upsamples a column of ``in_size``
    values to ``out_size``; at most two non-zero weights a row, summing to 1."""
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    fraction = np.clip(source - low, 0, 1).astype(np.float32)
    weights = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, low), 1 - fraction)
    np.add.at(weights, (rows, high), fraction)
    weights.flags.writeable = False
    return weights


def upsample_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., h, w) -> (..., H, W) float32; ``size`` is (H, W)."""
    maps = np.asarray(maps, dtype=np.float32)
    height, width = size
    if maps.shape[-2:] == (height, width):
        return maps
    rows, columns = bilinear_weights(height, maps.shape[-2]), bilinear_weights(width, maps.shape[-1])
    return np.einsum("Hh,...hw,Ww->...HW", rows, maps, columns, optimize=True).astype(np.float32, copy=False)


def normalise_maps(maps: np.ndarray) -> np.ndarray:
    """Min-max each (H, W) map of (..., H, W) to [0, 1]; a constant map becomes all zeros."""
    maps = np.asarray(maps, dtype=np.float32)
    low = maps.min(axis=(-2, -1), keepdims=True)
    span = np.maximum(maps.max(axis=(-2, -1), keepdims=True) - low, np.finfo(np.float32).tiny)
    return np.clip((maps - low) / span, 0.0, 1.0)


def finish_cams(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Raw CAMs (..., h, w) >= 0 -> heatmaps (..., H, W) float32 in [0, 1] at the input size."""
    return normalise_maps(upsample_bilinear(cams, size))
