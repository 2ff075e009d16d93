"""The asyncio client (grpc.aio): the same methods as :class:`histoxplain_client.Client`, awaited."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from histoxplain_client import _convert, dicom
from histoxplain_client._base import DEFAULT, CapturingIterator, ClientBase, Timeout
from histoxplain_client._channel import open_channel
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2_grpc as pb_grpc
from histoxplain_client.errors import Unavailable, from_rpc_error
from histoxplain_client.dicom import DicomIndexSummary, DicomRegionExplanation
from histoxplain_client.images import ImageInput, IndexImage
from histoxplain_client.options import RiseOptions
from histoxplain_client.results import DeleteResult, Explanation, Hit, IndexInfo, IndexSummary, ModelInfo

__all__ = ["AsyncClient"]

_log = logging.getLogger(__name__)
_Response = TypeVar("_Response")


class AsyncClient(ClientBase):
    """Asynchronous client; constructor, methods, results and errors are those of
    :class:`histoxplain_client.Client`, each method a coroutine. ``index_images`` also accepts
    an async iterable of images. Use ``async with AsyncClient(...) as client:`` or
    ``await client.close()``; create it inside the event loop that uses it."""

    def _open_channel(self) -> None:
        connection = self._settings
        if connection.secure:
            self._channel = grpc.aio.secure_channel(connection.target, connection.credentials(), connection.options())
        else:
            self._channel = grpc.aio.insecure_channel(connection.target, connection.options())
        self._stub = pb_grpc.RetrievalServiceStub(self._channel)
        self._sync_channel: grpc.Channel | None = None  # IndexImages only, opened on first use
        self._sync_stub: pb_grpc.RetrievalServiceStub | None = None

    def _stream_stub(self) -> pb_grpc.RetrievalServiceStub:
        if self._sync_stub is None:
            self._sync_channel = open_channel(self._settings)
            self._sync_stub = pb_grpc.RetrievalServiceStub(self._sync_channel)
        return self._sync_stub

    async def close(self) -> None:
        """Close the channel(s); calls in flight are cancelled."""
        await self._channel.close()
        if self._sync_channel is not None:
            self._sync_channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def wait_until_ready(self, timeout: float = 10.0) -> None:
        """Wait until the channel is connected; raises Unavailable after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f"no connection to {self.target} within {timeout} s") from None

    async def index_images(
        self,
        index: str,
        images: Iterable[IndexImage | ImageInput] | AsyncIterable[IndexImage | ImageInput],
        *,
        tile_size: int = 0,
        stride: int = 0,
        min_tissue_fraction: float | None = None,
        timeout: Timeout = DEFAULT,
    ) -> IndexSummary:
        """See :meth:`Client.index_images`; retried only when ``images`` is a Sequence."""
        tiling = _convert.tiling_options(tile_size, stride, min_tissue_fraction)
        loop = asyncio.get_running_loop()

        # The stream runs on a synchronous channel in a worker thread: a grpc.aio client stream
        # that the server ends early (an error before it has read every message) can report
        # "INTERNAL: Internal error from Core" from the failed write instead of the server's
        # status, which would turn a retryable UNAVAILABLE into a final INTERNAL.
        async def call(remaining: float | None) -> pb.IndexImagesResponse:
            requests = CapturingIterator(_convert.index_requests(index, _blocking_iter(images, loop), tiling))
            future = self._stream_stub().IndexImages.future(requests, timeout=remaining, metadata=self._metadata)
            try:
                return await asyncio.to_thread(future.result)
            except asyncio.CancelledError:
                future.cancel()
                raise
            except grpc.RpcError:
                if requests.error is not None:  # our own input failed (unreadable file, bad array)
                    raise requests.error from None
                raise

        response = await self._invoke(call, timeout, retryable=isinstance(images, Sequence))
        return _convert.decode_index_summary(response)

    async def search(
        self, index: str, image: ImageInput, *, k: int = 10, ranking: str = "tile",
        filter: Mapping[str, str | Sequence[str]] | None = None, timeout: Timeout = DEFAULT,
    ) -> list[Hit]:
        """See :meth:`Client.search`."""
        request = _convert.search_request(index, image, k, ranking, filter)
        return _convert.decode_hits(await self._unary(self._stub.Search, request, timeout))

    async def explain(
        self,
        query: ImageInput,
        *,
        index: str | None = None,
        image_ids: Sequence[str] = (),
        point_ids: Sequence[str] = (),
        references: Sequence[ImageInput] = (),
        k: int = 0,
        method: str = "gradcam",
        polarity: str = "similar",
        side: str = "both",
        heatmap_dtype: str = "float16",
        smoothgrad_samples: int = 0,
        smoothgrad_noise: float | None = None,
        rise: RiseOptions | None = None,
        target: str = "cosine",
        correspondences: int = 0,
        verify: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> Explanation:
        """See :meth:`Client.explain`."""
        options = _convert.explain_options(
            method, polarity, side, heatmap_dtype, smoothgrad_samples, smoothgrad_noise, rise, target, correspondences,
            verify,
        )
        request = _convert.explain_request(query, index, image_ids, point_ids, references, k, options)
        return _convert.decode_explanation(await self._unary(self._stub.Explain, request, timeout))

    async def search_and_explain(
        self,
        index: str,
        image: ImageInput,
        *,
        k: int = 10,
        ranking: str = "tile",
        method: str = "gradcam",
        polarity: str = "similar",
        side: str = "both",
        heatmap_dtype: str = "float16",
        smoothgrad_samples: int = 0,
        smoothgrad_noise: float | None = None,
        rise: RiseOptions | None = None,
        target: str = "cosine",
        correspondences: int = 0,
        verify: bool = False,
        filter: Mapping[str, str | Sequence[str]] | None = None,
        timeout: Timeout = DEFAULT,
    ) -> Explanation:
        """See :meth:`Client.search_and_explain`."""
        options = _convert.explain_options(
            method, polarity, side, heatmap_dtype, smoothgrad_samples, smoothgrad_noise, rise, target, correspondences,
            verify,
        )
        request = _convert.search_and_explain_request(index, image, k, ranking, options, filter)
        return _convert.decode_explanation(await self._unary(self._stub.SearchAndExplain, request, timeout))

    async def delete(self, index: str, image_ids: Sequence[str], *, timeout: Timeout = DEFAULT) -> DeleteResult:
        """See :meth:`Client.delete`."""
        request = _convert.delete_request(index, image_ids)
        return _convert.decode_delete(await self._unary(self._stub.DeleteImages, request, timeout))

    async def describe_index(self, index: str, *, timeout: Timeout = DEFAULT) -> IndexInfo:
        """See :meth:`Client.describe_index`."""
        response = await self._unary(self._stub.DescribeIndex, pb.DescribeIndexRequest(index=index), timeout)
        return _convert.decode_index_info(response.index)

    async def list_indexes(self, *, timeout: Timeout = DEFAULT) -> list[IndexInfo]:
        """See :meth:`Client.list_indexes`."""
        response = await self._unary(self._stub.ListIndexes, pb.ListIndexesRequest(), timeout)
        return [_convert.decode_index_info(info) for info in response.indexes]

    async def info(self, *, timeout: Timeout = DEFAULT) -> ModelInfo:
        """See :meth:`Client.info`."""
        response = await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return _convert.decode_model_info(response)

    async def index_dicom(
        self,
        index: str,
        study_uid: str,
        series_uids: Sequence[str] = (),
        *,
        level: int = 0,
        tile_size: int = 0,
        stride: int = 0,
        min_tissue_fraction: float | None = None,
        label: str = "",
        timeout: Timeout = DEFAULT,
    ) -> DicomIndexSummary:
        """See :meth:`Client.index_dicom`."""
        tiling = _convert.tiling_options(tile_size, stride, min_tissue_fraction)
        request = dicom.index_dicom_request(index, study_uid, series_uids, level, tiling, label)
        return dicom.decode_index_summary(await self._unary(self._stub.IndexDicom, request, timeout))

    async def explain_dicom_region(
        self,
        index: str,
        study_uid: str,
        series_uid: str,
        *,
        region: Sequence[int] | None = None,
        region_mm: Sequence[float] | None = None,
        level: int = 0,
        k: int = 10,
        ranking: str = "image",
        method: str = "gradcam",
        polarity: str = "similar",
        side: str = "both",
        heatmap_dtype: str = "float16",
        smoothgrad_samples: int = 0,
        smoothgrad_noise: float | None = None,
        rise: RiseOptions | None = None,
        target: str = "cosine",
        correspondences: int = 0,
        verify: bool = False,
        filter: Mapping[str, str | Sequence[str]] | None = None,
        store_results: bool = False,
        store_overlay: bool = False,
        store_background: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> DicomRegionExplanation:
        """See :meth:`Client.explain_dicom_region`."""
        options = _convert.explain_options(
            method, polarity, side, heatmap_dtype, smoothgrad_samples, smoothgrad_noise, rise, target, correspondences,
            verify,
        )
        request = dicom.explain_region_request(
            index, study_uid, series_uid, region, region_mm, level, k, ranking, options, filter, store_results,
            store_overlay, store_background,
        )
        response = await self._unary(self._stub.ExplainDicomRegion, request, timeout, retryable=not store_results)
        return dicom.decode_region_explanation(response)

    async def _unary(
        self, rpc: Callable[..., Awaitable[_Response]], request: Any, timeout: Timeout, retryable: bool = True
    ) -> _Response:
        async def call(remaining: float | None) -> _Response:
            return await rpc(request, timeout=remaining, metadata=self._metadata)

        return await self._invoke(call, timeout, retryable=retryable)

    async def _invoke(
        self, call: Callable[[float | None], Awaitable[_Response]], timeout: Timeout, retryable: bool
    ) -> _Response:
        deadline = self._deadline(timeout)
        attempt = 1
        while True:
            try:
                return await call(self._remaining(deadline))
            except grpc.RpcError as error:
                delay = self._retry_delay(error.code(), attempt, deadline, retryable)
                if delay is None:
                    raise from_rpc_error(error) from error
                _log.info("attempt %d failed with UNAVAILABLE (%s); retrying in %.2f s", attempt, error.details(), delay)
                await asyncio.sleep(delay)
                attempt += 1


def _blocking_iter(
    images: Iterable[IndexImage | ImageInput] | AsyncIterable[IndexImage | ImageInput],
    loop: asyncio.AbstractEventLoop,
) -> Iterable[IndexImage | ImageInput]:
    """``images`` for grpc's request thread; an async iterable is advanced on ``loop``."""
    if not isinstance(images, AsyncIterable):
        return images
    return _pull_from_loop(images.__aiter__(), loop)


def _pull_from_loop(
    iterator: AsyncIterator[IndexImage | ImageInput], loop: asyncio.AbstractEventLoop
) -> Iterator[IndexImage | ImageInput]:
    while True:
        try:
            yield asyncio.run_coroutine_threadsafe(_anext(iterator), loop).result()
        except StopAsyncIteration:
            return


async def _anext(iterator: AsyncIterator[IndexImage | ImageInput]) -> IndexImage | ImageInput:
    return await iterator.__anext__()
