"""``histoxplain.v1.RetrievalService``: thin methods, validate -> call the domain -> convert.

The domain is :class:`histoxplain_service.domain.retrieval.Retrieval`. Blocking work (decoding, model
calls, Qdrant, overlays) runs on the gateway's worker threads under the call's deadline: the
smaller of the client's remaining time and ``HISTOXPLAIN_MAX_DEADLINE_S``, passed on to the
model backend as its timeout. Errors are raised as :mod:`histoxplain_model.errors` classes;
the interceptor maps them to status codes.

Work stops with its caller: each call's work runs under ``histoxplain_model.deadlines.deadline``
with a stop signal that is set when the client cancels, when the deadline passes, and when the
gateway shuts down (:meth:`RetrievalServicer.cancel_all`); the work checks it between its units
(backward passes, SmoothGrad chunks, embedding batches), so a worker thread is free again within
one unit.

IndexImages indexes images as they arrive (``gateway/streams.py`` bounds what waits in memory)
and commits whole images only. When it stops early (cancelled, deadline, a malformed message)
the images not finished are rolled back, and the trailing metadata ``histoxplain-images-committed``
and ``histoxplain-tiles-committed`` say exactly what the index kept, with the error status.
Re-sending the same stream is safe: committed images come back unchanged, not duplicated.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from grpc import aio

from histoxplain_client._proto.histoxplain.v1 import pacs_pb2
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2_grpc as pb_grpc
from histoxplain_client._proto.histoxplain.v1 import types_pb2
from histoxplain_model.deadlines import deadline
from histoxplain_model.errors import Cancelled, DeadlineExceeded, InvalidRequest
from histoxplain_service.domain.checks import EncodedImage
from histoxplain_service.domain.ingest import IndexSummary
from histoxplain_service.gateway import converters
from histoxplain_service.gateway.admission import Admission
from histoxplain_service.gateway.dicom import GatewayPacs, IndexDicomJob, RegionJob
from histoxplain_service.gateway.streams import Inbox
from histoxplain_service.config import GatewaySettings
from histoxplain_service.domain.checks import decode_request_image, decode_request_images
from histoxplain_service.domain.retrieval import Retrieval, check_k

if TYPE_CHECKING:
    from histoxplain_service.backends import ModelBackend
    from histoxplain_service.index.base import IndexEngine

__all__ = ["COMMITTED_IMAGES_KEY", "COMMITTED_TILES_KEY", "RetrievalServicer", "add_servicer_to_server", "service_name"]

T = TypeVar("T")

SERVER_VERSION = "0.1.0"

#: Trailing metadata of an IndexImages call that stopped early: what the index kept.
COMMITTED_IMAGES_KEY = "histoxplain-images-committed"
COMMITTED_TILES_KEY = "histoxplain-tiles-committed"

#: Part of an IndexImages deadline kept back so the gateway can report what it committed
#: before the client gives up: the work stops this much earlier (at most a tenth of the deadline).
_REPORT_MARGIN_S = 1.0


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
        self._pacs = GatewayPacs(settings.core)  # HISTOXPLAIN_DICOMWEB_URL: DICOM tiles are re-read from it
        self._retrieval = Retrieval(
            settings.core, backend, index_engine, dicom_tiles=self._pacs.read_tile if self._pacs.configured else None
        )
        self._executor = executor
        self._admission = Admission(settings.max_explain_cost)
        self._in_flight: set[threading.Event] = set()
        self._in_flight_lock = threading.Lock()

    @property
    def work_in_flight(self) -> int:
        """Calls whose work is still running on a worker thread (their callers may have gone)."""
        with self._in_flight_lock:
            return len(self._in_flight)

    def cancel_all(self) -> None:
        """Stop the work of every call in flight (the gateway's shutdown, after its grace period)."""
        with self._in_flight_lock:
            stops = list(self._in_flight)
        for stop in stops:
            stop.set()

    def close(self, drain_s: float = 0.0) -> None:
        """Store the PACS results queued for the background within ``drain_s`` seconds, then close
        the connection to the PACS (after :meth:`cancel_all`)."""
        self._pacs.close(drain_s)

    async def _run(
        self, context: aio.ServicerContext, work: Callable[[float], T], cost: int = 0, report_margin: bool = False
    ) -> T:
        """Run ``work(timeout_s)`` on a worker thread, bounded by the call's deadline, under a
        stop signal set when the call is cancelled or times out (see the module docstring).

        ``cost``: admission units (``gateway/admission.py``) held until the work itself ends.
        ``report_margin``: the work's own deadline is :data:`_REPORT_MARGIN_S` earlier than the
        call's, so that what it returns on stopping still reaches the client.
        """
        timeout = self._settings.deadline_for(context.time_remaining())
        if timeout <= 0:
            raise DeadlineExceeded("the request's deadline had passed when it reached the gateway")
        margin = min(_REPORT_MARGIN_S, timeout / 10) if report_margin else 0.0
        stops_at = time.time() + timeout - margin
        stop = threading.Event()

        def run() -> T:
            with deadline(stops_at, stop):
                return work(timeout - margin)

        def done(_: object) -> None:
            self._admission.give_back(cost)
            with self._in_flight_lock:
                self._in_flight.discard(stop)

        loop = asyncio.get_running_loop()
        self._admission.take(cost)
        with self._in_flight_lock:
            self._in_flight.add(stop)
        try:
            future = self._executor.submit(run)
        except BaseException:
            done(None)
            raise
        future.add_done_callback(done)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future, loop=loop), timeout)
        except TimeoutError:
            stop.set()
            raise DeadlineExceeded(
                f"the request did not finish within its deadline of {timeout:.1f} s; retry with a "
                f"longer deadline (the gateway allows up to {self._settings.max_deadline_s:g} s, "
                "HISTOXPLAIN_MAX_DEADLINE_S)"
            ) from None
        except asyncio.CancelledError:  # the client cancelled, or the server stopped the call
            stop.set()
            raise

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
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None:
            raise InvalidRequest("empty IndexImages stream; send a `config` message, then images")
        if first.WhichOneof("content") != "config":
            raise InvalidRequest("the first IndexImages message must be `config` (the index and tiling)")
        name = _require_index(first.config.index)
        settings = converters.tiling_settings(self._settings.core, first.config.tiling)
        retrieval = Retrieval(settings, self._retrieval.backend, self._retrieval.index_engine)
        inbox: Inbox[EncodedImage] = Inbox(
            asyncio.get_running_loop(), self._settings.index_buffer_images, self._settings.index_buffer_bytes
        )
        stream = _StreamRecord()
        reader = asyncio.ensure_future(_read_images(messages, inbox, stream))
        try:
            summary = await self._run(
                context, lambda _timeout: retrieval.index_encoded(name, inbox.drain()), report_margin=True
            )
        except (Cancelled, DeadlineExceeded) as stop:  # stopped while waiting for the first image
            summary = IndexSummary(name, (), (), stop)
        finally:
            reader.cancel()
        failure = reader.exception() if reader.done() and not reader.cancelled() else None
        _raise_stopped(context, summary, failure)
        return converters.index_response(name, stream.received, stream.image_ids, summary)

    async def IndexDicom(self, request: pacs_pb2.IndexDicomRequest, context: aio.ServicerContext) -> pacs_pb2.IndexDicomResponse:
        job = IndexDicomJob.from_request(request, _require_index(request.index), self._settings.core, self._pacs)
        summary = await self._run(context, lambda _timeout: job.run(self._retrieval, self._pacs), report_margin=True)
        _raise_stopped(context, summary)
        return job.response(summary)

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
        tile_filter = converters.tile_filter_from_proto(request.filter)

        def search(timeout: float) -> pb.SearchResponse:
            query = self._decode(request.image, "query image")
            if image_ranking:
                hits = self._retrieval.search_images(name, query, k, timeout=timeout, tile_filter=tile_filter)
            else:
                hits = self._retrieval.search(name, query, k, timeout=timeout, tile_filter=tile_filter)
            return pb.SearchResponse(hits=[converters.search_hit_to_proto(hit) for hit in hits])

        return await self._run(context, search)

    async def SearchAndExplain(
        self, request: pb.SearchAndExplainRequest, context: aio.ServicerContext
    ) -> pb.SearchAndExplainResponse:
        name = _require_index(request.index)
        k = check_k(request.k, self._settings.max_explain_k, "k")
        image_ranking = _image_ranking(request.ranking)
        choice = converters.explain_choice_from_proto(request.options)
        tile_filter = converters.tile_filter_from_proto(request.filter)

        def search_and_explain(timeout: float) -> pb.SearchAndExplainResponse:
            query = self._decode(request.image, "query image")
            image_hits = None
            if image_ranking:
                image_hits, explained = self._retrieval.search_images_and_explain(
                    name, query, k, choice.method, choice.polarity, choice.side, timeout=timeout,
                    options=choice.method_options, tile_filter=tile_filter,
                    target=choice.target, correspondences=choice.correspondences, verify=choice.verify,
                )
            else:
                explained = self._retrieval.search_and_explain(
                    name, query, k, choice.method, choice.polarity, choice.side, timeout=timeout,
                    options=choice.method_options, tile_filter=tile_filter,
                    target=choice.target, correspondences=choice.correspondences, verify=choice.verify,
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
                    target=choice.target, correspondences=choice.correspondences, verify=choice.verify,
                )
            else:
                references = decode_request_images(list(request.images.images), self._settings.core, "reference image")
                explained = self._retrieval.explain_images(
                    query, references, choice.method, choice.polarity, choice.side, timeout=timeout,
                    options=choice.method_options, target=choice.target, correspondences=choice.correspondences,
                    verify=choice.verify,
                )
            references = converters.explained_references(
                explained.ranked(request.k), choice, max_bytes=self._settings.max_message_bytes
            )
            return pb.ExplainResponse(options=converters.explain_choice_to_proto(choice), references=references)

        return await self._run(context, explain, cost=choice.cost(count))

    async def ExplainDicomRegion(
        self, request: pacs_pb2.ExplainDicomRegionRequest, context: aio.ServicerContext
    ) -> pacs_pb2.ExplainDicomRegionResponse:
        job = RegionJob.from_request(request, _require_index(request.index), self._settings, self._pacs)
        max_bytes = self._settings.max_message_bytes
        return await self._run(context, lambda timeout: job.run(self._retrieval, self._pacs, timeout, max_bytes), cost=job.cost)

    # -- helpers --------------------------------------------------------------------------------

    def _decode(self, data: bytes, what: str) -> np.ndarray:
        """Request bytes under the request pixel limit (``HISTOXPLAIN_MAX_REQUEST_PIXELS``)."""
        return decode_request_image(data, self._settings.core, what)



