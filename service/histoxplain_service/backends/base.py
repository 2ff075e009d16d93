"""The contract every model backend fulfils (in-process library or TorchServe)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from histoxplain_model.explain import RetrievalExplanation
    from histoxplain_model.options import MethodOptions


@dataclass(frozen=True)
class ModelInfo:
    """What the served encoder is: enough for a client to interpret embeddings and heatmaps."""

    preset: str
    architecture: str
    embedding_dim: int
    input_size: tuple[int, int]
    methods: tuple[str, ...]
    backend: str


class ModelBackend(Protocol):
    """Embeds images and explains similarities. Synchronous: the gateway calls it in a thread.

    ``timeout`` is the seconds left for the call (``None``: no deadline); a backend that cannot
    finish in time raises :class:`histoxplain_model.errors.DeadlineExceeded`.
    """

    def info(self) -> ModelInfo: ...

    def embed(self, images: Sequence[np.ndarray], timeout: float | None = None) -> np.ndarray:
        """``images``: (H, W, 3) uint8 RGB each -> (B, D) float32, L2-normalised rows."""
        ...

    def explain(
        self,
        query: np.ndarray,
        references: Sequence[np.ndarray],
        method: str,
        polarity: str = "similar",
        side: str = "both",
        timeout: float | None = None,
        options: MethodOptions | None = None,
        query_embedding: np.ndarray | None = None,
        reference_embeddings: np.ndarray | None = None,
    ) -> RetrievalExplanation:
        """Explain ``query`` against each of ``references`` (and/or each reference against it).

        ``options``: the method's options (e.g. SmoothGrad's samples and noise); ``None`` is
        the library defaults.
        ``query_embedding`` (D,) / ``reference_embeddings`` (K, D) float32: stored L2-normalised
        vectors of these very images from THIS encoder (e.g. the index's vectors), so the backend
        does not embed them again; each ``None``: the backend embeds that side itself. A shape
        that does not fit raises :class:`histoxplain_model.errors.InvalidRequest`.
        """
        ...

    def ready(self) -> bool:
        """True once the model has answered (health checks)."""
        ...

    def close(self) -> None: ...


def check_embeddings(
    query_embedding: np.ndarray | None, reference_embeddings: np.ndarray | None, count: int, dim: int | None = None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Given embeddings as float32 ``(D,)`` and ``(count, D)`` (``dim``: the encoder's D, if known).

    Raises:
        InvalidRequest: a shape that does not fit, or a value that is not finite.
    """
    from histoxplain_model.errors import InvalidRequest

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
