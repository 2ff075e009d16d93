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

Reference maps: ``smooth_random_map`` (uniform noise on the explainer's feature grid, upsampled
the way GradCAM upsamples its maps: the chance level for a map as smooth as GradCAM's) and
``pixel_random_map`` (independent noise per pixel). Pixel noise is not a fair chance level for
smooth maps: deleting scattered pixels everywhere destroys texture, the encoder's cue, faster
than deleting any contiguous region, so it is reported as its own row, not used for win rates.

Cost: the two end points of both curves (the image and the baseline) are scored once for all
maps of an image (:func:`deletion_insertion_many`), and the interior points of every map go
through the model ``batch_size`` images per forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.saliency import normalise_maps, upsample_maps

__all__ = [
    "BASELINES",
    "REFERENCE_MAPS",
    "ScoreFn",
    "Curves",
    "baseline_image",
    "centred_gaussian_map",
    "deletion_insertion",
    "deletion_insertion_many",
    "pixel_random_map",
    "smooth_random_map",
]

BASELINES = ("blur", "zero")
REFERENCE_MAPS = ("random", "gaussian", "random_pixel")
"""random: smooth noise on the explainer's feature grid (the chance level win rates use);
gaussian: centred blob (centre bias); random_pixel: independent noise per pixel."""
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


def pixel_random_map(shape: tuple[int, int], seed: int) -> np.ndarray:
    """(H, W) float32 uniform noise in [0, 1], independent per pixel."""
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def smooth_random_map(shape: tuple[int, int], grid: tuple[int, int], seed: int) -> np.ndarray:
    """(H, W) float32 in [0, 1]: uniform noise on a ``grid`` (h, w), upsampled to ``shape``.

    The upsampling and min-max are GradCAM's own (:func:`upsample_maps`, :func:`normalise_maps`),
    so with ``grid`` = the target layer's feature grid the map is exactly as smooth as a GradCAM
    map and differs from one only in where its mass is: the chance level for smooth maps.
    """
    noise = torch.from_numpy(np.random.default_rng(seed).random(tuple(grid), dtype=np.float32))
    return normalise_maps(upsample_maps(noise[None, None], tuple(shape)))[0, 0].numpy()


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


def _check_inputs(pixels: torch.Tensor, saliencies: Sequence[np.ndarray], steps: int) -> None:
    if pixels.ndim != 4 or pixels.shape[0] != 1:
        raise InvalidRequest(f"pixels must be (1, 3, H, W), got {tuple(pixels.shape)}")
    height, width = pixels.shape[-2:]
    for saliency in saliencies:
        if saliency.shape != (height, width):
            raise InvalidRequest(f"map is {saliency.shape}, the image {(height, width)}; resize the map to the model input")
    if steps < 1:
        raise InvalidRequest(f"steps must be >= 1, got {steps}")


@torch.no_grad()
def deletion_insertion_many(
    score_fn: ScoreFn,
    pixels: torch.Tensor,
    saliencies: Sequence[np.ndarray],
    baseline: torch.Tensor,
    steps: int = 16,
    batch_size: int = 16,
    seed: int = 0,
) -> list[Curves]:
    """Deletion and insertion curves of ``score_fn`` for one (1, 3, H, W) image and several maps.

    ``saliencies``: (H, W) maps at the input resolution; ``steps`` equal fractions of the pixels
    are changed per curve (S+1 points, from 0 to 100 %). The image and the baseline (both
    curves' end points) are scored once; the 2 (S-1) interior images of every map are built
    ``batch_size`` at a time and scored in one forward pass per batch.
    """
    _check_inputs(pixels, saliencies, steps)
    height, width = pixels.shape[-2:]
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.round(fractions * height * width).astype(np.int64)
    ranks = []
    for saliency in saliencies:
        rank = torch.empty(height * width, dtype=torch.int64)
        rank[torch.from_numpy(_order(saliency, seed))] = torch.arange(height * width)
        ranks.append(rank.view(1, height, width))
    image_score, baseline_score = (float(v) for v in score_fn(torch.cat([pixels, baseline])).detach().float().cpu())
    ends = {"deletion": (pixels, baseline), "insertion": (baseline, pixels)}
    # (map, curve, step) of every interior point, scored in batches.
    points = [(m, curve, step) for m in range(len(ranks)) for curve in ends for step in range(1, steps)]
    scores = np.empty(len(points))
    for first in range(0, len(points), batch_size):
        chunk = points[first : first + batch_size]
        changed = torch.stack([(ranks[m] < int(counts[step])) for m, _, step in chunk]).to(pixels.dtype)  # (b, 1, H, W)
        start = torch.cat([ends[curve][0] for _, curve, _ in chunk])
        end = torch.cat([ends[curve][1] for _, curve, _ in chunk])
        scores[first : first + len(chunk)] = score_fn(start * (1 - changed) + end * changed).detach().float().cpu().numpy().reshape(-1)
    by_point = dict(zip(points, scores))
    results = []
    for m in range(len(ranks)):
        curves = {}
        for curve, (first_score, last_score) in (("deletion", (image_score, baseline_score)), ("insertion", (baseline_score, image_score))):
            curves[curve] = np.array([first_score, *(by_point[(m, curve, step)] for step in range(1, steps)), last_score])
        results.append(Curves(fractions=fractions, deletion=curves["deletion"], insertion=curves["insertion"]))
    return results


def deletion_insertion(
    score_fn: ScoreFn,
    pixels: torch.Tensor,
    saliency: np.ndarray,
    baseline: torch.Tensor,
    steps: int = 16,
    batch_size: int = 16,
    seed: int = 0,
) -> Curves:
    """Deletion and insertion curves of ``score_fn`` for one (1, 3, H, W) image and its (H, W) map."""
    return deletion_insertion_many(score_fn, pixels, [saliency], baseline, steps, batch_size, seed)[0]
