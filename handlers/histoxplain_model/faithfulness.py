"""Faithfulness of a similarity map: deletion/insertion curves and ROAD, against a random map.

A map is faithful when the pixels it ranks first are the ones the score depends on:

- deletion (Petsiuk et al. 2018, RISE, sec. 4.1): start from the image, replace the most
  relevant pixels first with a baseline image and record the score after each step; a faithful
  map makes it fall fast (low AUC);
- insertion: start from the baseline and put the image's pixels back most-relevant-first; a
  faithful map makes the score climb fast (high AUC);
- ROAD (Rong et al. 2022, "A consistent and efficient evaluation strategy for attribution
  methods", ICML): the removed pixels are not replaced by a fixed baseline but imputed from the
  pixels that remain (noisy linear imputation), so the perturbation leaks no information about
  the removal mask's shape and does not reward a map for finding where a blur hurts. MoRF removes
  the most relevant pixels first (low AUC = faithful), LeRF the least relevant first (high AUC).

The score is the explained target: the cosine similarity to the reference embedding for the
``similar`` polarity, its negation for ``dissimilar``. AUC is the trapezoid rule over the
fraction of pixels changed (0..1), so it is in score units (cosine).

Baselines: ``blur`` is the image blurred with a Gaussian of sigma = 1/10 of its side (Petsiuk's
insertion baseline: removes structure, keeps colour); ``zero`` is zero in model-input space
(the normalisation mean colour). Ties in a map (flat regions) are broken by a seeded random
order, so a constant map behaves like a random one instead of deleting from the top-left corner.

:func:`smooth_random_map` is the chance level: uniform noise on a map's own grid, upsampled the
way the CAM maps are, so it is as smooth as the map it is compared with.

Cost: the end points of the deletion/insertion curves (the image and the baseline) are scored
once for all maps of an image, and every interior point goes through ``score_fn``
``batch_size`` images at a time. :func:`verify_maps` is what ``ExplainOptions.verify`` runs:
per map ``4 (steps - 1)`` perturbed images (two curves of the map and two of its random map)
plus the two shared end points.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from histoxplain_model.deadlines import check_deadline
from histoxplain_model.errors import InvalidRequest
from histoxplain_model.limits import VERIFY_STEPS
from histoxplain_model.results import Faithfulness
from histoxplain_model.saliency import PixelEmbedder, finish_maps, normalise_maps, upsample_maps

__all__ = [
    "BASELINES",
    "PERTURBATIONS",
    "ROAD_NOISE",
    "Curves",
    "ScoreFn",
    "baseline_image",
    "deletion_insertion",
    "deletion_insertion_many",
    "feature_grid",
    "road_curves_many",
    "road_impute",
    "smooth_random_map",
    "verify_explanation",
    "verify_maps",
]

BASELINES = ("blur", "zero")
PERTURBATIONS = ("blur", "zero", "road")
"""``blur``/``zero``: deletion and insertion towards that baseline; ``road``: MoRF and LeRF."""
ROAD_NOISE = 0.01
"""Std of the noise added to every imputed value (model-input units), the reference
implementation's default (``NoisyLinearImputer(noise=0.01)``)."""
ScoreFn = Callable[[torch.Tensor], torch.Tensor]
"""(B, 3, H, W) model input -> (B,) score (the explained target)."""

