"""The PACS RPCs of the gateway, ``IndexDicom`` and ``ExplainDicomRegion``: requests checked on
the event loop, the library's PACS functions (:mod:`histoxplain_service.pacs`) run on a worker
thread against the gateway's own PACS, results converted.

The PACS
    The gateway reads slides from, and writes results to, the one PACS its settings name
    (``HISTOXPLAIN_DICOMWEB_URL`` and its credentials), never one a caller names: a request
    carries UIDs only, checked to be DICOM UIDs before they go into a DICOMweb URL, so a caller
    cannot make the gateway fetch from anywhere else. Without that setting both RPCs answer
    FAILED_PRECONDITION naming it. The connection opens on first use (the password file is read
    then); when the PACS refuses the credentials it is dropped, so the next call reads a rotated
    secret again.

Roles
    ``IndexDicom`` needs ``writer`` and ``ExplainDicomRegion`` ``reader`` (``gateway/roles.py``);
    storing the results back (``store_results``) also needs
    :data:`~histoxplain_service.gateway.roles.STORE_RESULTS_ROLE`, checked here because it
    depends on a request field.

Storing in the background
    ``store_mode`` BACKGROUND hands the results to the gateway's
    :class:`~histoxplain_service.pacs.writeback.BackgroundWriter` (one per process, its place
    taken before the work: full, RESOURCE_EXHAUSTED); the server's shutdown gives it what is
    left of the grace period (:meth:`GatewayPacs.close`).

Cost and stopping
    A region explanation takes the admission units of a search-and-explain of ``k`` (the method,
    the sides); its pixels are held to ``HISTOXPLAIN_MAX_REQUEST_PIXELS`` at the level read.
    Indexing is bounded by the call's deadline and commits whole series, like ``IndexImages``.
    Both run under the servicer's stop signal, which the library checks between its units
    (tile batches, backward passes).

Nothing here logs a UID: messages name fields (``series_instance_uids[2]``), and the audit line
names the index only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from histoxplain_client._proto.histoxplain.v1 import pacs_pb2, types_pb2
from histoxplain_model.errors import FailedPrecondition, InvalidRequest, PermissionDenied
from histoxplain_model.limits import DETAIL, LABEL, MAX_DICOM_SERIES, check_pyramid_level, check_uid
from histoxplain_service.bootstrap import open_pacs
from histoxplain_service.config import GatewaySettings, Settings
from histoxplain_service.domain.ingest import IndexSummary
from histoxplain_service.domain.retrieval import Retrieval, check_k
from histoxplain_service.domain.types import SearchHit, TileFilter
from histoxplain_service.gateway import converters
from histoxplain_service.gateway.audit import PRINCIPAL
from histoxplain_service.gateway.roles import STORE_RESULTS_ROLE

if TYPE_CHECKING:
    from histoxplain_service.pacs.dicomweb import DicomWeb

__all__ = ["GatewayPacs", "IndexDicomJob", "RegionJob"]

_NO_PACS = (
    "this gateway has no PACS configured; set HISTOXPLAIN_DICOMWEB_URL (and HISTOXPLAIN_DICOMWEB_USER / "
    "HISTOXPLAIN_DICOMWEB_PASSWORD_FILE) on the gateway to use IndexDicom and ExplainDicomRegion"
)
_STATUSES = {
    "indexed": pacs_pb2.DICOM_INDEX_STATUS_INDEXED,
    "unchanged": pacs_pb2.DICOM_INDEX_STATUS_UNCHANGED,
    "relabelled": pacs_pb2.DICOM_INDEX_STATUS_RELABELLED,
}
_STATES = {"stored": pacs_pb2.STORED_DICOM_OBJECT_STATE_STORED, "queued": pacs_pb2.STORED_DICOM_OBJECT_STATE_QUEUED}
_STORE_MODES = (pacs_pb2.STORE_MODE_UNSPECIFIED, pacs_pb2.STORE_MODE_SYNCHRONOUS, pacs_pb2.STORE_MODE_BACKGROUND)
_KINDS = {
    "map": pacs_pb2.STORED_DICOM_OBJECT_KIND_PARAMETRIC_MAP,
    "report": pacs_pb2.STORED_DICOM_OBJECT_KIND_STRUCTURED_REPORT,
    "selection": pacs_pb2.STORED_DICOM_OBJECT_KIND_KEY_OBJECT_SELECTION,
    "overlay": pacs_pb2.STORED_DICOM_OBJECT_KIND_SECONDARY_CAPTURE,
}


class GatewayPacs:
    """The PACS of the gateway's settings, opened on first use and shared by its calls."""

    def __init__(self, settings: Settings) -> None:
        from histoxplain_service.pacs.writeback import BackgroundWriter

        self._settings = settings
        self._pacs: DicomWeb | None = None
        self._lock = threading.Lock()
        #: stores STORE_MODE_BACKGROUND results (one per gateway process; drained by :meth:`close`)
        self.writer = BackgroundWriter()
        if self.configured:  # highdicom's tables (about 1 s), loaded off the first request's path
            threading.Thread(target=_warm_up, name="highdicom-warm-up", daemon=True).start()

    @property
    def configured(self) -> bool:
        return bool(self._settings.dicomweb_url)

    def get(self) -> DicomWeb:
        """The open PACS (opening reads the password file).

        Raises:
            FailedPrecondition: no ``HISTOXPLAIN_DICOMWEB_URL``.
        """
        if not self.configured:
            raise FailedPrecondition(_NO_PACS)
        with self._lock:
            if self._pacs is None:
                self._pacs = open_pacs(self._settings)
            return self._pacs  # type: ignore[return-value]  # open_pacs is None only without a URL

    def read_tile(self, hit: SearchHit) -> np.ndarray:
        """The pixels of an indexed DICOM tile, re-read from the PACS (``Retrieval.dicom_tiles``)."""
        return self.get().read_tile(hit)

    def refused(self, pacs: DicomWeb) -> None:
        """The PACS refused ``pacs``'s credentials: the next call opens a new connection (and
        reads the password file again). Calls still using it finish with it."""
        with self._lock:
            if self._pacs is pacs:
                self._pacs = None

    def close(self, drain_s: float = 0.0) -> None:
        """Store the results queued for the background within ``drain_s`` seconds (the rest is
        given up, logged and counted), then close the connection."""
        self.writer.close(drain_s)
        with self._lock:
            pacs, self._pacs = self._pacs, None
        if pacs is not None:
            pacs.close()


