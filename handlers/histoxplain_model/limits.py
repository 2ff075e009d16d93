"""Hard limits on what one request may ask for, defined once (torch-free).

Settings may lower some of them (``HISTOXPLAIN_MAX_K``, ``HISTOXPLAIN_MAX_EXPLAIN_K``,
``HISTOXPLAIN_MAX_MESSAGE_MB``) but never raise them past these values: every layer (CLI,
gateway, domain, TorchServe handler) checks against the same numbers, and the proto comments
state the same numbers (``tests/unit/gateway/test_limits_contract.py`` reads both).

Text fields
    :data:`TEXT_LIMITS` is the one table of the text a caller may store or send: for each field,
    its longest value in characters (Unicode code points, what ``len`` counts) and the proto
    fields that carry it. Stored text comes back in every search hit, so these limits are also
    what keeps a response of ``MAX_K`` hits far below the message limit (about 1.9 MB at worst
    with 4-byte UTF-8 characters, against 64 MiB), where unbounded labels made every search of
    an index fail with RESOURCE_EXHAUSTED.

Echoing input
    Error messages name the field, its length and the limit, never the value of a label, source
    or image id (they may carry patient data and messages are logged). Where naming a value
    helps (an index name, a point id, an enum spelling), :func:`shorten` repeats at most
    :data:`ECHO_CHARS` characters of it, so a 10,000-character name cannot turn an
    INVALID_ARGUMENT into a message over the client's metadata limit.

Pixel limits live with the decoder (``histoxplain_model.imageio``): ``HISTOXPLAIN_MAX_PIXELS``
for files read from disk, ``HISTOXPLAIN_MAX_REQUEST_PIXELS`` for images sent as bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from histoxplain_model.errors import InvalidRequest

__all__ = [
    "DETAIL",
    "DICOM_UID",
    "ECHO_CHARS",
    "FILTER_KEY",
    "FILTER_VALUE",
    "IMAGE_ID",
    "INDEX_NAME",
    "LABEL",
    "MAX_IMAGE_ID_CHARS",
    "MAX_CORRESPONDENCES",
    "MAX_BACKGROUND_STORES",
    "MAX_DICOM_SERIES",
    "MAX_INDEX_NAME_CHARS",
    "MAX_K",
    "MAX_METADATA_ENTRIES",
    "METADATA_KEY",
    "METADATA_VALUE",
    "MAX_MESSAGE_BYTES",
    "MAX_MPP",
    "MAX_N_SAMPLES",
    "MAX_PYRAMID_LEVEL",
    "MAX_RISE_BATCH",
    "MAX_RISE_GRID",
    "MAX_RISE_MASKS",
    "MIN_RISE_GRID",
    "MAX_TILE_SIZE",
    "MIN_TILE_SIZE",
    "POINT_ID",
    "SOURCE",
    "TEXT_LIMITS",
    "TextLimit",
    "VERIFY_FORWARD_PASSES_PER_MAP",
    "VERIFY_STEPS",
    "check_mpp",
    "check_pyramid_level",
    "check_uid",
    "shorten",
]

#: The most hits (tiles or images) one search returns; each explained hit costs a backward pass.
MAX_K = 100
#: The most noisy copies one SmoothGrad request may ask for (cost grows linearly with n).
MAX_N_SAMPLES = 256
#: The most random masks one RISE request may ask for: each is one forward pass of each image it
#: explains (query side: N for all k references; retrieved side: N per reference).
MAX_RISE_MASKS = 2000
#: RISE's mask grid, cells per side: 2x2 up to 32x32 (finer grids need many more masks).
MIN_RISE_GRID, MAX_RISE_GRID = 2, 32
#: The most masked images RISE sends through the encoder in one forward pass (bounds memory).
MAX_RISE_BATCH = 256
#: The most region-to-region correspondences one explained pair may ask for
#: (``ExplainOptions.correspondences``; they cost a top-N over the (HW)^2 cell pairs).
MAX_CORRESPONDENCES = 16
#: Deletion/insertion steps of ``ExplainOptions.verify`` (fixed: the caller cannot raise the cost).
VERIFY_STEPS = 8
#: Forward passes verify adds per explained map: the map's and its random map's deletion and
#: insertion interiors, 4 (steps - 1), plus the image and its blurred baseline.
VERIFY_FORWARD_PASSES_PER_MAP = 4 * (VERIFY_STEPS - 1) + 2
#: Default largest gRPC message, both directions (gateway and gateway -> TorchServe).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Largest microns per pixel accepted (exclusive lower bound 0). Level-0 scans are 0.1-1 µm/px;
#: 1000 (a millimetre per pixel) leaves room for deep pyramid levels and thumbnails while NaN,
#: infinities, zero and negative values, which would poison any physical-size computation, are refused.
MAX_MPP = 1000.0
#: Tile edges in pixels a setting or a request may ask for.
MIN_TILE_SIZE, MAX_TILE_SIZE = 16, 8192
#: The longest prefix of caller text an error message repeats (:func:`shorten`).
ECHO_CHARS = 24


def shorten(value: object, chars: int = ECHO_CHARS) -> str:
    """``repr`` of at most ``chars`` characters of ``value``, saying how many more there were.

    For messages that name a value (an index name, a point id): the caller recognises it, and
    the message stays short whatever was sent.
    """
    text = str(value)
    if len(text) <= chars:
        return repr(text)
    return f"{text[:chars]!r}... ({len(text):,} characters)"


@dataclass(frozen=True)
class TextLimit:
    """The longest value of one text field.

    Attributes:
        field: how messages name the field (its proto name).
        max_chars: the most characters (code points) it may hold.
        proto_fields: ``Message.field`` of every proto field that carries it; their comments
            state ``at most <max_chars> characters``.
    """

    field: str
    max_chars: int
    proto_fields: tuple[str, ...]

    def check(self, value: str, where: str = "") -> str:
        """``value`` when it is short enough.

        Args:
            where: which one it is, e.g. ``"image 3"`` or ``"image_ids[2]"``.

        Raises:
            InvalidRequest: naming the field, ``where``, the length and the limit, never the value.
        """
        if len(value) > self.max_chars:
            at = f" of {where}" if where else ""
            raise InvalidRequest(
                f"the {self.field}{at} is {len(value):,} characters long; the limit is {self.max_chars:,}"
            )
        return value


INDEX_NAME = TextLimit(
    "index", 64,
    ("IndexImagesConfig.index", "IndexImagesResponse.index", "SearchRequest.index", "IndexedReferences.index",
     "SearchAndExplainRequest.index", "DeleteImagesRequest.index", "DescribeIndexRequest.index", "IndexInfo.name",
     "IndexDicomRequest.index", "IndexDicomResponse.index", "ExplainDicomRegionRequest.index"),
)
#: Image ids are SHA-256 hex by default (40 characters kept); callers may use their own.
IMAGE_ID = TextLimit(
    "image_id", 256,
    ("ImageRecord.image_id", "SkippedImage.image_id", "IndexedReferences.image_ids", "DeleteImagesRequest.image_ids",
     "DeleteImagesResponse.missing_image_ids", "SearchHit.image_id", "IndexedDicomSeries.image_id"),
)
#: A class label (tissue type, diagnosis): a short name, stored with every tile.
LABEL = TextLimit("label", 256, ("ImageRecord.label", "SearchHit.label", "IndexDicomRequest.label"))
#: Provenance: 4096 is Linux's PATH_MAX, so any local path fits; DICOM UIDs are at most 64 each.
SOURCE = TextLimit("source", 4096, ("ImageRecord.source", "SearchHit.source"))
#: Point ids are UUIDs in their canonical 36-character form.
POINT_ID = TextLimit("point_id", 36, ("IndexedReferences.point_ids", "SearchHit.point_id"))
#: Text the server writes about one skipped input (cut to this length, never the caller's text).
DETAIL = TextLimit("message", 1024, ("SkippedImage.message", "SkippedDicomSeries.message"))
#: A DICOM UID (PS3.5 9.1): at most 64 characters; :func:`check_uid` also checks its form.
DICOM_UID = TextLimit(
    "DICOM UID", 64,
    ("IndexDicomRequest.study_instance_uid", "IndexDicomRequest.series_instance_uids",
     "IndexedDicomSeries.series_instance_uid", "SkippedDicomSeries.series_instance_uid",
     "ExplainDicomRegionRequest.study_instance_uid", "ExplainDicomRegionRequest.series_instance_uid",
     "StoredDicomObject.series_instance_uid", "StoredDicomObject.sop_instance_uid", "StoredDicomObject.sop_class_uid",
     "DicomReference.study_instance_uid", "DicomReference.series_instance_uid", "DicomReference.sop_instance_uid",
     "DicomReference.frame_of_reference_uid"),
)

#: An image's descriptive fields (ImageRecord.metadata, stored with every tile and returned on
#: every hit): at most this many entries, keys like one segment of a filter key, short values.
MAX_METADATA_ENTRIES = 16
METADATA_KEY = TextLimit("metadata key", 64, ())
METADATA_VALUE = TextLimit("metadata value", 256, ())

#: Search filters (never stored): a payload key, and one accepted value (a label, a source...).
FILTER_KEY = TextLimit("filter key", 64, ("FieldCondition.key",))
FILTER_VALUE = TextLimit("filter value", 4096, ("FieldCondition.values",))

TEXT_LIMITS: tuple[TextLimit, ...] = (
    INDEX_NAME, IMAGE_ID, LABEL, SOURCE, POINT_ID, DETAIL, FILTER_KEY, FILTER_VALUE, DICOM_UID, METADATA_KEY,
    METADATA_VALUE,
)
MAX_INDEX_NAME_CHARS = INDEX_NAME.max_chars
MAX_IMAGE_ID_CHARS = IMAGE_ID.max_chars


def check_mpp(mpp: float | None, where: str = "") -> float | None:
    """Microns per pixel: ``None`` (unknown) or a finite number in (0, :data:`MAX_MPP`].

    Raises:
        InvalidRequest: NaN, an infinity, or a value out of range (the value is a number, so the
            message repeats it).
    """
    if mpp is None:
        return None
    value = float(mpp)
    if not (math.isfinite(value) and 0.0 < value <= MAX_MPP):
        at = f" of {where}" if where else ""
        raise InvalidRequest(f"mpp{at} is {value}; it must be a finite number in (0, {MAX_MPP:g}] µm/px, or unset")
    return value


#: The most series one IndexDicom request may name (a study's slides; each is read whole at its
#: level, so the call's deadline bounds the rest).
MAX_DICOM_SERIES = 64
#: The most region results one process holds for its background PACS write-back (ExplainDicomRegion
#: with STORE_MODE_BACKGROUND); each holds its region's heatmap (and pixels with store_overlay),
#: itself within the request pixel limit. Past it such requests are refused with RESOURCE_EXHAUSTED.
MAX_BACKGROUND_STORES = 16
#: The deepest pyramid level a DICOM request may name (a level halves the size: 2^31 is past any slide).
MAX_PYRAMID_LEVEL = 31


def check_pyramid_level(level: int, where: str = "level") -> int:
    """``level`` when it is 0 (full resolution) to :data:`MAX_PYRAMID_LEVEL`.

    Raises:
        InvalidRequest: naming ``where`` (e.g. ``--level``) and the range.
    """
    if not 0 <= level <= MAX_PYRAMID_LEVEL:
        raise InvalidRequest(f"{where}={level} is out of range; use 0 (full resolution) to {MAX_PYRAMID_LEVEL}")
    return level


_UID_FORM = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def check_uid(value: str, where: str) -> str:
    """``value`` when it is a DICOM UID: 1 to 64 characters, numbers without leading zeros
    joined by dots (PS3.5 9.1). UIDs go into DICOMweb URLs, so nothing else may pass.

    Raises:
        InvalidRequest: naming ``where`` (e.g. ``series_instance_uids[2]``), never the value.
    """
    DICOM_UID.check(value, where)
    if not _UID_FORM.fullmatch(value):
        raise InvalidRequest(
            f"{where} is not a DICOM UID; give 1 to {DICOM_UID.max_chars} characters of digits and dots, "
            "each component without leading zeros"
        )
    return value
