"""Reference maps of the explanation evaluation; the curves themselves live in the model library.

The deletion/insertion and ROAD curves, the baselines and the smooth random map (the chance
level) are :mod:`histoxplain_model.faithfulness`, shared with ``ExplainOptions.verify``; this
module re-exports them for the evaluation and adds the reference maps only the evaluation draws:

- ``random``: :func:`smooth_random_map` on a map's own grid (the chance level the paired
  differences are taken against);
- ``gaussian``: a centred blob (centre bias);
- ``random_pixel``: independent noise per pixel. Pixel noise is not a fair chance level for
  smooth maps: deleting scattered pixels everywhere destroys texture, the encoder's cue, faster
  than deleting any contiguous region, so it is reported as its own row.
"""

from __future__ import annotations

import numpy as np

from histoxplain_model.faithfulness import (
    BASELINES,
    PERTURBATIONS,
    ROAD_NOISE,
    Curves,
    ScoreFn,
    baseline_image,
    deletion_insertion,
    deletion_insertion_many,
    road_curves_many,
    road_impute,
    smooth_random_map,
)

__all__ = [
    "BASELINES",
    "PERTURBATIONS",
    "REFERENCE_MAPS",
    "ROAD_NOISE",
    "ScoreFn",
    "Curves",
    "baseline_image",
    "centred_gaussian_map",
    "deletion_insertion",
    "deletion_insertion_many",
    "pixel_random_map",
    "road_curves_many",
    "road_impute",
    "smooth_random_map",
]

REFERENCE_MAPS = ("random", "gaussian", "random_pixel")
"""random: smooth noise on the explainer's feature grid (the chance level win rates use);
gaussian: centred blob (centre bias); random_pixel: independent noise per pixel."""


def pixel_random_map(shape: tuple[int, int], seed: int) -> np.ndarray:
    """(H, W) float32 uniform noise in [0, 1], independent per pixel."""
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def centred_gaussian_map(shape: tuple[int, int], sigma_fraction: float = 0.25) -> np.ndarray:
    """(H, W) float32 in [0, 1], peak at the centre, sigma = ``sigma_fraction`` of each side.

    The "centre bias" baseline: many tiles and encoders weigh the centre more.
    """
    height, width = shape
    y = (np.arange(height) - (height - 1) / 2) / (sigma_fraction * height)
    x = (np.arange(width) - (width - 1) / 2) / (sigma_fraction * width)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)).astype(np.float32)