# Rong et al. 2022, reference implementation (road_evaluation/imputations.py): the removed pixel
# is the weighted mean of its 8 neighbours, 1/6 for the 4 edge neighbours, 1/12 for the corners.
_NEIGHBOURS = (
    ((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
    ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6),
)


@dataclass(frozen=True)
class Curves:
    """Scores after each step; ``fractions`` (S+1,) of pixels changed, from 0 to 1.

    For ROAD, ``deletion`` is MoRF (most relevant removed first) and ``insertion`` is LeRF
    (least relevant removed first): the same "lower is better / higher is better" reading.
    """

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
    # Separable blur with replicate padding.
    blurred = pixels
    for shape in ((1, -1), (-1, 1)):
        weight = kernel.view(1, 1, *shape).repeat(channels, 1, 1, 1)
        pad_h, pad_w = (0, radius) if shape == (1, -1) else (radius, 0)
        padded = F.pad(blurred, (pad_w, pad_w, pad_h, pad_h), mode="replicate")
        blurred = F.conv2d(padded, weight, groups=channels)
    return blurred


def smooth_random_map(shape: tuple[int, int], grid: tuple[int, int], seed: int) -> np.ndarray:
    """(H, W) float32 in [0, 1]: uniform noise on a ``grid`` (h, w), upsampled to ``shape``.

    The upsampling and min-max are the CAM maps' own (:func:`upsample_maps`,
    :func:`normalise_maps`), so with ``grid`` = a map's own grid the random map is exactly as
    smooth as it and differs only in where its mass is: the chance level for that map.
    """
    noise = torch.from_numpy(np.random.default_rng(seed).random(tuple(grid), dtype=np.float32))
    return normalise_maps(upsample_maps(noise[None, None], tuple(shape)))[0, 0].numpy()


def _order(saliency: np.ndarray, seed: int) -> np.ndarray:
    """Pixel indices, most relevant first; ties in random (seeded) order."""
    flat = saliency.reshape(-1).astype(np.float64)
    tie_break = np.random.default_rng(seed).permutation(flat.size)
    return np.lexsort((tie_break, -flat))


def _ranks(saliencies: Sequence[np.ndarray], height: int, width: int, seed: int) -> list[torch.Tensor]:
    """(1, H, W) int64 rank of every pixel per map (0 = most relevant)."""
    ranks = []
    for saliency in saliencies:
        rank = torch.empty(height * width, dtype=torch.int64)
        rank[torch.from_numpy(_order(saliency, seed))] = torch.arange(height * width)
        ranks.append(rank.view(1, height, width))
    return ranks


def _check_inputs(pixels: torch.Tensor, saliencies: Sequence[np.ndarray], steps: int) -> None:
    if pixels.ndim != 4 or pixels.shape[0] != 1:
        raise InvalidRequest(f"pixels must be (1, 3, H, W), got {tuple(pixels.shape)}")
    height, width = pixels.shape[-2:]
    for saliency in saliencies:
        if saliency.shape != (height, width):
            raise InvalidRequest(f"map is {saliency.shape}, the image {(height, width)}; resize the map to the model input")
    if steps < 1:
        raise InvalidRequest(f"steps must be >= 1, got {steps}")


def _score_batched(score_fn: ScoreFn, images: Callable[[int], torch.Tensor], count: int, batch_size: int) -> np.ndarray:
    """Scores of ``images(i)`` (1, 3, H, W) for i < count, ``batch_size`` per call of ``score_fn``."""
    scores = np.empty(count)
    for first in range(0, count, batch_size):
        check_deadline()
        chunk = range(first, min(first + batch_size, count))
        batch = torch.cat([images(i) for i in chunk])
        scores[first : first + len(chunk)] = score_fn(batch).detach().float().cpu().numpy().reshape(-1)
    return scores


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
    ``batch_size`` at a time and scored in one call of ``score_fn`` per batch.
    """
    _check_inputs(pixels, saliencies, steps)
    height, width = pixels.shape[-2:]
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.round(fractions * height * width).astype(np.int64)
    ranks = _ranks(saliencies, height, width, seed)
    ends_scores = score_fn(torch.cat([pixels, baseline])).detach().float().cpu()
    image_score, baseline_score = float(ends_scores[0]), float(ends_scores[1])
    ends = {"deletion": (pixels, baseline), "insertion": (baseline, pixels)}
    # (map, curve, step) of every interior point, scored in batches.
    points = [(m, curve, step) for m in range(len(ranks)) for curve in ends for step in range(1, steps)]

    def image(i: int) -> torch.Tensor:
        m, curve, step = points[i]
        changed = (ranks[m] < int(counts[step])).to(pixels.dtype)[None].to(pixels.device)  # (1, 1, H, W)
        start, end = ends[curve]
        return start * (1 - changed) + end * changed

    by_point = dict(zip(points, _score_batched(score_fn, image, len(points), batch_size)))
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


def road_impute(image: np.ndarray, removed: np.ndarray, noise: float = ROAD_NOISE, rng: np.random.Generator | None = None) -> np.ndarray:
    """Noisy linear imputation (Rong et al. 2022) of the ``removed`` pixels of ``image``.

    ``image`` (C, H, W) float, ``removed`` (H, W) bool. Every removed pixel becomes the weighted
    mean of its in-image 8 neighbours (edge 1/6, corner 1/12, renormalised at the border), the
    removed ones included as unknowns: one sparse linear system for all of them, solved with
    ``scipy.sparse.linalg.spsolve`` as in the paper's reference implementation; then Gaussian
    noise of std ``noise`` is added to the imputed values (``rng`` seeded by the caller; ``noise``
    0 gives the exact solution). Returns a new (C, H, W) float64 array.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    channels, height, width = image.shape
    flat_removed = removed.reshape(-1)
    unknown = np.flatnonzero(flat_removed)
    result = image.reshape(channels, -1).astype(np.float64)
    if unknown.size == 0:
        return result.reshape(image.shape)
    variable = np.full(flat_removed.size, -1, dtype=np.int64)
    variable[unknown] = np.arange(unknown.size)
    rows_of, cols_of = unknown // width, unknown % width
    weight_sum = np.zeros(unknown.size)
    right = np.zeros((unknown.size, channels))
    a_rows, a_cols, a_values = [], [], []
    for (d_row, d_col), weight in _NEIGHBOURS:
        row, col = rows_of + d_row, cols_of + d_col
        inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
        equation = np.flatnonzero(inside)
        neighbour = row[inside] * width + col[inside]
        weight_sum[equation] += weight
        is_unknown = flat_removed[neighbour]
        a_rows.append(equation[is_unknown])
        a_cols.append(variable[neighbour[is_unknown]])
        a_values.append(np.full(int(is_unknown.sum()), -weight))
        right[equation[~is_unknown]] += weight * result[:, neighbour[~is_unknown]].T
    a_rows.append(np.arange(unknown.size))
    a_cols.append(np.arange(unknown.size))
    a_values.append(weight_sum)
    system = coo_matrix(
        (np.concatenate(a_values), (np.concatenate(a_rows), np.concatenate(a_cols))), shape=(unknown.size, unknown.size)
    ).tocsc()
    solution = np.asarray(spsolve(system, right)).reshape(unknown.size, channels)
    if noise > 0:
        solution = solution + (rng or np.random.default_rng(0)).normal(0.0, noise, solution.shape)
    result[:, unknown] = solution.T
    return result.reshape(image.shape)


@torch.no_grad()
def road_curves_many(
    score_fn: ScoreFn,
    pixels: torch.Tensor,
    saliencies: Sequence[np.ndarray],
    steps: int = 8,
    batch_size: int = 16,
    seed: int = 0,
    noise: float = ROAD_NOISE,
) -> list[Curves]:
    """ROAD curves (MoRF as ``deletion``, LeRF as ``insertion``) for one image and several maps.

    Step s removes the s/S most (MoRF) or least (LeRF) relevant pixels and imputes them with
    :func:`road_impute` (noise seeded per image from ``seed``). The unperturbed image is both
    curves' first point; every other point needs its own sparse solve (the last removes all
    pixels: there is nothing to impute from, so the image's mean colour is used).
    """
    _check_inputs(pixels, saliencies, steps)
    height, width = pixels.shape[-2:]
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.round(fractions * height * width).astype(np.int64)
    ranks = _ranks(saliencies, height, width, seed)
    image = pixels[0].detach().cpu().double().numpy()
    mean_colour = torch.from_numpy(np.broadcast_to(image.mean(axis=(1, 2), keepdims=True), image.shape).copy())
    points = [(m, curve, step) for m in range(len(ranks)) for curve in ("morf", "lerf") for step in range(1, steps + 1)]

    def perturbed(i: int) -> torch.Tensor:
        m, curve, step = points[i]
        rank = ranks[m][0].numpy()
        removed = rank < counts[step] if curve == "morf" else rank >= height * width - counts[step]
        if removed.all():
            imputed = mean_colour
        else:
            imputed = torch.from_numpy(road_impute(image, removed, noise, np.random.default_rng([seed, i])))
        return imputed.to(pixels.dtype)[None].to(pixels.device)

    image_score = float(score_fn(pixels).detach().float().cpu().reshape(-1)[0])
    by_point = dict(zip(points, _score_batched(score_fn, perturbed, len(points), batch_size)))
    return [
        Curves(
            fractions=fractions,
            deletion=np.array([image_score, *(by_point[(m, "morf", step)] for step in range(1, steps + 1))]),
            insertion=np.array([image_score, *(by_point[(m, "lerf", step)] for step in range(1, steps + 1))]),
        )
        for m in range(len(ranks))
    ]


def verify_maps(
    score_fn: ScoreFn,
    pixels: torch.Tensor,
    saliencies: Sequence[np.ndarray],
    grid: tuple[int, int],
    steps: int,
    batch_size: int = 32,
    seed: int = 0,
) -> list[Faithfulness]:
    """Deletion and insertion AUC (blur baseline) of each (H, W) map of one (1, 3, H, W) image
    against a smooth random map on ``grid`` (the map's own grid), seeded per map.

    ``score_fn`` scores the explained target (the cosine for ``similar``, its negation for
    ``dissimilar``). Cost: ``4 (steps - 1)`` images per map plus 2 shared end points.
    """
    height, width = pixels.shape[-2:]
    randoms = [smooth_random_map((height, width), grid, seed + number) for number in range(len(saliencies))]
    curves = deletion_insertion_many(
        score_fn, pixels, [*saliencies, *randoms], baseline_image(pixels, "blur"), steps, batch_size, seed
    )
    count = len(saliencies)
    return [
        Faithfulness(
            deletion_auc=curves[m].deletion_auc,
            insertion_auc=curves[m].insertion_auc,
            random_deletion_auc=curves[count + m].deletion_auc,
            random_insertion_auc=curves[count + m].insertion_auc,
            steps=steps,
        )
        for m in range(count)
    ]


def feature_grid(model: torch.nn.Module, layer: torch.nn.Module, reshape_transform, pixels: torch.Tensor) -> tuple[int, int]:
    """(h, w) of ``layer``'s map for ``pixels`` (one forward pass): the grid a CAM on it upsamples from."""
    grid: list[tuple[int, int]] = []

    def hook(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        activations = reshape_transform(output) if reshape_transform is not None else output
        grid.append(tuple(int(v) for v in activations.shape[-2:]))

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(pixels)
    finally:
        handle.remove()
    return grid[0]


def verify_explanation(
    encoder,
    query_pixels: torch.Tensor,
    reference_pixels: torch.Tensor,
    query_vector: torch.Tensor,
    reference_vectors: torch.Tensor,
    query_heatmaps: np.ndarray | None,
    reference_heatmaps: np.ndarray | None,
    native: bool,
    polarity: str,
    pixel_embedder: PixelEmbedder | None = None,
    steps: int = VERIFY_STEPS,
    layer: torch.nn.Module | None = None,
) -> tuple[tuple[Faithfulness, ...] | None, tuple[Faithfulness, ...] | None]:
    """:func:`verify_maps` for every map of an explained retrieval (``ExplainOptions.verify``).

    ``query_heatmaps`` (K, H, W) explain the query (1, 3, H, W) against reference k,
    ``reference_heatmaps`` (K, H, W) reference k against the query; raw maps (K, h, w) when
    ``native``, finished here first. The random map's grid is the maps' own (native maps) or that
    of ``layer``, the layer the method hooked (default: the target layer; one forward pass); map
    k of either side uses seed k. Perturbed images go
    through ``pixel_embedder`` (the ONNX Runtime session) when given, else the torch model.
    """
    sign = -1.0 if polarity == "dissimilar" else 1.0
    size = tuple(int(v) for v in query_pixels.shape[-2:])

    def embed(images: torch.Tensor) -> torch.Tensor:
        if pixel_embedder is not None:
            vectors = torch.from_numpy(np.asarray(pixel_embedder(images.detach().cpu().numpy()), dtype=np.float32))
        else:
            with torch.no_grad():
                vectors = encoder.model(images).float().cpu()
        return F.normalize(vectors, dim=1)

    grids: list[tuple[int, int]] = []  # the hooked layer's grid: one forward pass for both sides

    def finished(maps: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        if native:
            return finish_maps(torch.from_numpy(np.asarray(maps, np.float32))[:, None], size)[:, 0].numpy(), tuple(maps.shape[-2:])
        if not grids:
            grids.append(feature_grid(encoder.model, layer or encoder.target_layer, encoder.reshape_transform, query_pixels[:1]))
        return maps, grids[0]

    def side(pixels: torch.Tensor, maps: np.ndarray | None, reference_of) -> tuple[Faithfulness, ...] | None:
        if maps is None:
            return None
        maps, grid = finished(maps)
        results = []
        for k in range(maps.shape[0]):
            reference = F.normalize(reference_of(k).detach().float().cpu().reshape(1, -1), dim=1)
            image = pixels[k : k + 1] if pixels.shape[0] > 1 else pixels

            def score(images: torch.Tensor) -> torch.Tensor:
                return sign * (embed(images) @ reference.T)[:, 0]

            results.append(verify_maps(score, image, [maps[k]], grid, steps, seed=k)[0])
        return tuple(results)

    return (
        side(query_pixels, query_heatmaps, lambda k: reference_vectors[k]),
        side(reference_pixels, reference_heatmaps, lambda k: query_vector[0]),
    )
