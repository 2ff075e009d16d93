"""Explain a retrieval from both sides: the query against each hit, each hit against the query.

The encoder is duck-typed (``histoxplain_model.encoders.Encoder`` or anything with the same
attributes): ``model`` (pixels -> unnormalised embeddings, eval mode), ``target_layer``,
``reshape_transform``, ``preprocess(images) -> (B,3,H,W) float32`` and
``embed(pixels) -> (B,D)`` L2-normalised.

Each side is ONE explainer call: the query side explains the query (1,3,H,W) against the K
reference embeddings; the retrieved side explains the K references (K,3,H,W) each against the
query embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import numpy as np
import torch

from histoxplain_model.errors import InvalidRequest, UnknownNameError
from histoxplain_model.options import MethodOptions
from histoxplain_model.saliency import check_method, check_polarity, get_explainer

__all__ = ["SIDES", "MethodOptions", "RetrievalExplanation", "Side", "explain_retrieval"]

Side = Literal["query", "retrieved", "both"]
SIDES: tuple[str, ...] = get_args(Side)


@dataclass(frozen=True)
class RetrievalExplanation:
    """Heatmaps at the model input resolution (H, W), float32 in [0, 1].

    scores (K,): cosine similarity of the query to each reference.
    query_heatmaps (K, H, W): the query explained against reference k (None unless side is
        "query" or "both").
    reference_heatmaps (K, H, W): reference k explained against the query (None unless side is
        "retrieved" or "both").
    map_size: None for finished maps. (H, W) when the heatmaps are raw class activation maps
        (K, h, w) at the target layer's resolution (``explain_retrieval(..., native_cams=True)``,
        what the TorchServe handler sends); :meth:`finished` turns them into the maps above.
    """

    method: str
    polarity: str
    scores: np.ndarray
    query_heatmaps: np.ndarray | None
    reference_heatmaps: np.ndarray | None
    map_size: tuple[int, int] | None = None

    def finished(self) -> RetrievalExplanation:
        """The same explanation with finished maps (upsampled to ``map_size``, min-max; numpy)."""
        if self.map_size is None:
            return self
        from histoxplain_model.wire.cams import finish_cams

        def finish(maps: np.ndarray | None) -> np.ndarray | None:
            return None if maps is None else finish_cams(maps, self.map_size)

        return replace(
            self, query_heatmaps=finish(self.query_heatmaps), reference_heatmaps=finish(self.reference_heatmaps),
            map_size=None,
        )


def check_side(side: str) -> Side:
    """Return ``side`` if known, else raise :class:`UnknownNameError` listing the known ones."""
    if side not in SIDES:
        raise UnknownNameError.for_name("side", str(side), SIDES)
    return side  # type: ignore[return-value]


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _embeddings(
    encoder: Any, pixels: torch.Tensor, given: np.ndarray | None, count: int
) -> torch.Tensor:
    if given is None:
        return encoder.embed(pixels).float()
    vectors = torch.as_tensor(np.asarray(given, dtype=np.float32)).reshape(count, -1)
    return vectors.to(pixels.device)


def explain_retrieval(
    encoder: Any,
    query_image: np.ndarray,
    reference_images: Sequence[np.ndarray],
    method: str,
    polarity: str = "similar",
    side: str = "both",
    options: MethodOptions | None = None,
    *,
    query_embedding: np.ndarray | None = None,
    reference_embeddings: np.ndarray | None = None,
    native_cams: bool = False,
) -> RetrievalExplanation:
    """Explain why the query and each of the K reference images are similar (or dissimilar).

    query_image, reference_images: (H, W, 3) uint8 RGB; K >= 1.
    method: a name in ``histoxplain_model.saliency.METHODS``; polarity "similar"/"dissimilar";
    side "query", "retrieved" or "both".
    query_embedding (D,) / reference_embeddings (K, D): the stored vectors if the caller has
    them (e.g. from the index), to skip re-embedding; they must come from this encoder.
    native_cams: CAM methods return raw maps at the target layer's resolution with ``map_size``
    set (a few hundred bytes a map instead of H*W values; see :meth:`RetrievalExplanation.finished`).
    """
    check_method(method)
    polarity = check_polarity(polarity)
    side = check_side(side)
    if len(reference_images) == 0:
        raise InvalidRequest("no reference images to explain against: give at least one")
    explainer = get_explainer(
        method, encoder.model, encoder.target_layer, encoder.reshape_transform, options
    )
    device = _model_device(encoder.model)
    query_pixels = encoder.preprocess([query_image]).to(device)
    reference_pixels = encoder.preprocess(list(reference_images)).to(device)
    count = reference_pixels.shape[0]
    query_vector = _embeddings(encoder, query_pixels, query_embedding, 1)
    reference_vectors = _embeddings(encoder, reference_pixels, reference_embeddings, count)
    if query_vector.shape[1] != reference_vectors.shape[1]:
        raise InvalidRequest(
            f"query embedding is {query_vector.shape[1]}-d but the references are "
            f"{reference_vectors.shape[1]}-d: use embeddings from the same encoder"
        )

    query_heatmaps = reference_heatmaps = None
    native = False
    if side in ("query", "both"):
        result = explainer.explain(query_pixels, reference_vectors, polarity, native=native_cams)
        query_heatmaps, native = result.heatmaps[0], result.native
    if side in ("retrieved", "both"):
        # (K, 1, H, W): reference k against the single query embedding.
        result = explainer.explain(reference_pixels, query_vector, polarity, native=native_cams)
        reference_heatmaps, native = result.heatmaps[:, 0], result.native
    scores = torch.nn.functional.cosine_similarity(query_vector, reference_vectors, dim=1)
    return RetrievalExplanation(
        method=method,
        polarity=polarity,
        scores=scores.detach().float().cpu().numpy(),
        query_heatmaps=query_heatmaps,
        reference_heatmaps=reference_heatmaps,
        map_size=(int(query_pixels.shape[-2]), int(query_pixels.shape[-1])) if native else None,
    )