def _warm_up() -> None:
    from histoxplain_service.pacs.results import warm_up

    warm_up()


def _require_pacs(pacs: GatewayPacs) -> None:
    if not pacs.configured:
        raise FailedPrecondition(_NO_PACS)


@dataclass(frozen=True)
class IndexDicomJob:
    """A checked ``IndexDicomRequest``; :meth:`run` on a worker thread."""

    index: str
    study_uid: str
    series_uids: tuple[str, ...]
    level: int
    label: str | None
    settings: Settings

    @classmethod
    def from_request(
        cls, request: pacs_pb2.IndexDicomRequest, name: str, core: Settings, pacs: GatewayPacs
    ) -> IndexDicomJob:
        """``name``: the request's index, already checked by the servicer."""
        _require_pacs(pacs)
        study = check_uid(request.study_instance_uid, "study_instance_uid")
        if len(request.series_instance_uids) > MAX_DICOM_SERIES:
            raise InvalidRequest(
                f"series_instance_uids names {len(request.series_instance_uids)} series; the limit is "
                f"{MAX_DICOM_SERIES} (send several requests, or none to index the whole study)"
            )
        series = tuple(
            check_uid(uid, f"series_instance_uids[{position}]")
            for position, uid in enumerate(request.series_instance_uids)
        )
        label = LABEL.check(request.label, "IndexDicomRequest") or None
        settings = converters.tiling_settings(core, request.tiling)
        return cls(name, study, series, check_pyramid_level(request.level), label, settings)

    def run(self, retrieval: Retrieval, pacs: GatewayPacs) -> IndexSummary:
        from histoxplain_service.pacs.indexing import index_dicom

        retrieval = Retrieval(self.settings, retrieval.backend, retrieval.index_engine, dicom_tiles=retrieval.dicom_tiles)
        connection = pacs.get()
        try:
            return index_dicom(
                retrieval, self.index, connection, self.study_uid, self.series_uids, level=self.level, label=self.label
            )
        except PermissionDenied:
            pacs.refused(connection)
            raise

    def response(self, summary: IndexSummary) -> pacs_pb2.IndexDicomResponse:
        """The run as a message; series are named by the UIDs in their sources
        (:func:`~histoxplain_service.pacs.slides.dicom_source`)."""
        return pacs_pb2.IndexDicomResponse(
            index=self.index,
            series=[
                pacs_pb2.IndexedDicomSeries(
                    series_instance_uid=_series_of(image.source), image_id=image.image_id, tiles=image.tiles,
                    status=_STATUSES[image.status],
                )
                for image in summary.images
            ],
            series_indexed=summary.images_indexed,
            tiles_indexed=summary.tiles_indexed,
            skipped=[
                pacs_pb2.SkippedDicomSeries(
                    series_instance_uid=_series_of(item.source), reason=converters.skip_reason(item.kind),
                    message=_without_uids(item.reason),
                )
                for item in summary.skipped
            ],
        )


def _series_of(source: str) -> str:
    """The Series Instance UID of a slide's source, ``dicomweb:studies/<study>/series/<series>``."""
    return source.rpartition("/series/")[2]