class _StreamRecord:
    """What the IndexImages reader saw: images received, and the caller's image ids by position."""

    def __init__(self) -> None:
        self.received = 0
        self.image_ids: dict[int, str] = {}


async def _read_images(messages: AsyncIterator[pb.IndexImagesRequest], inbox: Inbox[EncodedImage], stream: _StreamRecord) -> None:
    """Hand the stream's images to the indexing thread as they arrive; a malformed message
    abandons the inbox (the indexing rolls back what it had not finished) and is raised."""
    try:
        async for message in messages:
            if message.WhichOneof("content") != "image":
                raise InvalidRequest("after the first IndexImages message (`config`), every message must be an `image`")
            record = message.image
            position = stream.received
            stream.received += 1
            if record.image_id:
                stream.image_ids[position] = record.image_id
            await inbox.put(converters.encoded_image(position, record), record.ByteSize())
    except BaseException:
        inbox.abandon()
        raise
    inbox.close()


def _raise_stopped(context: aio.ServicerContext, summary: IndexSummary, failure: BaseException | None = None) -> None:
    """An indexing run that stopped early (or whose stream failed) ends in its error, with
    trailing metadata saying what the index kept."""
    if failure is None and summary.stopped is None:
        return
    context.set_trailing_metadata((
        *context.trailing_metadata(),
        (COMMITTED_IMAGES_KEY, str(summary.images_indexed)),
        (COMMITTED_TILES_KEY, str(summary.tiles_indexed)),
    ))
    raise failure or summary.stopped  # type: ignore[misc]


def _require_index(name: str) -> str:
    if not name:
        raise InvalidRequest("the request names no index; set `index` (see ListIndexes)")
    return name


def _image_ranking(ranking: int) -> bool:
    if ranking not in (types_pb2.RANKING_LEVEL_UNSPECIFIED, types_pb2.RANKING_LEVEL_TILE, types_pb2.RANKING_LEVEL_IMAGE):
        raise InvalidRequest(f"unknown ranking level {ranking}; use RANKING_LEVEL_TILE or RANKING_LEVEL_IMAGE")
    return ranking == types_pb2.RANKING_LEVEL_IMAGE

