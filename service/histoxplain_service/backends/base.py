"""The contract every model backend fulfils (in-process library or TorchServe)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from histoxplain_model.requests import ExplainRequest
from histoxplain_model.results import ModelInfo, RetrievalExplanation


class ModelBackend(Protocol):
    """Embeds images and explains similarities. Synchronous: the gateway calls it in a thread.

    ``timeout`` is the seconds left for the call (``None``: no deadline); a backend that cannot
    finish in time raises :class:`histoxplain_model.errors.DeadlineExceeded`.
    """

    def info(self) -> ModelInfo: ...

    def embed(self, images: Sequence[np.ndarray], timeout: float | None = None) -> np.ndarray:
        """``images``: (H, W, 3) uint8 RGB each -> (B, D) float32, L2-normalised rows."""
        ...

    def explain(self, request: ExplainRequest, timeout: float | None = None) -> RetrievalExplanation:
        """Explain the request's query against each of its references (and/or each reference
        against it); the request was checked when it was built (:class:`ExplainRequest`).

        The request's stored embeddings, when given, are vectors of these very images from THIS
        encoder (e.g. the index's), so the backend does not embed them again; embeddings that
        are not the encoder's D raise :class:`histoxplain_model.errors.InvalidRequest`.
        """
        ...

    def ready(self) -> bool:
        """True once the model has answered (health checks)."""
        ...

    def close(self) -> None: ...