def _without_uids(message: str) -> str:
    """A skip reason for the response: the library names a skipped slide by its path; the
    caller knows the series from ``series_instance_uid``, so UIDs are left out of the text."""
    words = ["<series>" if "/series/" in word or word.count(".") > 3 else word for word in message.split(" ")]
    return " ".join(words)[: DETAIL.max_chars]


@dataclass(frozen=True)
class RegionJob:
    """A checked ``ExplainDicomRegionRequest``; :meth:`run` on a worker thread."""

    request: pacs_pb2.ExplainDicomRegionRequest
    index: str
    k: int
    image_ranking: bool
    choice: converters.ExplainChoice
    tile_filter: TileFilter | None

    @classmethod
    def from_request(
        cls, request: pacs_pb2.ExplainDicomRegionRequest, name: str, settings: GatewaySettings, pacs: GatewayPacs
    ) -> RegionJob:
        """``name``: the request's index, already checked by the servicer."""
        principal = PRINCIPAL.get()
        if request.store_results and principal is not None and not principal.has_role(STORE_RESULTS_ROLE):
            raise PermissionDenied(
                f"store_results writes into the PACS and needs the role '{STORE_RESULTS_ROLE}'; call without "
                "store_results, or ask the gateway's administrator for that role"
            )
        _require_pacs(pacs)
        check_uid(request.study_instance_uid, "study_instance_uid")
        check_uid(request.series_instance_uid, "series_instance_uid")
        if request.WhichOneof("region") is None:
            raise InvalidRequest("the request has no region; set region_px (level-0 pixels) or region_mm (millimetres)")
        check_pyramid_level(request.level)
        if request.store_mode not in _STORE_MODES:
            raise InvalidRequest(
                f"unknown store_mode {request.store_mode}; use STORE_MODE_SYNCHRONOUS or STORE_MODE_BACKGROUND"
            )
        k = check_k(request.k, settings.max_explain_k, "k")
        image_ranking = request.ranking != types_pb2.RANKING_LEVEL_TILE
        if request.ranking not in (
            types_pb2.RANKING_LEVEL_UNSPECIFIED, types_pb2.RANKING_LEVEL_TILE, types_pb2.RANKING_LEVEL_IMAGE
        ):
            raise InvalidRequest(f"unknown ranking level {request.ranking}; use RANKING_LEVEL_IMAGE or RANKING_LEVEL_TILE")
        choice = converters.explain_choice_from_proto(request.options)
        if choice.side not in ("query", "both"):
            raise InvalidRequest(
                "ExplainDicomRegion explains the region itself: options.side must be QUERY or BOTH, not RETRIEVED"
            )
        tile_filter = converters.tile_filter_from_proto(request.filter)
        return cls(request, name, k, image_ranking, choice, tile_filter)

    @property
    def cost(self) -> int:
        return self.choice.cost(self.k)

    def run(self, retrieval: Retrieval, pacs: GatewayPacs, timeout: float, max_bytes: int) -> pacs_pb2.ExplainDicomRegionResponse:
        from histoxplain_service.pacs.explain import Region, explain_region

        request = self.request
        if request.WhichOneof("region") == "region_px":
            box = request.region_px
            region = Region(box.x, box.y, box.width, box.height, "px")
        else:
            mm = request.region_mm
            region = Region(mm.x, mm.y, mm.width, mm.height, "mm")
        connection = pacs.get()
        try:
            result = explain_region(
                retrieval, self.index, connection, request.study_instance_uid, request.series_instance_uid, region,
                level=request.level, k=self.k, method=self.choice.method, side=self.choice.side,  # type: ignore[arg-type]
                store=request.store_results, store_overlay=request.store_overlay, polarity=self.choice.polarity,
                ranking="image" if self.image_ranking else "tile", tile_filter=self.tile_filter,
                options=self.choice.method_options, target=self.choice.target,
                correspondences=self.choice.correspondences, verify=self.choice.verify, timeout=timeout,
                writer=pacs.writer if request.store_mode == pacs_pb2.STORE_MODE_BACKGROUND else None,
            )
        except PermissionDenied:
            pacs.refused(connection)
            raise
        results = converters.explained_references(
            result.explanation, self.choice, list(result.cases) if self.image_ranking else None, max_bytes=max_bytes
        )
        box = result.box
        return pacs_pb2.ExplainDicomRegionResponse(
            options=converters.explain_choice_to_proto(self.choice),
            results=results,
            region=types_pb2.Box(x=box.x, y=box.y, width=box.w, height=box.h),
            level=result.level,
            referenced_cases=result.referenced,
            stored=[
                pacs_pb2.StoredDicomObject(
                    kind=_KINDS[item.kind], series_instance_uid=item.series_uid, sop_instance_uid=item.instance_uid,
                    sop_class_uid=item.sop_class_uid, state=_STATES[item.state],
                )
                for item in result.stored
            ],
        )
