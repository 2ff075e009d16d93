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

from typing import Any

import numpy as np
import torch

from histoxplain_model.deadlines import check_deadline, deadline
from histoxplain_model.errors import InvalidRequest
from histoxplain_model.faithfulness import verify_explanation
from histoxplain_model.matching import QUERY, REFERENCES, Embedder, RegionMatcher
from histoxplain_model.requests import ExplainRequest
from histoxplain_model.results import RetrievalExplanation
from histoxplain_model.saliency import PixelEmbedder, get_explainer
from histoxplain_model.vocabulary import GRADCAM

__all__ = ["explain_retrieval"]


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _embeddings(
    encoder: Any, pixels: torch.Tensor, given: np.ndarray | None, count: int, embed: Embedder | None = None
) -> torch.Tensor:
    """(count, D): the given vectors, else ``embed`` (default ``encoder.embed``) of ``pixels``."""
    if given is None:
        return (embed or encoder.embed)(pixels).float()
    vectors = torch.as_tensor(np.asarray(given, dtype=np.float32)).reshape(count, -1)
    return vectors.to(pixels.device)


def explain_retrieval(
    encoder: Any, request: ExplainRequest, *, native_cams: bool = False, pixel_embedder: PixelEmbedder | None = None
) -> RetrievalExplanation:
    """Explain why the request's query and each of its K reference images are similar (or
    dissimilar); the request was checked when it was built (:class:`ExplainRequest`).

    The request's stored embeddings, when given, must come from this encoder; they replace
    embedding that side.
    native_cams: CAM methods and simmap return raw maps at the target layer's resolution with ``map_size``
    set (a few hundred bytes a map instead of H*W values; see :meth:`RetrievalExplanation.finished`).
    pixel_embedder: the backend's faster embedder (ONNX Runtime), for rise's masked images.
    """
    layer = encoder.gradcam_layer if request.method == GRADCAM else encoder.target_layer
    explainer = get_explainer(
        request.method, encoder.model, layer, encoder.reshape_transform, request.options,
        pixel_embedder=pixel_embedder,
    )
    device = _model_device(encoder.model)
    query_pixels = encoder.preprocess([request.query]).to(device)
    reference_pixels = encoder.preprocess(list(request.references)).to(device)
    count = reference_pixels.shape[0]
    matcher = RegionMatcher(encoder, explainer, request.correspondences)
    query_vector = _embeddings(encoder, query_pixels, request.query_embedding, 1, matcher.embedder(QUERY))
    reference_vectors = _embeddings(
        encoder, reference_pixels, request.reference_embeddings, count, matcher.embedder(REFERENCES)
    )
    if query_vector.shape[1] != reference_vectors.shape[1]:
        raise InvalidRequest(
            f"query embedding is {query_vector.shape[1]}-d but the references are "
            f"{reference_vectors.shape[1]}-d: use embeddings from the same encoder"
        )

    polarity, side = request.polarity, request.side
    query_heatmaps = reference_heatmaps = None
    native = False
    with deadline(request.deadline):
        if side in ("query", "both"):
            check_deadline()
            with matcher.during(QUERY):
                result = explainer.explain(
                    query_pixels, reference_vectors, polarity, native=native_cams, target=request.target
                )
            query_heatmaps, native = result.heatmaps[0], result.native
        if side in ("retrieved", "both"):
            check_deadline()
            # (K, 1, H, W): reference k against the single query embedding.
            with matcher.during(REFERENCES):
                result = explainer.explain(
                    reference_pixels, query_vector, polarity, native=native_cams, target=request.target
                )
            reference_heatmaps, native = result.heatmaps[:, 0], result.native
        check_deadline()
        correspondences = matcher.correspondences(query_pixels, reference_pixels, request.query, request.references)
        verified = (None, None)
        if request.verify:
            verified = verify_explanation(
                encoder, query_pixels, reference_pixels, query_vector, reference_vectors, query_heatmaps,
                reference_heatmaps, native, polarity, pixel_embedder, layer=layer,
            )
    scores = torch.nn.functional.cosine_similarity(query_vector, reference_vectors, dim=1)
    return RetrievalExplanation(
        method=request.method,
        polarity=polarity,
        scores=scores.detach().float().cpu().numpy(),
        query_heatmaps=query_heatmaps,
        reference_heatmaps=reference_heatmaps,
        map_size=(int(query_pixels.shape[-2]), int(query_pixels.shape[-1])) if native else None,
        correspondences=correspondences,
        query_faithfulness=verified[0],
        reference_faithfulness=verified[1],
    )
