"""Similarity targets: model output (B, D) -> one score per (image, reference) (B, K).

A target is a plain callable on the model output, as in pytorch-grad-cam. The main one is the
cosine similarity between an image's embedding and each reference embedding; ``dissimilar``
explains the negated cosine (what pulls the image *away* from the reference) and is the same
code path with the sign flipped. :func:`similarity_target` returns a :class:`CosineTarget`, which
also tells the methods that need them its reference directions and its polarity.

``target="projection"`` (:class:`ProjectionTarget`) explains e . r_hat instead, the projection
of the explained image's embedding e onto the reference's unit direction: |e| cos(e, r). It is
the score that explains a ranking additively. On the query side (e the query, r_hat each hit)
|e_q| is the same for every hit, so the projection ranks the hits exactly as the cosine does;
on the retrieved side (e each hit, r_hat the query) |e_h| differs from hit to hit and it does
not. For an embedding that is the mean of the target layer's activations A(i) it is linear in
them, e . r_hat = sum_i A(i) . r_hat / HW: GradCAM's channel weights are then r_hat / HW at every
location and its map before the ReLU is exactly that share, where the cosine's gradient
(r_hat - s e_hat) / |e| is orthogonal to e and the cosine GradCAM map sums to zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from histoxplain_model.errors import InvalidRequest, UnknownNameError
from histoxplain_model.vocabulary import DEFAULT_TARGET, POLARITIES, TARGETS, Polarity, check_name

__all__ = [
    "CosineTarget",
    "Polarity",
    "POLARITIES",
    "ProjectionTarget",
    "SimilarityTarget",
    "check_polarity",
    "cosine_scores",
    "projection_scores",
    "similarity_target",
]


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


def projection_scores(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Projection e . r_hat of every embedding onto every unit reference direction.

    ``embeddings`` (B, D), not normalised (their length is part of the score); ``references``
    (K, D), normalised here; returns (B, K). Differentiable with respect to ``embeddings``.
    """
    return embeddings @ F.normalize(references, dim=-1).T


@dataclass(frozen=True, eq=False)
class CosineTarget:
    """The cosine target of :func:`similarity_target`: embeddings (B, D) -> scores (B, K).

    A plain callable for the methods that only differentiate it (GradCAM, GradCAM++); the
    methods that need more than the score read its parts: the similarity decomposition its
    reference directions (:meth:`unit_references`), SmoothGrad's signed dissimilar form its
    ``polarity``.

    references: (K, D) float32, detached copies (not normalised); polarity: "similar" or
    "dissimilar" (the score is then the negated cosine).
    """

    references: torch.Tensor
    polarity: Polarity
    #: Whether the score divides by the explained embedding's length (the cosine does, the
    #: projection does not); the similarity decomposition divides its shares the same way.
    normalises_embedding = True

    @property
    def sign(self) -> float:
        """+1 for "similar", -1 for "dissimilar": the factor applied to the cosine."""
        return -1.0 if self.polarity == "dissimilar" else 1.0

    def unit_references(self, like: torch.Tensor) -> torch.Tensor:
        """(K, D) unit reference directions r / |r| on ``like``'s device and dtype."""
        return F.normalize(self.references.to(like.device, like.dtype), dim=-1)

    def check_dim(self, embeddings: torch.Tensor) -> None:
        """Raise :class:`InvalidRequest` unless ``embeddings`` is (B, D) with the references' D."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.references.shape[1]:
            raise InvalidRequest(
                f"the model gives embeddings of shape {tuple(embeddings.shape)} but the "
                f"references are {self.references.shape[1]}-d: use references from the same encoder"
            )

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        self.check_dim(embeddings)
        return self.sign * cosine_scores(embeddings, self.references.to(embeddings.device, embeddings.dtype))


@dataclass(frozen=True, eq=False)
class ProjectionTarget(CosineTarget):
    """The projection target: embeddings (B, D) -> sign * e . r_hat (B, K) (module docstring).

    The same parts as :class:`CosineTarget` (the methods that read them treat both alike).
    """

    normalises_embedding = False

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        self.check_dim(embeddings)
        return self.sign * projection_scores(embeddings, self.references.to(embeddings.device, embeddings.dtype))


def similarity_target(references: torch.Tensor, polarity: str = "similar", target: str = DEFAULT_TARGET) -> CosineTarget:
    """Build the target ``embeddings (B, D) -> scores (B, K)`` for K reference embeddings.

    ``similar``: cosine similarity to each reference; ``dissimilar``: its negation.
    ``target``: "cosine" (default) or "projection" (:class:`ProjectionTarget`, e . r_hat);
    an unknown name raises :class:`UnknownNameError` listing the known ones.
    The references are detached and copied (no gradient flows into them, later in-place edits
    by the caller do not change the target).
    """
    checked = check_polarity(polarity)
    target_type = ProjectionTarget if check_name("target", target, TARGETS) == "projection" else CosineTarget
    if references.ndim != 2 or references.shape[0] == 0:
        raise InvalidRequest(
            f"references must be a non-empty (K, D) matrix of embeddings, got shape "
            f"{tuple(references.shape)}"
        )
    return target_type(references.detach().clone().float(), checked)
