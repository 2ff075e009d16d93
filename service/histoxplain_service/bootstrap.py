"""The one composition root: which model backend, which index engine, and the domain over them.

Every entry point (the CLI, the demo, the gateway, ``make serve``) builds its parts here, so a
new backend or index engine is chosen in one place. Only the application and gateway layers
import this module.
"""

from __future__ import annotations

import math

from histoxplain_service.backends.base import ModelBackend
from histoxplain_service.config import GatewaySettings, Settings
from histoxplain_service.domain.retrieval import Retrieval
from histoxplain_service.index.base import IndexEngine
from histoxplain_service.index.qdrant import QdrantEngine, open_qdrant

__all__ = ["create_backend", "embedded_backend", "open_gateway_index", "open_index_engine", "open_retrieval"]


def embedded_backend(settings: Settings) -> ModelBackend:
    """The encoder in-process (``settings.model`` on ``settings.device``).

    Imported here, not at the top: it loads torch, which a gateway in front of TorchServe never
    needs (``tests/unit/gateway/test_no_torch.py``).
    """
    from histoxplain_service.backends.embedded import create_embedded_backend

    return create_embedded_backend(settings)


def create_backend(settings: GatewaySettings) -> ModelBackend:
    """The model backend ``settings.backend`` names (``HISTOXPLAIN_BACKEND``)."""
    if settings.backend == "embedded":
        return embedded_backend(settings.core)
    from histoxplain_service.backends.torchserve.backend import TorchServeBackend, TorchServeConfig

    return TorchServeBackend(
        TorchServeConfig(
            target=settings.torchserve_address,
            model_name=settings.torchserve_model,
            key_file=settings.torchserve_key_file,
        )
    )


def open_index_engine(settings: Settings, timeout_s: int | None = None) -> IndexEngine:
    """The index engine: Qdrant, a server at ``QDRANT_URL`` or else local mode under the data
    folder (FailedPrecondition: that folder is held by another process).

    ``timeout_s``: the HTTP timeout of server calls (``None``: qdrant-client's default). The
    caller owns the engine and closes it.
    """
    return QdrantEngine(settings, open_qdrant(settings, timeout_s))


def open_gateway_index(settings: GatewaySettings) -> IndexEngine:
    """The index engine for the gateway: a server (``QDRANT_URL``) gets an HTTP timeout equal to
    the maximum request deadline, so no Qdrant call outlives the longest call that waits for it;
    local mode is in-process (bounded by the call's deadline in the servicer)."""
    return open_index_engine(settings.core, timeout_s=max(1, math.ceil(settings.max_deadline_s)))


def open_retrieval(settings: Settings, backend: ModelBackend | None = None) -> Retrieval:
    """The domain over ``backend`` (default: the in-process model) and the configured index engine."""
    return Retrieval(settings, backend or embedded_backend(settings), open_index_engine(settings))
