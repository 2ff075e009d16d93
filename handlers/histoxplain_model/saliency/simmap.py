"""The similarity decomposition ("simmap"): the cosine split exactly over the target layer's grid.

Stylianou et al. 2019 ("Visualizing deep similarity networks", WACV) and Zhu et al. 2019
("Visual explanation for deep metric learning"): when the embedding is the mean over locations
i of the target layer's activations A(i) (global average pooling, as every CNN preset here),
then with e = mean_i A(i), r the reference embedding and s = cos(e, r),

    m(i) = A(i) . r_hat / (HW |e|),      sum_i m(i) = e . r_hat / |e| = s   exactly.

A linear head after the pooling (e = W mean_i A(i) + b) is applied per location,
z(i) = W A(i) + b, so that mean_i z(i) = e: each location carries the whole bias before the
1/HW, i.e. an equal share b/HW of it. The map needs no backward pass: one forward pass of the
explained image gives its activations, and the K references only add a (HW x D) by (D x K)
product. On the retrieved side (a hit explained against the query) the same formula reads
m(j) = A_r(j) . q_hat / (HW |r|).

Polarity (the map drawn; :meth:`SimilarityMap.decompose` gives the signed shares):

* ``similar``: ReLU(m(i)), the locations' positive shares of the cosine.
* ``dissimilar``: ReLU(s/HW - m(i)) = ReLU((e - z(i)) . r_hat / (HW |e|)): how far a location
  falls short of an even share of the similarity, i.e. the share of -s relative to a uniform
  image (every location holding the mean feature e, each contributing s/HW). These are the
  locations that pull the similarity down; signed, s/HW - m(i) sums to zero over the locations
  (the shortfalls of the ones drawn equal the surplus of the others). The plain negative share ReLU(-m(i)) would be nearly always empty: after a ReLU the activations
  and embeddings are non-negative, so A(i) . r >= 0.

Projection target (``explain(..., target="projection")``): the shares of e . r_hat instead,
m(i) = A(i) . r_hat / HW (no 1/|e|), which sum to the projection; the polarities read the same
with the projection in place of s. This is also GradCAM's map for that target before its ReLU.

Exactness is checked on every call (``histoxplain_model.saliency.locations``): the mean of the
per-location embeddings must give the model's own embedding. Where it does not, the method is
not available for the encoder and :class:`FailedPrecondition` says so: a ViT pooled by its CLS
token (UNI, Phikon, Lunit DINO, HistoEncoder's XCiT), a Swin whose final LayerNorm follows the
target layer (CTransPath), a pooling other than the mean, or a head with a non-linearity. No
approximation is offered for those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from histoxplain_model.errors import FailedPrecondition, InvalidRequest
from histoxplain_model.options import SimMapOptions
from histoxplain_model.saliency.base import LayerMapExplainer
from histoxplain_model.saliency.locations import check_mean_pooled, forward_locations
from histoxplain_model.saliency.targets import CosineTarget, SimilarityTarget, similarity_target
from histoxplain_model.vocabulary import METHOD_NAMES, SIMMAP

__all__ = ["SimilarityDecomposition", "SimilarityMap"]


@dataclass(frozen=True)
class SimilarityDecomposition:
    """shares (B, K, h, w) float32: m(i) of image b against reference k, signed; they sum over
    (h, w) to ``totals``. cosines (B, K): cos(e_b, r_k). embeddings (B, D): the model's output.
    totals (B, K): what the shares decompose, the cosines (default) or, for the projection
    target, the projections e_b . r_hat_k."""

    shares: torch.Tensor
    cosines: torch.Tensor
    embeddings: torch.Tensor
    totals: torch.Tensor | None = None

    def polarity_maps(self, polarity: str) -> torch.Tensor:
        """(B, K, h, w) >= 0: ReLU(m) for "similar", ReLU(s/HW - m) for "dissimilar" (module docstring)."""
        if polarity == "dissimilar":
            total = self.cosines if self.totals is None else self.totals
            even_share = total / (self.shares.shape[-2] * self.shares.shape[-1])
            return (even_share[..., None, None] - self.shares).clamp_(min=0)
        return self.shares.clamp(min=0)


class SimilarityMap(LayerMapExplainer[SimMapOptions]):
    """The exact per-location shares of the cosine similarity (module docstring), no gradients.

    Takes only :class:`SimMapOptions` (none). Needs the target layer whose mean-pooled
    activations (through a linear head, if the model has one) are the embedding: the CNN
    presets' GradCAM layer. Native maps (``explain(..., native=True)``) are the polarity's maps
    on the target layer's grid, >= 0, finished like GradCAM's.
    """

    options_type = SimMapOptions

    def decompose(
        self, pixels: torch.Tensor, references: torch.Tensor, target: str = "cosine"
    ) -> SimilarityDecomposition:
        """The signed shares of each image's cosine (or projection, ``target="projection"``) to
        each reference.

        pixels (B, 3, H, W) float, preprocessed; references (K, D) or (D,), normalised or not.
        Raises :class:`FailedPrecondition` where the encoder is not mean-pooled (module docstring).
        """
        if references.ndim == 1:
            references = references[None]
        return self._decompose(pixels.detach(), similarity_target(references, target=target))

    @torch.no_grad()  # nothing here needs a gradient
    def _decompose(self, pixels: torch.Tensor, target: CosineTarget) -> SimilarityDecomposition:
        target_layer: nn.Module = self.target_layer  # set in __init__
        locations, embeddings = forward_locations(self.model, target_layer, self.reshape_transform, pixels)
        target.check_dim(embeddings)
        try:
            mean = check_mean_pooled(self.model, locations, embeddings, f"method {SIMMAP!r}")
        except FailedPrecondition as error:
            others = ", ".join(name for name in METHOD_NAMES if name != SIMMAP)
            raise FailedPrecondition(f"{error}; use {others}") from None
        unit_references = target.unit_references(locations)  # (K, D)
        norms = mean.norm(dim=1).clamp_(min=1e-12)  # F.normalize's eps: a zero embedding has 0 shares
        count = locations.shape[1] * locations.shape[2]
        divisor = count * norms if target.normalises_embedding else torch.full_like(norms, count)
        projections = mean @ unit_references.T  # (B, K)
        shares = torch.einsum("bhwd,kd->bkhw", locations, unit_references).div_(divisor[:, None, None, None])
        cosines = projections / norms[:, None]
        totals = None if target.normalises_embedding else projections
        return SimilarityDecomposition(shares, cosines, embeddings, totals)

    def _layer_maps(self, pixels: torch.Tensor, target: SimilarityTarget) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(target, CosineTarget):
            raise InvalidRequest(f"{SIMMAP} decomposes the cosine similarity: it needs a similarity_target(...)")
        decomposition = self._decompose(pixels, target)
        return decomposition.polarity_maps(target.polarity), decomposition.embeddings
