"""Deletion and insertion curves of a similarity score (Petsiuk et al. 2018, RISE, sec. 4.1).

A map is faithful when the pixels it ranks first are the ones the score depends on:

- deletion: start from the image, replace the most relevant pixels first with a baseline
  image, and record the score after each step; a faithful map makes it fall fast (low AUC);
- insertion: start from the baseline and put the image's pixels back most-relevant-first;
  a faithful map makes the score climb fast (high AUC).

The score is the explained target: the cosine similarity to the reference embedding for the
``similar`` polarity, its negation for ``dissimilar``. AUC is the trapezoid rule over the
fraction of pixels changed, in [0, 1] on the x axis, so AUC is in score units (cosine).

Baselines: ``blur`` (default) is the image blurred with a Gaussian of sigma = 1/10 of its
side, which removes structure but keeps colour and stain intensity (Petsiuk's insertion
baseline); ``zero`` is zero in model-input space, i.e. the normalisation mean colour.
Ties in a map (flat regions) are broken by a seeded random order, so a constant map behaves
like a random one instead of deleting from the top-left corner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from histoxplain_model.errors import InvalidRequest

__all__ = [
    "BASELINES",
    "ScoreFn",
    "Curves",
    "baseline_image",
    "centred_gaussian_map",
    "deletion_insertion",
    "random_map",
]

BASELINES = ("blur", "zero")
ScoreFn = Callable[[torch.Tensor], torch.Tensor]
"""(B, 3, H, W) model input -> (B,) score (the explained target)."""


@dataclass(frozen=True)
class Curves:
    """Scores after each step; ``fractions`` (S+1,) of pixels changed, from 0 to 1."""

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray

    @property
    def deletion_auc(self) -> float:
        return float(np.trapezoid(self.deletion, self.fractions))

    @property
    def insertion_auc(self) -> float:
        return float(np.trapezoid(self.insertion, self.fractions))


def baseline_image(pixels: torch.Tensor, kind: str = "blur") -> torch.Tensor:
    """The baseline for (1, 3, H, W) model input ``pixels``; same shape."""
    if kind == "zero":
        return torch.zeros_like(pixels)
    if kind != "blur":
        raise InvalidRequest(f"unknown baseline {kind!r}; known: {', '.join(BASELINES)}")
    side = min(pixels.shape[-2:])
    sigma = max(1.0, side / 10)
    radius = int(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=pixels.dtype, device=pixels.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = pixels.shape[1]
    # Separable blur with reflect padding; the kernel is wider than small images, so pad in steps.
    blurred = pixels
    for shape in ((1, -1), (-1, 1)):
        weight = kernel.view(1, 1, *shape).repeat(channels, 1, 1, 1)
        pad_h, pad_w = (0, radius) if shape == (1, -1) else (radius, 0)
        padded = F.pad(blurred, (pad_w, pad_w, pad_h, pad_h), mode="replicate")
        blurred = F.conv2d(padded, weight, groups=channels)
    return blurred


def random_map(shape: tuple[int, int], seed: int) -> np.ndarray:
    """(H, W) float32 uniform noise in [0, 1]: the chance-level map."""
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def centred_gaussian_map(shape: tuple[int, int], sigma_fraction: float = 0.25) -> np.ndarray:
    """(H, W) float32 in [0, 1], peak at the centre, sigma = ``sigma_fraction`` of each side.

    The "centre bias" baseline: many tiles and encoders weigh the centre more.
    """
    height, width = shape
    y = (np.arange(height) - (height - 1) / 2) / (sigma_fraction * height)
    x = (np.arange(width) - (width - 1) / 2) / (sigma_fraction * width)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)).astype(np.float32)


def _order(saliency: np.ndarray, seed: int) -> np.ndarray:
    """Pixel indices, most relevant first; ties in random (seeded) order."""
    flat = saliency.reshape(-1).astype(np.float64)
    tie_break = np.random.default_rng(seed).permutation(flat.size)
    return np.lexsort((tie_break, -flat))


@torch.no_grad()
def deletion_insertion(
    score_fn: ScoreFn,
    pixels: torch.Tensor,
    saliency: np.ndarray,
    baseline: torch.Tensor,
    steps: int = 16,
    batch_size: int = 9,
    seed: int = 0,
) -> Curves:
    """Deletion and insertion curves of ``score_fn`` for one (1, 3, H, W) image and its map.

    ``saliency`` (H, W) at the input resolution; ``steps`` equal fractions of the pixels are
    changed per curve (S+1 points, from 0 to 100 %); forward passes run ``batch_size`` at a time.
    """
    if pixels.ndim != 4 or pixels.shape[0] != 1:
        raise InvalidRequest(f"pixels must be (1, 3, H, W), got {tuple(pixels.shape)}")
    height, width = pixels.shape[-2:]
    if saliency.shape != (height, width):
        raise InvalidRequest(f"map is {saliency.shape}, the image {(height, width)}; resize the map to the model input")
    if steps < 1:
        raise InvalidRequest(f"steps must be >= 1, got {steps}")
    order = torch.from_numpy(_order(saliency, seed))
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.round(fractions * height * width).astype(np.int64)
    rank = torch.empty(height * width, dtype=torch.int64)
    rank[order] = torch.arange(height * width)
    rank = rank.view(1, 1, height, width)

    def curve(start: torch.Tensor, end: torch.Tensor) -> np.ndarray:
        scores = []
        for first in range(0, len(counts), batch_size):
            chunk = torch.as_tensor(counts[first : first + batch_size]).view(-1, 1, 1, 1)
            changed = (rank < chunk).to(pixels.dtype)  # (b, 1, H, W): 1 where the pixel is swapped
            images = start * (1 - changed) + end * changed
            scores.append(score_fn(images).detach().float().cpu().numpy().reshape(-1))
        return np.concatenate(scores)

    return Curves(fractions=fractions, deletion=curve(pixels, baseline), insertion=curve(baseline, pixels))
