"""``histoxplain.v1.RetrievalService``: thin methods, validate -> call the domain -> convert.

The domain is :class:`histoxplain_service.domain.retrieval.Retrieval`. Blocking work (decoding, model
calls, Qdrant, overlays) runs on the gateway's worker threads under the call's deadline: the
smaller of the client's remaining time and ``HISTOXPLAIN_MAX_DEADLINE_S``, passed on to the
model backend as its timeout. Errors are raised as :mod:`histoxplain_model.errors` classes;
the interceptor maps them to status codes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from grpc import aio

from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2_grpc as pb_grpc
from histoxplain_client._proto.histoxplain.v1 import types_pb2
from histoxplain_model.errors import DeadlineExceeded, InvalidRequest
from histoxplain_service.gateway import converters
from histoxplain_service.gateway.admission import Admission
from histoxplain_service.config import GatewaySettings
from histoxplain_service.domain.checks import decode_request_image, decode_request_images
from histoxplain_service.domain.retrieval import Retrieval, check_k

if TYPE_CHECKING:
    from histoxplain_service.backends import ModelBackend
    from histoxplain_service.index.base import IndexEngine

__all__ = ["RetrievalServicer", "add_servicer_to_server", "service_name"]

T = TypeVar("T")

SERVER_VERSION = "0.1.0"


def service_name() -> str:
    """Full name of the retrieval service (``histoxplain.v1.RetrievalService``)."""
    return pb.DESCRIPTOR.services_by_name["RetrievalService"].full_name


def add_servicer_to_server(servicer: RetrievalServicer, server: aio.Server) -> None:
    pb_grpc.add_RetrievalServiceServicer_to_server(servicer, server)


class RetrievalServicer(pb_grpc.RetrievalServiceServicer):
    """The gRPC face of :class:`~histoxplain_service.domain.retrieval.Retrieval`."""

    def __init__(
        self, settings: GatewaySettings, backend: ModelBackend, index_engine: IndexEngine, executor: Executor
    ) -> None:
        self._settings = settings
        self._retrieval = Retrieval(settings.core, backend, index_engine)
        self._executor = executor
        self._admission = Admission(settings.max_explain_cost)

    async def _run(self, context: aio.ServicerContext, work: Callable[[float], T], cost: int = 0) -> T:
        """Run ``work(timeout_s)`` on a worker thread, bounded by the call's deadline.

        ``cost``: admission units (``gateway/admission.py``) held until the work itself ends.
        """
        timeout = self._settings.deadline_for(context.time_remaining())
        if timeout <= 0:
            raise DeadlineExceeded("the request's deadline had passed when it reached the gateway")
        loop = asyncio.get_running_loop()
        self._admission.take(cost)
        try:
            future = self._executor.submit(work, timeout)
        except BaseException:
            self._admission.give_back(cost)
            raise
        future.add_done_callback(lambda _: self._admission.give_back(cost))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future, loop=loop), timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request did not finish within its deadline of {timeout:.1f} s; retry with a "
                f"longer deadline (the gateway allows up to {self._settings.max_deadline_s:g} s, "
                "HISTOXPLAIN_MAX_DEADLINE_S)"
            ) from None

    # -- descriptions ---------------------------------------------------------------------------

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: aio.ServicerContext) -> pb.GetModelInfoResponse:
        info = await self._run(context, lambda _timeout: self._retrieval.backend.info())
        return pb.GetModelInfoResponse(model=converters.model_info_to_proto(info), server_version=SERVER_VERSION)

    async def ListIndexes(self, request: pb.ListIndexesRequest, context: aio.ServicerContext) -> pb.ListIndexesResponse:
        infos = await self._run(context, lambda _timeout: self._retrieval.list_indexes())
        return pb.ListIndexesResponse(indexes=[converters.index_info_to_proto(info) for info in infos])

    async def DescribeIndex(self, request: pb.DescribeIndexRequest, context: aio.ServicerContext) -> pb.DescribeIndexResponse:
        name = _require_index(request.index)
        info = await self._run(context, lambda _timeout: self._retrieval.describe(name))
        return pb.DescribeIndexResponse(index=converters.index_info_to_proto(info))

    # -- indexing -------------------------------------------------------------------------------

    async def IndexImages(
        self, request_iterator: AsyncIterator[pb.IndexImagesRequest], context: aio.ServicerContext
    ) -> pb.IndexImagesResponse:
        config: pb.IndexImagesConfig | None = None
        records: list[types_pb2.ImageRecord] = []
        async for message in request_iterator:
            if config is None:
                if message.WhichOneof("content") != "config":
                    raise InvalidRequest("the first IndexImages message must be `config` (the index and tiling)")
                config = message.config
            elif message.WhichOneof("content") == "image":
                records.append(message.image)
            else:
                raise InvalidRequest("only the first IndexImages message may be `config`; send `image` after it")
        if config is None:
            raise InvalidRequest("empty IndexImages stream; send a `config` message, then images")
        name = _require_index(config.index)
        settings = converters.tiling_settings(self._settings.core, config.tiling)
        retrieval = Retrieval(settings, self._retrieval.backend, self._retrieval.index_engine)
        return await self._run(context, lambda _timeout: converters.index_images(retrieval, name, records))

    async def DeleteImages(self, request: pb.DeleteImagesRequest, context: aio.ServicerContext) -> pb.DeleteImagesResponse:
        name = _require_index(request.index)
        image_ids = list(request.image_ids)
        summary = await self._run(context, lambda _timeout: self._retrieval.delete_images(name, image_ids))
        return converters.delete_summary_to_proto(summary)

    # -- search and explain ---------------------------------------------------------------------

    async def Search(self, request: pb.SearchRequest, context: aio.ServicerContext) -> pb.SearchResponse:
        name = _require_index(request.index)
        k = check_k(request.k, self._settings.max_k, "k")
        image_ranking = _image_ranking(request.ranking)

        def search(timeout: float) -> pb.SearchResponse:
            query = self._decode(request.image, "query image")
            if image_ranking:
                hits = self._retrieval.search_images(name, query, k, timeout=timeout)
            else:
                hits = self._retrieval.search(name, query, k, timeout=timeout)
            return pb.SearchResponse(hits=[converters.search_hit_to_proto(hit) for hit in hits])

        return await self._run(context, search)

    async def SearchAndExplain(
        self, request: pb.SearchAndExplainRequest, context: aio.ServicerContext
    ) -> pb.SearchAndExplainResponse:
        name = _require_index(request.index)
        k = check_k(request.k, self._settings.max_explain_k, "k")
        image_ranking = _image_ranking(request.ranking)
        choice = converters.explain_choice_from_proto(request.options)

        def search_and_explain(timeout: float) -> pb.SearchAndExplainResponse:
            query = self._decode(request.image, "query image")
            image_hits = None
            if image_ranking:
                image_hits, explained = self._retrieval.search_images_and_explain(
                    name, query, k, choice.method, choice.polarity, choice.side, timeout=timeout,
                    options=choice.method_options,
                )
            else:
                explained = self._retrieval.search_and_explain(
                    name, query, k, choice.method, choice.polarity, choice.side, timeout=timeout,
                    options=choice.method_options,
                )
            results = converters.explained_references(
                explained, choice, image_hits, max_bytes=self._settings.max_message_bytes
            )
            return pb.SearchAndExplainResponse(options=converters.explain_choice_to_proto(choice), results=results)

        return await self._run(context, search_and_explain, cost=choice.cost(k))

    async def Explain(self, request: pb.ExplainRequest, context: aio.ServicerContext) -> pb.ExplainResponse:
        choice = converters.explain_choice_from_proto(request.options)
        kind = request.WhichOneof("references")
        if kind is None:
            raise InvalidRequest("no references to explain against; set `indexed` (index + ids) or `images`")
        if kind == "indexed":
            name = _require_index(request.indexed.index)
            image_ids, point_ids = list(request.indexed.image_ids), list(request.indexed.point_ids)
            count = len(image_ids) + len(point_ids)
        else:
            count = len(request.images.images)
        check_k(count, self._settings.max_explain_k, "the number of references")
        if request.k > count:
            raise InvalidRequest(f"k={request.k} is more than the {count} references given; use 0 to explain all")

        def explain(timeout: float) -> pb.ExplainResponse:
            query = self._decode(request.query_image, "query image")
            if kind == "indexed":
                explained = self._retrieval.explain_indexed(
                    name, query, image_ids, point_ids, choice.method, choice.polarity, choice.side,
                    timeout=timeout, options=choice.method_options,
                )
            else:
                references = decode_request_images(list(request.images.images), self._settings.core, "reference image")
                explained = self._retrieval.explain_images(
                    query, references, choice.method, choice.polarity, choice.side, timeout=timeout,
                    options=choice.method_options,
                )
            references = converters.explained_references(
                explained.ranked(request.k), choice, max_bytes=self._settings.max_message_bytes
            )
            return pb.ExplainResponse(options=converters.explain_choice_to_proto(choice), references=references)

        return await self._run(context, explain, cost=choice.cost(count))

    # -- helpers --------------------------------------------------------------------------------

    def _decode(self, data: bytes, what: str) -> np.ndarray:
        """Request bytes under the request pixel limit (``HISTOXPLAIN_MAX_REQUEST_PIXELS``)."""
        return decode_request_image(data, self._settings.core, what)



def _require_index(name: str) -> str:
    if not name:
        raise InvalidRequest("the request names no index; set `index` (see ListIndexes)")
    return name


def _image_ranking(ranking: int) -> bool:
    if ranking not in (types_pb2.RANKING_LEVEL_UNSPECIFIED, types_pb2.RANKING_LEVEL_TILE, types_pb2.RANKING_LEVEL_IMAGE):
        raise InvalidRequest(f"unknown ranking level {ranking}; use RANKING_LEVEL_TILE or RANKING_LEVEL_IMAGE")
    return ranking == types_pb2.RANKING_LEVEL_IMAGE

