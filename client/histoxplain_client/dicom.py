"""DICOM slides in the gateway's PACS: request builders and typed results of ``index_dicom`` and
``explain_dicom_region`` (shared by Client and AsyncClient).

The gateway reads slides from the one PACS it is configured with; a request names slides by
Study / Series Instance UID only (never a URL or credentials). Regions are level-0 pixels
``(x, y, width, height)`` or slide millimetres (``region_mm``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from histoxplain_client._convert import (
    FilterInput,
    _decode_reference,
    _enum_name,
    _enum_value,
    _skip_reason,
    tile_filter,
)
from histoxplain_client._proto.histoxplain.v1 import pacs_pb2, types_pb2
from histoxplain_client.enums import METHODS, POLARITIES, RANKINGS, SIDES
from histoxplain_client.results import Box, Explanation

__all__ = [
    "DicomIndexSummary",
    "DicomRegionExplanation",
    "IndexedSeries",
    "SkippedSeries",
    "StoredDicomObject",
]

#: ``StoredDicomObject.kind`` names.
_KINDS = {
    "parametric_map": pacs_pb2.STORED_DICOM_OBJECT_KIND_PARAMETRIC_MAP,
    "structured_report": pacs_pb2.STORED_DICOM_OBJECT_KIND_STRUCTURED_REPORT,
    "key_object_selection": pacs_pb2.STORED_DICOM_OBJECT_KIND_KEY_OBJECT_SELECTION,
    "secondary_capture": pacs_pb2.STORED_DICOM_OBJECT_KIND_SECONDARY_CAPTURE,
}
#: ``StoredDicomObject.state`` names.
_STATES = {
    "stored": pacs_pb2.STORED_DICOM_OBJECT_STATE_STORED,
    "queued": pacs_pb2.STORED_DICOM_OBJECT_STATE_QUEUED,
}
_STATUSES = {
    "indexed": pacs_pb2.DICOM_INDEX_STATUS_INDEXED,
    "unchanged": pacs_pb2.DICOM_INDEX_STATUS_UNCHANGED,
    "relabelled": pacs_pb2.DICOM_INDEX_STATUS_RELABELLED,
}


@dataclass(frozen=True)
class IndexedSeries:
    """A slide series index_dicom handled: its UID, its image id in the index (as hits and
    ``delete`` name it), its tiles, and ``status``: indexed | unchanged | relabelled."""

    series_uid: str
    image_id: str
    tiles: int
    status: str


@dataclass(frozen=True)
class SkippedSeries:
    """A slide series index_dicom did not index: its UID, the reason name and the detail."""

    series_uid: str
    reason: str
    message: str


@dataclass(frozen=True)
class DicomIndexSummary:
    """What index_dicom did. Indexing a series again updates it, never duplicates it."""

    index: str
    series: tuple[IndexedSeries, ...]
    series_indexed: int
    tiles_indexed: int
    skipped: tuple[SkippedSeries, ...]


@dataclass(frozen=True)
class StoredDicomObject:
    """A DICOM object written into the query's study: ``kind`` is parametric_map,
    structured_report, key_object_selection or secondary_capture; ``state`` is stored (in the
    PACS when the call returned) or queued (``store_background``: the gateway stores it after)."""

    kind: str
    series_uid: str
    instance_uid: str
    sop_class_uid: str
    state: str = "stored"


@dataclass(frozen=True, eq=False)
class DicomRegionExplanation(Explanation):
    """Result of explain_dicom_region: an :class:`Explanation` (one reference per similar case,
    best first; each hit's ``dicom`` says where its tile lives) plus the region read (level-0
    pixels, cut to the slide), its level, how many cases the stored objects reference, and the
    objects stored (empty unless ``store_results``)."""

    region: Box
    level: int
    referenced_cases: int
    stored: tuple[StoredDicomObject, ...]


def index_dicom_request(
    index: str, study_uid: str, series_uids: Sequence[str], level: int, tiling: types_pb2.TilingOptions, label: str
) -> pacs_pb2.IndexDicomRequest:
    if isinstance(series_uids, str):
        raise TypeError("series_uids is a sequence of UIDs, not one string")
    if level < 0:
        raise ValueError(f"level must be >= 0, got {level}")
    return pacs_pb2.IndexDicomRequest(
        index=index, study_instance_uid=study_uid, series_instance_uids=list(series_uids), level=level,
        tiling=tiling, label=label,
    )


def decode_index_summary(response: pacs_pb2.IndexDicomResponse) -> DicomIndexSummary:
    return DicomIndexSummary(
        index=response.index,
        series=tuple(
            IndexedSeries(item.series_instance_uid, item.image_id, item.tiles, _enum_name(_STATUSES, item.status, "unknown"))
            for item in response.series
        ),
        series_indexed=response.series_indexed,
        tiles_indexed=response.tiles_indexed,
        skipped=tuple(
            SkippedSeries(
                item.series_instance_uid,
                _skip_reason(item.reason),
                item.message,
            )
            for item in response.skipped
        ),
    )


def explain_region_request(
    index: str,
    study_uid: str,
    series_uid: str,
    region: Sequence[int] | None,
    region_mm: Sequence[float] | None,
    level: int,
    k: int,
    ranking: str,
    options: types_pb2.ExplainOptions,
    filter: FilterInput | None,
    store_results: bool,
    store_overlay: bool = False,
    store_background: bool = False,
) -> pacs_pb2.ExplainDicomRegionRequest:
    """Exactly one of ``region`` (level-0 pixels) and ``region_mm`` (slide millimetres), each
    ``(x, y, width, height)``."""
    if (region is None) == (region_mm is None):
        raise ValueError("give exactly one of region=(x, y, width, height) in level-0 pixels or region_mm=(...)")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if level < 0:
        raise ValueError(f"level must be >= 0, got {level}")
    request = pacs_pb2.ExplainDicomRegionRequest(
        index=index, study_instance_uid=study_uid, series_instance_uid=series_uid, level=level, k=k,
        ranking=_enum_value("ranking", RANKINGS, ranking), options=options, filter=tile_filter(filter),
        store_results=store_results, store_overlay=store_overlay,
        store_mode=pacs_pb2.STORE_MODE_BACKGROUND if store_background else pacs_pb2.STORE_MODE_SYNCHRONOUS,
    )
    if region is not None:
        x, y, width, height = _four("region", region)
        if not all(float(v).is_integer() and v >= 0 for v in (x, y, width, height)) or width < 1 or height < 1:
            raise ValueError("region is (x, y, width, height) in level-0 pixels: integers >= 0, width and height >= 1")
        request.region_px.CopyFrom(types_pb2.Box(x=int(x), y=int(y), width=int(width), height=int(height)))
    else:
        x, y, width, height = _four("region_mm", region_mm)  # type: ignore[arg-type]
        if not all(math.isfinite(v) for v in (x, y, width, height)) or width <= 0 or height <= 0:
            raise ValueError("region_mm is (x, y, width, height) in slide millimetres: finite, width and height > 0")
        request.region_mm.CopyFrom(pacs_pb2.SlideRegionMm(x=x, y=y, width=width, height=height))
    return request


def _stored_state(state: int) -> str:
    """A StoredDicomObject's state; unset: ``stored`` (gateways before store_mode stored synchronously)."""
    return "stored" if state == pacs_pb2.STORED_DICOM_OBJECT_STATE_UNSPECIFIED else _enum_name(_STATES, state, "unknown")


def _four(name: str, values: Sequence[float]) -> tuple[float, float, float, float]:
    items = tuple(values)
    if len(items) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} is four numbers (x, y, width, height)")
    return items  # type: ignore[return-value]


def decode_region_explanation(response: pacs_pb2.ExplainDicomRegionResponse) -> DicomRegionExplanation:
    return DicomRegionExplanation(
        method=_enum_name(METHODS, response.options.method, "gradcam"),
        polarity=_enum_name(POLARITIES, response.options.polarity, "similar"),
        side=_enum_name(SIDES, response.options.side, "both"),
        references=tuple(_decode_reference(reference) for reference in response.results),
        region=Box(response.region.x, response.region.y, response.region.width, response.region.height),
        level=response.level,
        referenced_cases=response.referenced_cases,
        stored=tuple(
            StoredDicomObject(
                _enum_name(_KINDS, item.kind, "unknown"), item.series_instance_uid, item.sop_instance_uid,
                item.sop_class_uid, _stored_state(item.state),
            )
            for item in response.stored
        ),
    )
