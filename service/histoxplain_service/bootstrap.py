"""The one composition root: which model backend, which index engine, and the domain over them.

Every entry point (the CLI, the demo, the gateway, ``make serve``) builds its parts here, so a
new backend or index engine is chosen in one place. Only the application and gateway layers
import this module.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from histoxplain_model.errors import InvalidRequest
from histoxplain_service.backends.base import ModelBackend
from histoxplain_service.config import GatewaySettings, Settings
from histoxplain_service.domain.retrieval import Retrieval
from histoxplain_service.index.base import IndexEngine
from histoxplain_service.index.edge import EdgeEngine
from histoxplain_service.index.qdrant import QdrantEngine, open_qdrant

if TYPE_CHECKING:  # imported when a PACS is configured: wsidicom and highdicom load only then
    from histoxplain_service.pacs.dicomweb import DicomWeb

__all__ = [
    "create_backend", "embedded_backend", "open_gateway_index", "open_index_engine", "open_pacs", "open_retrieval",
    "opened_retrieval",
]


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
    """The index engine: a Qdrant server at ``QDRANT_URL``; else the embedded store
    ``HISTOXPLAIN_INDEX_ENGINE`` names under the data folder: Qdrant's engine in-process
    (``edge``, the default) or qdrant-client local mode (``local``, the store of earlier versions).

    ``timeout_s``: the HTTP timeout of server calls (``None``: qdrant-client's default). The
    caller owns the engine and closes it.

    Raises:
        FailedPrecondition: the embedded store's folder is held by another process.
        InvalidRequest: tile pixels in the payload asked of the embedded engine.
    """
    if settings.qdrant_url or settings.index_engine == "local":
        return QdrantEngine(settings, open_qdrant(settings, timeout_s))
    if settings.tile_pixels == "payload":
        raise InvalidRequest(
            "HISTOXPLAIN_TILE_PIXELS=payload needs a Qdrant server (QDRANT_URL) or HISTOXPLAIN_INDEX_ENGINE=local; "
            "the embedded engine keeps tile pixels in the data folder (HISTOXPLAIN_TILE_PIXELS=local)"
        )
    return EdgeEngine(settings)


def open_gateway_index(settings: GatewaySettings) -> IndexEngine:
    """The index engine for the gateway: a server (``QDRANT_URL``) gets an HTTP timeout equal to
    the maximum request deadline, so no Qdrant call outlives the longest call that waits for it;
    the embedded stores are in-process (bounded by the call's deadline in the servicer)."""
    return open_index_engine(settings.core, timeout_s=max(1, math.ceil(settings.max_deadline_s)))


def open_pacs(settings: Settings) -> DicomWeb | None:
    """The PACS of ``HISTOXPLAIN_DICOMWEB_URL`` and its credentials, or ``None`` when unset. Opening
    contacts nothing; the caller closes it."""
    if not settings.dicomweb_url:
        return None
    from histoxplain_service.pacs.dicomweb import DicomWeb

    return DicomWeb.from_settings(settings)


def open_retrieval(settings: Settings, backend: ModelBackend | None = None) -> Retrieval:
    """The domain over ``backend`` (default: the in-process model) and the configured index engine;
    with a PACS configured (``HISTOXPLAIN_DICOMWEB_URL``), hits of DICOM slides are re-read from it."""
    pacs = open_pacs(settings)
    return Retrieval(
        settings, backend or embedded_backend(settings), open_index_engine(settings),
        dicom_tiles=None if pacs is None else pacs.read_tile,
    )


@contextlib.contextmanager
def opened_retrieval(settings: Settings) -> Iterator[Retrieval]:
    """:func:`open_retrieval` whose index engine is closed when the block ends, however it ends
    (the embedded engine holds its folder's lock until then): for commands that open one."""
    retrieval = open_retrieval(settings)
    try:
        yield retrieval
    finally:
        retrieval.index_engine.close()
