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

Exactness is checked on every call: the mean of the per-location embeddings must give the
model's own embedding (relative deviation <= ``EXACTNESS_TOLERANCE``). Where it does not, the
method is not available for the encoder and :class:`FailedPrecondition` says so: a ViT pooled
by its CLS token (UNI, Phikon, Lunit DINO, HistoEncoder's XCiT), a Swin whose final LayerNorm
follows the target layer (CTransPath), a pooling other than the mean, or a head with a
non-linearity. No approximation is offered for those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from histoxplain_model.deadlines import check_deadline
from histoxplain_model.errors import FailedPrecondition, InvalidRequest
from histoxplain_model.options import SimMapOptions
from histoxplain_model.saliency.base import LayerMapExplainer, check_feature_map, forward_capturing
from histoxplain_model.saliency.targets import CosineTarget, SimilarityTarget, similarity_target
from histoxplain_model.vocabulary import METHOD_NAMES, SIMMAP

__all__ = ["EXACTNESS_TOLERANCE", "SimilarityDecomposition", "SimilarityMap", "linear_head"]

#: Largest |mean_i z(i) - e| / |e| accepted as the same embedding (float32 rounding is ~1e-7;
#: an encoder that is not mean-pooled misses by far more, e.g. 0.3 to 1 for a CLS-pooled ViT).
EXACTNESS_TOLERANCE = 1e-3


@dataclass(frozen=True)
class SimilarityDecomposition:
    """shares (B, K, h, w) float32: m(i) of image b against reference k, signed; they sum over
    (h, w) to ``cosines``. cosines (B, K): cos(e_b, r_k). embeddings (B, D): the model's output."""

    shares: torch.Tensor
    cosines: torch.Tensor
    embeddings: torch.Tensor

    def polarity_maps(self, polarity: str) -> torch.Tensor:
        """(B, K, h, w) >= 0: ReLU(m) for "similar", ReLU(s/HW - m) for "dissimilar" (module docstring)."""
        if polarity == "dissimilar":
            even_share = self.cosines / (self.shares.shape[-2] * self.shares.shape[-1])
            return (even_share[..., None, None] - self.shares).clamp_(min=0)
        return self.shares.clamp(min=0)


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The model's classifier when it is one ``nn.Linear`` (timm's ``get_classifier()``), else None.

    An identity head (timm with ``num_classes=0``, every preset) needs nothing; any other head is
    left out here and then fails the exactness check unless it really is the identity.
    """
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    return head if isinstance(head, nn.Linear) else None


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "pretrained_cfg", None)
    architecture = config.get("architecture") if isinstance(config, dict) else None
    return str(architecture or type(model).__name__)


class SimilarityMap(LayerMapExplainer[SimMapOptions]):
    """The exact per-location shares of the cosine similarity (module docstring), no gradients.

    Takes only :class:`SimMapOptions` (none). Needs the target layer whose mean-pooled
    activations (through a linear head, if the model has one) are the embedding: the CNN
    presets' GradCAM layer. Native maps (``explain(..., native=True)``) are the polarity's maps
    on the target layer's grid, >= 0, finished like GradCAM's.
    """

    options_type = SimMapOptions

    def decompose(self, pixels: torch.Tensor, references: torch.Tensor) -> SimilarityDecomposition:
        """The signed shares of each image's cosine to each reference.

        pixels (B, 3, H, W) float, preprocessed; references (K, D) or (D,), normalised or not.
        Raises :class:`FailedPrecondition` where the encoder is not mean-pooled (module docstring).
        """
        if references.ndim == 1:
            references = references[None]
        return self._decompose(pixels.detach(), similarity_target(references))

    def location_embeddings(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z (B, h, w, D): per-location embeddings whose mean over (h, w) is the embedding,
        the model output (B, D)); one forward pass, no autograd. Not checked for exactness."""
        check_deadline()
        target_layer: nn.Module = self.target_layer  # set in __init__
        activations, embeddings = forward_capturing(self.model, target_layer, pixels, start_graph=False)
        if self.reshape_transform is not None:
            activations = self.reshape_transform(activations)
        check_feature_map(activations)
        locations = activations.permute(0, 2, 3, 1).float()  # (B, h, w, C)
        head = linear_head(self.model)
        if head is not None and locations.shape[-1] == head.in_features:
            # Every location gets W A(i) + b: the mean over locations keeps b once (b/HW each).
            locations = F.linear(locations, head.weight.float(), None if head.bias is None else head.bias.float())
        return locations, embeddings.detach()

    @torch.no_grad()  # nothing here needs a gradient (the head's weights would record a graph)
    def _decompose(self, pixels: torch.Tensor, target: CosineTarget) -> SimilarityDecomposition:
        locations, embeddings = self.location_embeddings(pixels)
        target.check_dim(embeddings)
        mean = locations.mean(dim=(1, 2))  # (B, D): the embedding, rebuilt from the locations
        self._check_exact(locations, mean, embeddings.float())
        unit_references = target.unit_references(locations)  # (K, D)
        norms = mean.norm(dim=1).clamp_(min=1e-12)  # F.normalize's eps: a zero embedding has 0 shares
        count = locations.shape[1] * locations.shape[2]
        shares = torch.einsum("bhwd,kd->bkhw", locations, unit_references).div_((count * norms)[:, None, None, None])
        cosines = (mean @ unit_references.T) / norms[:, None]
        return SimilarityDecomposition(shares, cosines, embeddings)

    def _check_exact(self, locations: torch.Tensor, mean: torch.Tensor, embeddings: torch.Tensor) -> None:
        if mean.shape == embeddings.shape:
            scale = embeddings.norm(dim=1).clamp(min=1e-12)
            deviation = float(((mean - embeddings).norm(dim=1) / scale).max())
            if deviation <= EXACTNESS_TOLERANCE:
                return
            why = f"the mean of its target layer's map misses the embedding by {deviation:.2g} of its norm"
        else:
            why = f"its target layer has {locations.shape[-1]} channels, the embedding {embeddings.shape[-1]}"
        others = ", ".join(name for name in METHOD_NAMES if name != SIMMAP)
        raise FailedPrecondition(
            f"method {SIMMAP!r} is not available for this encoder ({_model_name(self.model)}): it needs an "
            f"embedding that is the mean of the target layer's activations (with at most a linear head), "
            f"and {why} (e.g. a CLS-pooled ViT); use {others}"
        )

    def _layer_maps(self, pixels: torch.Tensor, target: SimilarityTarget) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(target, CosineTarget):
            raise InvalidRequest(f"{SIMMAP} decomposes the cosine similarity: it needs a similarity_target(...)")
        decomposition = self._decompose(pixels, target)
        return decomposition.polarity_maps(target.polarity), decomposition.embeddings
