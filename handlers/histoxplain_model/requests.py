"""What one retrieval explanation asks for: :class:`ExplainRequest`.

One frozen value instead of nine parameters copied through every layer: the domain builds it,
every model backend's ``explain(request, timeout)`` takes it, the TorchServe handler rebuilds it
from the wire (``histoxplain_model.wire.inputs``), and ``explain_retrieval`` runs it. It is
checked once, when it is built, so each layer gets the same errors with the same messages.

Torch-free: the gateway in front of TorchServe builds requests without loading a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.options import SaliencyOptions, check_options
from histoxplain_model.limits import MAX_CORRESPONDENCES
from histoxplain_model.vocabulary import DEFAULT_POLARITY, DEFAULT_SIDE, DEFAULT_TARGET, POLARITIES, SIDES, TARGETS, check_name

__all__ = ["ExplainRequest"]


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no single truth value
class ExplainRequest:
    """Explain ``query`` against each of ``references`` (and/or each reference against it).

    query: (H, W, 3) uint8 RGB. references: K >= 1 such images (kept as a tuple; not copied).
    method: a method name (``histoxplain_model.vocabulary.METHOD_NAMES``); polarity "similar"
        (default) or "dissimilar"; side "query", "retrieved" or "both" (default).
    options: the method's own options type (``histoxplain_model.options.OPTIONS_TYPES``);
        ``None`` is replaced by the method's defaults when the request is built.
    query_embedding (D,) / reference_embeddings (K, D): stored L2-normalised vectors of these
        very images from the encoder that will explain them (e.g. the index's), so it does not
        embed them again; ``None``: that side is embedded. Kept as float32 arrays.
    deadline: wall-clock time (``time.time()``) after which the explanation stops itself
        (``histoxplain_model.deadlines``); ``None``: none.
    target: "cosine" (default) or "projection": the score the maps explain
        (``histoxplain_model.saliency.targets``); the scores returned are the cosine either way.
    correspondences: 0 (default, none) or 1 to ``MAX_CORRESPONDENCES``: the top region-to-region
        correspondences of each pair (``histoxplain_model.saliency.correspondences``), beside
        any method.
    verify: also measure each map's deletion and insertion AUC against a random map of its own
        grid (``histoxplain_model.faithfulness.verify_explanation``; ``VERIFY_FORWARD_PASSES_PER_MAP``
        forward passes per map).

    Raises (when built):
        UnknownNameError: an unknown method, polarity or side (the message lists the known ones).
        InvalidRequest: another method's options, no references, or embeddings of the wrong
            shape or with non-finite values.
    """

    query: np.ndarray
    references: Sequence[np.ndarray]
    method: str
    polarity: str = DEFAULT_POLARITY
    side: str = DEFAULT_SIDE
    options: SaliencyOptions | None = None
    query_embedding: np.ndarray | None = None
    reference_embeddings: np.ndarray | None = None
    deadline: float | None = None
    target: str = DEFAULT_TARGET
    correspondences: int = 0
    verify: bool = False

    def __post_init__(self) -> None:
        # object.__setattr__: the documented way to normalise fields of a frozen dataclass.
        object.__setattr__(self, "options", check_options(self.method, self.options))
        check_name("polarity", self.polarity, POLARITIES)
        check_name("side", self.side, SIDES)
        check_name("target", self.target, TARGETS)
        if not isinstance(self.verify, bool):
            raise InvalidRequest("verify must be true or false")
        if isinstance(self.correspondences, bool) or not isinstance(self.correspondences, int) or not (
            0 <= self.correspondences <= MAX_CORRESPONDENCES
        ):
            raise InvalidRequest(f"correspondences must be an integer from 0 to {MAX_CORRESPONDENCES} (0: none)")
        references = tuple(self.references)
        if not references:
            raise InvalidRequest("no reference images to explain against; give at least one")
        if self.deadline is not None and not math.isfinite(self.deadline):
            raise InvalidRequest("deadline must be a finite time in seconds since the epoch")
        object.__setattr__(self, "references", references)
        query_vector, reference_vectors = _checked_embeddings(
            self.query_embedding, self.reference_embeddings, len(references), None
        )
        object.__setattr__(self, "query_embedding", query_vector)
        object.__setattr__(self, "reference_embeddings", reference_vectors)

    def check_embedding_dim(self, dim: int) -> None:
        """Raise :class:`InvalidRequest` unless the given embeddings are ``dim``-d (the D of the
        encoder that will explain them; only the backend knows it)."""
        _checked_embeddings(self.query_embedding, self.reference_embeddings, len(self.references), dim)


def _checked_embeddings(
    query_embedding: np.ndarray | None, reference_embeddings: np.ndarray | None, count: int, dim: int | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Given embeddings as float32 ``(D,)`` and ``(count, D)`` (``dim``: the encoder's D, if known).

    Raises:
        InvalidRequest: a shape that does not fit, or a value that is not finite.
    """
    checked: list[np.ndarray | None] = []
    for name, given, shape in (
        ("query_embedding", query_embedding, (dim,)),
        ("reference_embeddings", reference_embeddings, (count, dim)),
    ):
        if given is None:
            checked.append(None)
            continue
        vectors = np.asarray(given, dtype=np.float32)
        fits = vectors.ndim == len(shape) and all(want is None or got == want for got, want in zip(vectors.shape, shape))
        if not fits or vectors.shape[-1] == 0:
            wanted = "x".join("D" if want is None else str(want) for want in shape)
            raise InvalidRequest(f"{name} has shape {vectors.shape}; expected ({wanted}) from the served encoder")
        if not np.isfinite(vectors).all():
            raise InvalidRequest(f"{name} has NaN or infinite values; send the stored embeddings unchanged")
        checked.append(vectors)
    query_vector, reference_vectors = checked
    if query_vector is not None and reference_vectors is not None and query_vector.shape[0] != reference_vectors.shape[1]:
        raise InvalidRequest(
            f"query_embedding is {query_vector.shape[0]}-d but reference_embeddings are "
            f"{reference_vectors.shape[1]}-d; use embeddings from the same encoder"
        )
    return query_vector, reference_vectors
