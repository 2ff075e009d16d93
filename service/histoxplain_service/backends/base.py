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
    ) -> RetrievalExplanation:
        """Explain ``query`` against each of ``references`` (and/or each reference against it).

        ``options``: the method's options (e.g. SmoothGrad's samples and noise); ``None`` is
        the library defaults.
        """
        ...

    def ready(self) -> bool:
        """True once the model has answered (health checks)."""
        ...

    def close(self) -> None: ...
