"""RISE for similarity ("rise"): random smooth masks, each weighted by the similarity it leaves.

Petsiuk, Das and Saenko 2018 ("RISE: Randomized Input Sampling for Explanation of Black-box
Models", BMVC), with the class score replaced by the cosine similarity to a reference
embedding. N masks M_n (H, W) in [0, 1] are drawn as in the paper's section 3.2: a binary s x s
grid whose cells are 1 with probability p, upsampled bilinearly to (s + 1) x the cell size and
cropped to (H, W) at a random shift of up to one cell. The masked image keeps the image where
M_n = 1 and shows the fill where M_n = 0 (``fill``: the image's blurred copy, Gaussian sigma =
1/10 of its shorter side as the deletion/insertion baseline of the evaluation, or its mean
colour). With s_nk = cos(embedding of masked image n, reference k):

* ``similar``: the paper's eq. 6 (its Monte Carlo estimate of E[s | pixel i kept]),

      S_k(i) = sum_n M_n(i) s_nk / (N p),

  computed with the control variate mean_n s_nk, i.e. as the mean-centred

      C_k(i) = sum_n M_n(i) (s_nk - mean_n s_nk) / (N p (1 - p))
             = (S_k(i) - mean_n s_nk * mean_n M_n(i) / p) / (1 - p).

  Since E[M_n(i)] = p at every pixel, C_k has the expectation of S_k up to a constant and a
  positive factor (up to O(1/N)), which the per-map min-max removes: the same map, without the
  paper form's noise from how often each pixel happened to be kept, which is
  about mean s * sqrt((1 - p) / (N p)) (0.05 for a mean cosine of 0.85 at N = 300, p = 0.5)
  and drowns the signal when the cosine moves little under masking: on the hand-built model of
  tests/unit/model/test_rise.py (only the top-left quarter is seen), S_k at N = 300 gave the
  quarter a mean of 0.56 against 0.48 elsewhere after the min-max, C_k clears the test's
  0.6 / 0.35 bounds. For binary masks C_k(i) estimates E[s | i kept] -
  E[s | i hidden] (the covariance of "i is kept" with the cosine over the variance p(1 - p) of a
  kept cell): how much showing region i changes the similarity, drawn signed (min-max).

* ``dissimilar``: ReLU(-C_k(i)), the regions whose presence lowers the similarity, 0 where
  showing them raises it. The paper's form with s replaced by -s was not chosen: it is -S_k,
  which after the per-map min-max is exactly 1 - the similar map, a mirror that shows nothing
  new; the clamp keeps only the regions that really pull the cosine down.

Both maps are at the input resolution and min-max normalised like every method's.

Cost: no gradients, no target layer, no assumption about pooling (CLS-pooled ViTs work): N
forward passes of each explained image, ``batch_size`` masked images per pass, plus one of the
clean image. The K references share them: the query explained against k hits costs the same N
passes as against one. The retrieved side explains each of the k hits against the query, so it
costs N passes per hit (k N in all). The masked images go through ``pixel_embedder`` when one is
given (the embedded backend's ONNX Runtime session), else the torch model under
``torch.inference_mode``.

Determinism: the grids and shifts are drawn once per call by a CPU ``torch.Generator`` seeded with
``options.seed`` (the same numbers on every device, as SmoothGrad's noise), and every image of a
batch gets the same masks, so an image's map does not depend on the batch, on ``batch_size`` or
on which other references are explained with it. The stop signal is checked between batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn

from histoxplain_model.deadlines import check_deadline
from histoxplain_model.errors import InvalidRequest
from histoxplain_model.options import RiseOptions, options_or_defaults
from histoxplain_model.saliency.base import Explainer, ReshapeTransform, normalise_maps
from histoxplain_model.saliency.targets import SimilarityTarget

__all__ = ["PixelEmbedder", "Rise", "fill_image", "mask_grids", "masks_at"]

#: (n, 3, H, W) float32 preprocessed pixels -> (n, D) float32, the model's own embeddings, not
#: normalised (the ONNX Runtime path: ``OnnxEmbedder.embed_raw``).
PixelEmbedder = Callable[[np.ndarray], np.ndarray]


def fill_image(pixels: torch.Tensor, fill: str) -> torch.Tensor:
    """What hidden cells show, for (B, 3, H, W) pixels: "mean", each image's mean colour;
    "blur", the image blurred with a Gaussian of sigma = max(1, 1/10 of the shorter side)
    (torchvision's reflect-padded blur; radius 3 sigma)."""
    if fill == "mean":
        return pixels.mean(dim=(-2, -1), keepdim=True).expand_as(pixels)
    side = min(pixels.shape[-2:])
    sigma = max(1.0, side / 10)
    width = 2 * min(int(3 * sigma), side - 1) + 1  # reflect padding needs a pad smaller than the image
    # The Gaussian is separable: a row pass then a column pass (a size-1 kernel leaves that axis
    # alone) costs 2 x 135 instead of 135 x 135 multiply-adds a pixel at 224 px (radius 67).
    rows = TF.gaussian_blur(pixels, [width, 1], [sigma, sigma])
    return TF.gaussian_blur(rows, [1, width], [sigma, sigma])


def mask_grids(options: RiseOptions, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The N masks' random parts, drawn on the CPU from ``options.seed``: binary grids
    (N, 1, s, s) float32 (1 with probability p), shifts (N, 2) int64 (dy, dx) within one cell,
    and the cell size (ceil(H / s), ceil(W / s))."""
    generator = torch.Generator(device="cpu").manual_seed(options.seed)
    cells = options.grid
    grids = (torch.rand((options.n_masks, 1, cells, cells), generator=generator) < options.keep_probability).float()
    cell = (math.ceil(size[0] / cells), math.ceil(size[1] / cells))
    shifts = torch.stack(
        [torch.randint(0, cell[0], (options.n_masks,), generator=generator),
         torch.randint(0, cell[1], (options.n_masks,), generator=generator)],
        dim=1,
    )
    return grids, shifts, cell


def masks_at(grids: torch.Tensor, shifts: torch.Tensor, cell: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Smooth masks (n, H, W) in [0, 1] from ``mask_grids`` rows: each grid upsampled bilinearly
    to (s + 1) cells per side and cropped to ``size`` at its shift (Petsiuk et al. sec. 3.2)."""
    cells = grids.shape[-1]
    upsampled = F.interpolate(grids, size=((cells + 1) * cell[0], (cells + 1) * cell[1]), mode="bilinear", align_corners=False)
    height, width = size
    return torch.stack([
        upsampled[n, 0, dy : dy + height, dx : dx + width] for n, (dy, dx) in enumerate(shifts.tolist())
    ])


class Rise(Explainer):
    """RISE applied to the similarity (module docstring). Takes only :class:`RiseOptions`.

    Maps: min-max of C_k (similar) or of ReLU(-C_k) (dissimilar), (B, K, H, W) in [0, 1].

    pixel_embedder: runs the masked images instead of the torch model (the ONNX Runtime session
    of the embedded backend); ``None``, the torch model. It returns the model's own embeddings,
    not normalised, so every target (the cosine, and the projection e . r_hat, which needs |e|)
    runs through it. The target layer and reshape are unused.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | None = None,
        reshape_transform: ReshapeTransform | None = None,
        options: RiseOptions | None = None,
        pixel_embedder: PixelEmbedder | None = None,
    ) -> None:
        super().__init__(model, target_layer, reshape_transform)
        self.options = options_or_defaults(RiseOptions, options, type(self).__name__)
        self.pixel_embedder = pixel_embedder

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) -> (n, D) float32 embeddings on the pixels' device, no autograd; through
        ``pixel_embedder`` when there is one (class docstring)."""
        if self.pixel_embedder is not None:
            vectors = self.pixel_embedder(pixels.detach().cpu().numpy())
            return torch.from_numpy(np.asarray(vectors, dtype=np.float32)).to(pixels.device)
        with torch.inference_mode():
            return self.model(pixels).float()

    def _heatmaps(self, pixels: torch.Tensor, target: SimilarityTarget) -> tuple[torch.Tensor, torch.Tensor]:
        check_deadline()
        embeddings = self._embed(pixels)
        clean_scores = target(embeddings).float()  # (B, K); also checks the references' dimension
        size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        grids, shifts, cell = mask_grids(self.options, size)
        dissimilar = getattr(target, "polarity", "similar") == "dissimilar"
        maps = torch.stack([
            self._image_map(image, clean, grids, shifts, cell, target, dissimilar)
            for image, clean in zip(pixels, clean_scores)
        ])
        return normalise_maps(maps), embeddings

    def _image_map(
        self,
        image: torch.Tensor,
        clean: torch.Tensor,
        grids: torch.Tensor,
        shifts: torch.Tensor,
        cell: tuple[int, int],
        target: SimilarityTarget,
        dissimilar: bool,
    ) -> torch.Tensor:
        """(K, H, W) raw map of one (3, H, W) image: N masked passes shared by the K references.

        The sums are kept relative to the clean image's score t0 (``clean``, (K,)): sum_n M_n(i)
        (t_nk - mean t) = sum_n M_n(i)(t_nk - t0) - (mean t - t0) sum_n M_n(i) exactly, without
        subtracting two sums of N whole cosines (float32 cancellation made the maps depend on
        the summation order at 1e-4)."""
        options = self.options
        size = (int(image.shape[-2]), int(image.shape[-1]))
        fill = fill_image(image[None], options.fill)[0]
        difference = image - fill
        weighted: torch.Tensor | None = None  # sum_n M_n(i) (t_nk - t0_k)   (K, H, W)
        kept = torch.zeros(size, dtype=torch.float32, device=image.device)  # sum_n M_n(i)
        score_sum: torch.Tensor | None = None  # sum_n (t_nk - t0_k)   (K,)
        for start in range(0, options.n_masks, options.batch_size):
            check_deadline()
            stop = min(start + options.batch_size, options.n_masks)
            masks = masks_at(grids[start:stop], shifts[start:stop], cell, size).to(image.device)
            masked = fill[None] + masks[:, None].to(image.dtype) * difference[None]
            # t_nk: the target (the cosine, or its negation for the dissimilar polarity).
            scores = target(self._embed(masked)).float() - clean  # (n, K): t_nk - t0_k
            batch_weighted = torch.einsum("nhw,nk->khw", masks, scores)
            weighted = batch_weighted if weighted is None else weighted.add_(batch_weighted)
            kept.add_(masks.sum(dim=0))
            score_sum = scores.sum(dim=0) if score_sum is None else score_sum.add_(scores.sum(dim=0))
        if weighted is None or score_sum is None:  # unreachable: RiseOptions checks n_masks >= 1
            raise InvalidRequest("n_masks (RISE masks) must be >= 1")
        p, n = options.keep_probability, options.n_masks
        # sum_n M_n(i) (t_nk - mean_n t_nk) / (N p (1 - p)): C_k(i) of the module docstring (the
        # shift by t0 cancels here).
        centred = (weighted - (score_sum / n)[:, None, None] * kept[None]) / (n * p * (1 - p))
        # Dissimilar: t = -cos, so ReLU(C_t) is ReLU(-C_cos), the regions that lower the cosine.
        return centred.clamp_(min=0) if dissimilar else centred
