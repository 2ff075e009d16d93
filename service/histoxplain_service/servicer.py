"""``histoxplain.v1.RetrievalService``: thin methods, validate -> call the domain -> convert.

Blocking work (decoding, model calls, Qdrant, overlays) runs on the gateway's worker threads
under the call's deadline: the smaller of the client's remaining time and
``HISTOXPLAIN_MAX_DEADLINE_S``, passed on to the model backend as its timeout. Errors are
raised as :mod:`histoxplain_model.errors` classes; the interceptor maps them to status codes.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, TypeVar

from grpc import aio

from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2_grpc as pb_grpc
from histoxplain_model.errors import DeadlineExceeded, InvalidRequest
from histoxplain_service import converters
from histoxplain_service.gateway_settings import GatewaySettings
from histoxplain_service.index import list_indexes, open_index

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

    from histoxplain_service.backends import ModelBackend

__all__ = ["RetrievalServicer", "add_servicer_to_server", "service_name"]

T = TypeVar("T")

SERVER_VERSION = "0.1.0"


def service_name() -> str:
    """Full name of the retrieval service (``histoxplain.v1.RetrievalService``)."""
    return pb.DESCRIPTOR.services_by_name["RetrievalService"].full_name


def add_servicer_to_server(servicer: RetrievalServicer, server: aio.Server) -> None:
    pb_grpc.add_RetrievalServiceServicer_to_server(servicer, server)


class RetrievalServicer(pb_grpc.RetrievalServiceServicer):
    """The gRPC face of :mod:`histoxplain_service.retrieval`."""

    def __init__(
        self, settings: GatewaySettings, backend: ModelBackend, qdrant: QdrantClient, executor: Executor
    ) -> None:
        self._settings = settings
        self._backend = backend
        self._qdrant = qdrant
        self._executor = executor

    async def _run(self, context: aio.ServicerContext, work: Callable[[float], T]) -> T:
        """Run ``work(timeout_s)`` on a worker thread, bounded by the call's deadline."""
        timeout = self._settings.deadline_for(context.time_remaining())
        if timeout <= 0:
            raise DeadlineExceeded("the request's deadline had passed when it reached the gateway")
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._executor, functools.partial(work, timeout)), timeout
            )
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request did not finish within its deadline of {timeout:.1f} s; retry with a "
                f"longer deadline (the gateway allows up to {self._settings.max_deadline_s:g} s, "
                "HISTOXPLAIN_MAX_DEADLINE_S)"
            ) from None

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: aio.ServicerContext) -> pb.GetModelInfoResponse:
        info = await self._run(context, lambda _timeout: self._backend.info())
        return pb.GetModelInfoResponse(model=converters.model_info_to_proto(info), server_version=SERVER_VERSION)

    async def ListIndexes(self, request: pb.ListIndexesRequest, context: aio.ServicerContext) -> pb.ListIndexesResponse:
        infos = await self._run(context, lambda _timeout: list_indexes(self._qdrant))
        return pb.ListIndexesResponse(indexes=[converters.index_info_to_proto(info) for info in infos])

    async def DescribeIndex(self, request: pb.DescribeIndexRequest, context: aio.ServicerContext) -> pb.DescribeIndexResponse:
        name = _require_index(request.index)
        info = await self._run(context, lambda _timeout: self._index(name).describe())
        return pb.DescribeIndexResponse(index=converters.index_info_to_proto(info))

    def _index(self, name: str):  # noqa: ANN202 -- VectorIndex, imported lazily with the index module
        return open_index(self._settings.core, name, self._qdrant)


def _require_index(name: str) -> str:
    if not name:
        raise InvalidRequest("the request names no index; set `index` (see ListIndexes)")
    return name
