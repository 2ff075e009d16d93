"""The region-to-region correspondences of a retrieval explanation, from forward passes run anyway.

``explain_retrieval`` asks :class:`RegionMatcher` for the per-location embeddings of the query
and of the K references (``histoxplain_model.saliency.locations``) where it already runs each
image through the model:

1. embedding an image whose stored vector was not sent: one forward pass with the target layer
   captured gives both its embedding and its locations (instead of ``encoder.embed``);
2. else the explainer's own pass over the clean image (GradCAM, GradCAM++ and simmap run exactly
   one; the hooks of ``capturing_forward`` record it);
3. else (stored vectors and SmoothGrad, RISE, or a side not explained) one forward pass of that
   image, the only extra cost: at most one forward pass of each image, whatever k.

The pairs themselves are ``histoxplain_model.saliency.correspondences``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from histoxplain_model.results import RegionCorrespondence
from histoxplain_model.saliency import Explainer, LayerMapExplainer
from histoxplain_model.saliency.correspondences import region_correspondences
from histoxplain_model.saliency.locations import (
    capturing_forward,
    check_mean_pooled,
    forward_locations,
    location_embeddings,
)

__all__ = ["QUERY", "REFERENCES", "Embedder", "RegionMatcher"]

QUERY, REFERENCES = "query", "references"
_WHAT = "correspondences"
#: Preprocessed pixels (B, 3, H, W) -> L2-normalised embeddings (B, D).
Embedder = Callable[[torch.Tensor], torch.Tensor]


class RegionMatcher:
    """Per-request collector of the two images' location embeddings (module docstring).

    ``top`` 0 makes every method a no-op (:meth:`embed` answers None, :meth:`during` records
    nothing, :meth:`correspondences` answers None). Per-request state only: one per call.
    """

    def __init__(self, encoder: Any, explainer: Explainer, top: int) -> None:
        self.encoder = encoder
        self.top = top
        self.reuses_explainer_pass = isinstance(explainer, LayerMapExplainer)
        self.locations: dict[str, torch.Tensor] = {}

    def embedder(self, which: str) -> Embedder | None:
        """What embeds ``which``'s images (QUERY or REFERENCES) keeping their locations; None when
        no correspondences are asked (embed as usual)."""
        return (lambda pixels: self.embed(which, pixels)) if self.top else None

    def embed(self, which: str, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised embeddings of ``pixels``, their locations kept for ``which``."""
        locations, embeddings = forward_locations(
            self.encoder.model, self.encoder.target_layer, self.encoder.reshape_transform, pixels
        )
        self._keep(which, locations, embeddings)
        return F.normalize(embeddings.float(), dim=1)

    @contextmanager
    def during(self, which: str) -> Iterator[None]:
        """Record ``which``'s locations from the explainer pass run inside (when it runs one
        clean pass and they are still missing)."""
        if not (self.top and self.reuses_explainer_pass and which not in self.locations):
            yield
            return
        with capturing_forward(self.encoder.model, self.encoder.target_layer) as captured:
            yield
        activations, embeddings = captured()
        if len(activations) == 1 and len(embeddings) == 1:  # else: correspondences() runs its own pass
            locations = location_embeddings(self.encoder.model, activations[0], self.encoder.reshape_transform)
            self._keep(which, locations, embeddings[0])

    def correspondences(
        self,
        query_pixels: torch.Tensor,
        reference_pixels: torch.Tensor,
        query: np.ndarray,
        references: Sequence[np.ndarray],
    ) -> tuple[tuple[RegionCorrespondence, ...], ...] | None:
        """The top pairs of each reference (None when none are asked); ``query``/``references``
        are the images as sent, whose sizes the boxes are in."""
        if not self.top:
            return None
        for which, pixels in ((QUERY, query_pixels), (REFERENCES, reference_pixels)):
            if which not in self.locations:
                self.embed(which, pixels)
        return region_correspondences(
            self.locations[QUERY][0],
            self.locations[REFERENCES],
            self.top,
            _size(query),
            [_size(image) for image in references],
        )

    def _keep(self, which: str, locations: torch.Tensor, embeddings: torch.Tensor) -> None:
        check_mean_pooled(self.encoder.model, locations, embeddings, _WHAT)
        self.locations[which] = locations


def _size(image: np.ndarray) -> tuple[int, int]:
    return int(image.shape[0]), int(image.shape[1])
