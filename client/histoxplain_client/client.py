"""The synchronous client."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

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

__all__ = ["Client"]

_log = logging.getLogger(__name__)
_Response = TypeVar("_Response")


class Client(ClientBase):
    """Synchronous client of the histoxplain gateway (``histoxplain.v1.RetrievalService``).

    ``Client(target="127.0.0.1:50051", *, timeout=60.0, retry=RetryPolicy(), token=None,
    tls=False, root_certificates=None, max_message_bytes=64 MiB, channel_options=(),
    token_provider=None, client_certificate=None, client_key=None)``

    - ``timeout``: default seconds per call, retries included (None: no deadline); every method
      takes ``timeout=`` to override it.
    - ``retry``: UNAVAILABLE is retried with exponential backoff and jitter; nothing else is.
    - ``token``: bearer token sent as ``authorization`` metadata; ``token_provider``: a
      callable asked for the token before every call (a JWT that it refreshes before expiry;
      keep it fast, it runs on the caller's thread or event loop); ``root_certificates`` (PEM
      bytes or path) or ``tls=True`` for a TLS channel; ``client_certificate`` + ``client_key``
      (PEM bytes or paths) for mutual TLS.
    - Images: paths, encoded bytes, (H, W, 3) uint8 arrays or PIL images.

    Failed calls raise :class:`histoxplain_client.errors.ApiError` subclasses that carry the
    status code and the server's message. Use it as a context manager to close the channel.
    """

    def _open_channel(self) -> None:
        self._channel = open_channel(self._settings)
        self._stub = pb_grpc.RetrievalServiceStub(self._channel)

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def wait_until_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected; raises Unavailable after ``timeout`` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"no connection to {self.target} within {timeout} s") from None

    # -- RPCs --------------------------------------------------------------------------------

    def index_images(
        self,
        index: str,
        images: Iterable[IndexImage | ImageInput],
        *,
        tile_size: int = 0,
        stride: int = 0,
        min_tissue_fraction: float | None = None,
        timeout: Timeout = DEFAULT,
    ) -> IndexSummary:
        """Stream ``images`` into ``index`` (created on first use); returns what was indexed and
        what was skipped, and why. Images are read and encoded one at a time as they are sent.

        Retried on UNAVAILABLE only when ``images`` is a Sequence (list, tuple), which can be
        sent again; a one-shot iterator (generator, ``images_from_folder``) is sent once.
        Re-sending is safe: indexing an image id again replaces it. If reading an input fails,
        the stream is cancelled (never half-closed) and that error is raised here; grpc also
        logs it as "Exception iterating requests!". Nothing after the failing input is sent.

        The gateway indexes images as they arrive and commits whole images only: a call that
        fails part-way (cancelled, past its deadline, a bad message) leaves the images the
        gateway had finished, and its error's ``committed_images`` / ``committed_tiles`` say how
        many when the gateway could report it. Sending the same images again completes the job;
        what was committed comes back unchanged, nothing is duplicated.
        """
        tiling = _convert.tiling_options(tile_size, stride, min_tissue_fraction)

        def call(remaining: float | None) -> pb.IndexImagesResponse:
            requests = CapturingIterator(_convert.index_requests(index, images, tiling))
            try:
                return self._stub.IndexImages(requests, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError:
                if requests.error is not None:  # our own iterator failed (e.g. unreadable file)
                    raise requests.error from None
                raise

        response = self._invoke(call, timeout, retryable=isinstance(images, Sequence))
        return _convert.decode_index_summary(response)

    def search(
        self, index: str, image: ImageInput, *, k: int = 10, ranking: str = "tile",
        filter: Mapping[str, str | Sequence[str]] | None = None, timeout: Timeout = DEFAULT,
    ) -> list[Hit]:
        """The ``k`` tiles (``ranking="tile"``) or images (``"image"``) most similar to ``image``,
        best first, among the tiles ``filter`` keeps: ``{payload key: value or values}``, e.g.
        ``{"label": "TUM", "organ": ["skin", "colon"]}`` (every key must match, any of its values)."""
        request = _convert.search_request(index, image, k, ranking, filter)
        return _convert.decode_hits(self._unary(self._stub.Search, request, timeout))

    def explain(
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
        """Explain ``query`` against indexed images/tiles (``index`` + ``image_ids`` /
        ``point_ids``) or against ``references`` sent along; ``k`` > 0 keeps only the k most
        similar. ``method``: gradcam | gradcampp | smoothgrad | simmap | rise (its masks:
        ``rise``, :class:`~histoxplain_client.options.RiseOptions`); ``polarity``: similar |
        dissimilar; ``side``: query | retrieved | both. ``target``: cosine (default) | projection
        (e . r_hat, which ranks the hits as the cosine does on the query side); ``correspondences``:
        the top N matched region pairs per reference, 0 (none) to 16
        (``ExplainedReference.correspondences``; mean-pooled encoders only). ``verify``: also
        measure each map's deletion and insertion AUC against a random map of its own grid on this
        very pair (``ExplainedReference.faithfulness``; 30 forward passes per map)."""
        options = _convert.explain_options(
            method, polarity, side, heatmap_dtype, smoothgrad_samples, smoothgrad_noise, rise, target, correspondences,
            verify,
        )
        request = _convert.explain_request(query, index, image_ids, point_ids, references, k, options)
        return _convert.decode_explanation(self._unary(self._stub.Explain, request, timeout))

    def search_and_explain(
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
        """Search (``filter`` as in :meth:`search`), then explain ``image`` against each of the
        ``k`` hits, in one call."""
        options = _convert.explain_options(
            method, polarity, side, heatmap_dtype, smoothgrad_samples, smoothgrad_noise, rise, target, correspondences,
            verify,
        )
        request = _convert.search_and_explain_request(index, image, k, ranking, options, filter)
        return _convert.decode_explanation(self._unary(self._stub.SearchAndExplain, request, timeout))

    def delete(self, index: str, image_ids: Sequence[str], *, timeout: Timeout = DEFAULT) -> DeleteResult:
        """Delete images (all their tiles) from ``index``; ids it does not hold are reported."""
        request = _convert.delete_request(index, image_ids)
        return _convert.decode_delete(self._unary(self._stub.DeleteImages, request, timeout))

    def describe_index(self, index: str, *, timeout: Timeout = DEFAULT) -> IndexInfo:
        """One index: encoder preset, dimension, tile and image counts (NotFound if unknown)."""
        response = self._unary(self._stub.DescribeIndex, pb.DescribeIndexRequest(index=index), timeout)
        return _convert.decode_index_info(response.index)

    def list_indexes(self, *, timeout: Timeout = DEFAULT) -> list[IndexInfo]:
        """Every index on the server, sorted by name."""
        response = self._unary(self._stub.ListIndexes, pb.ListIndexesRequest(), timeout)
        return [_convert.decode_index_info(info) for info in response.indexes]

    def info(self, *, timeout: Timeout = DEFAULT) -> ModelInfo:
        """The served model: preset, architecture, dimension, input size, methods, backend."""
        response = self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return _convert.decode_model_info(response)

    def index_dicom(
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
        """Index the slide series ``series_uids`` of a study in the gateway's PACS (every slide
        series of the study when empty) at pyramid ``level``, tiled as in :meth:`index_images`.
        Indexing a series again updates it, never duplicates it (so the call is retried on
        UNAVAILABLE). Raises FailedPrecondition when the gateway has no PACS, NotFound for an
        unknown study or series, InvalidArgument for a series that is not a slide."""
        tiling = _convert.tiling_options(tile_size, stride, min_tissue_fraction)
        request = dicom.index_dicom_request(index, study_uid, series_uids, level, tiling, label)
        return dicom.decode_index_summary(self._unary(self._stub.IndexDicom, request, timeout))

    def explain_dicom_region(
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
        """Search the slides most similar to a region of a slide in the gateway's PACS and explain
        them: ``region=(x, y, width, height)`` in level-0 pixels or ``region_mm=(...)`` in slide
        millimetres, read at ``level``. ``ranking``: image (one case per slide) or tile; ``side``:
        query or both. ``store_results`` also writes a Parametric Map, an SR and a Key Object
        Selection into the study (needs the writer role; such a call is never retried), and
        ``store_overlay`` a Secondary Capture of the heatmap over the region. ``store_background``:
        the call returns once the explanation is done, with the objects' UIDs ``state="queued"``;
        the gateway stores them afterwards (poll the study for them; a full write-back queue is
        RESOURCE_EXHAUSTED). Otherwise they are in the PACS when the call returns. ``rise``,
        ``target``, ``correspondences`` and ``verify``: as in :meth:`search_and_explain` (the stored
        map is the mean of the query maps of that target)."""
        options = _convert.explain_options(
            method, polarity, side, heatmap_dtype, smoothgrad_samples, smoothgrad_noise, rise, target, correspondences,
            verify,
        )
        request = dicom.explain_region_request(
            index, study_uid, series_uid, region, region_mm, level, k, ranking, options, filter, store_results,
            store_overlay, store_background,
        )
        response = self._unary(self._stub.ExplainDicomRegion, request, timeout, retryable=not store_results)
        return dicom.decode_region_explanation(response)

    # -- plumbing ----------------------------------------------------------------------------

    def _unary(self, rpc: Callable[..., _Response], request: Any, timeout: Timeout, retryable: bool = True) -> _Response:
        return self._invoke(
            lambda remaining: rpc(request, timeout=remaining, metadata=self._metadata), timeout, retryable=retryable
        )

    def _invoke(self, call: Callable[[float | None], _Response], timeout: Timeout, retryable: bool) -> _Response:
        deadline = self._deadline(timeout)
        attempt = 1
        while True:
            try:
                return call(self._remaining(deadline))
            except grpc.RpcError as error:
                delay = self._retry_delay(error.code(), attempt, deadline, retryable)
                if delay is None:
                    raise from_rpc_error(error) from error
                _log.info("attempt %d failed with UNAVAILABLE (%s); retrying in %.2f s", attempt, error.details(), delay)
                time.sleep(delay)
                attempt += 1

