"""Similarity targets: model output (B, D) -> one score per (image, reference) (B, K).

A target is a plain callable on the model output, as in pytorch-grad-cam. The main one is the
cosine similarity between an image's embedding and each reference embedding; ``dissimilar``
explains the negated cosine (what pulls the image *away* from the reference) and is the same
code path with the sign flipped.
"""

from __future__ import annotations

from collections.abc import Callable


import torch
import torch.nn.functional as F

from histoxplain_model.errors import InvalidRequest, UnknownNameError
from histoxplain_model.vocabulary import POLARITIES, Polarity

__all__ = ["Polarity", "POLARITIES", "SimilarityTarget", "check_polarity", "similarity_target"]


SimilarityTarget = Callable[[torch.Tensor], torch.Tensor]


def check_polarity(polarity: str) -> Polarity:
    """Return ``polarity`` if known, else raise :class:`UnknownNameError` listing the known ones."""
    if polarity not in POLARITIES:
        raise UnknownNameError.for_name("polarity", str(polarity), POLARITIES)
    return polarity  # type: ignore[return-value]


def cosine_scores(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every embedding to every reference.

    ``embeddings`` (B, D) and ``references`` (K, D), neither needs to be normalised;
    returns (B, K) in [-1, 1]. Differentiable with respect to ``embeddings``.
    """
    return F.normalize(embeddings, dim=-1) @ F.normalize(references, dim=-1).T


def similarity_target(references: torch.Tensor, polarity: str = "similar") -> SimilarityTarget:
    """Build the target ``embeddings (B, D) -> scores (B, K)`` for K reference embeddings.

    ``similar``: cosine similarity to each reference; ``dissimilar``: its negation.
    The references are detached and copied (no gradient flows into them, later in-place edits
    by the caller do not change the target).
    """
    sign = -1.0 if check_polarity(polarity) == "dissimilar" else 1.0
    if references.ndim != 2 or references.shape[0] == 0:
        raise InvalidRequest(
            f"references must be a non-empty (K, D) matrix of embeddings, got shape "
            f"{tuple(references.shape)}"
        )
    fixed = references.detach().clone().float()

    def target(embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.ndim != 2 or embeddings.shape[1] != fixed.shape[1]:
            raise InvalidRequest(
                f"the model gives embeddings of shape {tuple(embeddings.shape)} but the "
                f"references are {fixed.shape[1]}-d: use references from the same encoder"
            )
        return sign * cosine_scores(embeddings, fixed.to(embeddings.device, embeddings.dtype))

    return target
