"""The domain's value types: tiles, hits, index descriptions and explained searches.

Frozen dataclasses that every layer passes around (the index engines fill them, the domain
combines them, the gateway converts them to messages). This module imports nothing from the
service and no engine, so the index adapters can return these types without an import cycle
and without the domain knowing which engine made them.

Tile filters
    :class:`TileFilter` narrows a search to tiles whose payload matches: any stored key (``label``,
    ``source``, ``image_id``, ``level``, or a key a later ingest adds, e.g. ``organ``), each
    condition a set of accepted values. Every engine translates the same filter to its own
    conditions, so a filter means the same on each (``tests/unit/service/test_index_congruence.py``).

Image metadata
    An image may carry descriptive fields (``{"organ": "colon", "stain": "HE"}``, at most
    :data:`~histoxplain_model.limits.MAX_METADATA_ENTRIES`), stored with each of its tiles under
    the payload key ``metadata`` and returned on every hit. A filter names such a field by its
    own key (``organ``): :func:`payload_key` maps it to ``metadata.organ``, where the engines
    keep a keyword payload index per field. Built-in keys cannot be metadata keys, so a filter
    key is never ambiguous.

DICOM tiles
    A tile cut from a DICOM whole-slide series read over DICOMweb carries a
    :class:`DicomReference` (payload key ``dicom``): the PACS is the system of record for its
    pixels, so the index keeps none and the tile is re-read from the PACS when it is explained
    (:mod:`histoxplain_service.pacs`). Tiles of files keep no such key.

Point ids
    A tile's id is ``uuid5(namespace, "image_id/level/x,y,w,h")`` with a fixed namespace, so the
    same tile gets the same id on every machine and every run: indexing an image again
    overwrites its points instead of adding copies. Existing indexes hold ids made by this
    rule; changing the namespace or the name format would orphan them.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.limits import MAX_METADATA_ENTRIES, METADATA_KEY, METADATA_VALUE, SOURCE, shorten
from histoxplain_model.results import Faithfulness, RegionCorrespondence

__all__ = [
    "Box",
    "DeleteSummary",
    "DicomReference",
    "ExplainedHit",
    "ExplainedSearch",
    "FieldMatch",
    "FilterValue",
    "ImageHit",
    "IndexInfo",
    "METADATA_PAYLOAD_KEY",
    "Metadata",
    "SearchHit",
    "TileFilter",
    "TileRecord",
    "check_metadata",
    "payload_key",
    "point_id_for",
]

# Fixed namespace so that point ids are the same on every machine and every run.
_POINT_NAMESPACE = uuid.UUID("6f1d3c5e-2b8a-5d4e-9c71-3a0e8f2b6d10")


@dataclass(frozen=True)
class Box:
    """A tile's rectangle in level-0 pixels (top-left corner, width, height)."""

    x: int
    y: int
    w: int
    h: int

    def as_dict(self) -> dict[str, int]:
        return {"x": self.x, "y": self.y, "w": self.w, "h": self.h}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Box:
        return cls(int(values["x"]), int(values["y"]), int(values["w"]), int(values["h"]))


def point_id_for(image_id: str, level: int, box: Box) -> str:
    """Deterministic point id of one tile: the same image, level and box give the same id."""
    return str(uuid.uuid5(_POINT_NAMESPACE, f"{image_id}/{level}/{box.x},{box.y},{box.w},{box.h}"))


@dataclass(frozen=True)
class DicomReference:
    """Where a tile's pixels live in a PACS: one pyramid level of a DICOM whole-slide series.

    Attributes:
        study_uid, series_uid: the slide's Study and Series Instance UIDs.
        instance_uid: SOP Instance UID of the level's image (the level the tile was read from).
        frame_of_reference_uid: the slide's Frame of Reference UID (``None`` if it declares none).
        tile_size: the tile edge the tile was embedded at (its pixels were padded to it).
    """

    study_uid: str
    series_uid: str
    instance_uid: str
    frame_of_reference_uid: str | None
    tile_size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "instance_uid": self.instance_uid,
            "frame_of_reference_uid": self.frame_of_reference_uid,
            "tile_size": self.tile_size,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DicomReference:
        frame_of_reference = values.get("frame_of_reference_uid")
        return cls(
            str(values["study_uid"]), str(values["series_uid"]), str(values["instance_uid"]),
            None if frame_of_reference is None else str(frame_of_reference), int(values["tile_size"]),
        )


#: An image's descriptive fields as sorted (key, value) pairs (hashable, so records stay hashable).
Metadata = tuple[tuple[str, str], ...]
#: The payload key that holds them (a JSON object).
METADATA_PAYLOAD_KEY = "metadata"
#: Payload keys histoxplain writes itself: no metadata key may take one of these names.
BUILTIN_PAYLOAD_KEYS = frozenset({
    "image_id", "source", "label", "box", "level", "mpp", "tile_index", "tiles_in_image", "dicom", METADATA_PAYLOAD_KEY,
})
_METADATA_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_metadata(metadata: Mapping[str, str] | None, where: str = "") -> Metadata:
    """An image's metadata as sorted pairs, checked: entries, key form and length, value length.

    Raises:
        InvalidRequest: naming the rule and a key (short, the caller's own field name), never a value.
    """
    if not metadata:
        return ()
    at = f" of {where}" if where else ""
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidRequest(f"the metadata{at} has {len(metadata)} entries; the limit is {MAX_METADATA_ENTRIES}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidRequest(f"metadata{at} must map text keys to text values")
        METADATA_KEY.check(key, where)
        if not _METADATA_KEY.fullmatch(key) or key in BUILTIN_PAYLOAD_KEYS:
            raise InvalidRequest(
                f"metadata key {shorten(key)}{at} is not allowed; use letters, digits and '_' (starting with a "
                f"letter or '_'), not one of {', '.join(sorted(BUILTIN_PAYLOAD_KEYS))}"
            )
        METADATA_VALUE.check(value, f"key {shorten(key)}{at}")
    return tuple(sorted(metadata.items()))


def payload_key(key: str) -> str:
    """Where a filter key lives in the payload: built-in keys (``label``, ``box.w``) as they are,
    any other (an image's metadata field, ``organ``) under ``metadata.``."""
    return key if key.split(".", 1)[0] in BUILTIN_PAYLOAD_KEYS else f"{METADATA_PAYLOAD_KEY}.{key}"


@dataclass(frozen=True)
class TileRecord:
    """What the index stores about one tile (its payload); ``dicom`` only for tiles of DICOM slides."""

    image_id: str
    source: str
    label: str | None
    box: Box
    level: int
    mpp: float | None
    tile_index: int
    tiles_in_image: int
    dicom: DicomReference | None = None
    metadata: Metadata = ()

    @property
    def point_id(self) -> str:
        return point_id_for(self.image_id, self.level, self.box)

    def payload(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "source": self.source,
            "label": self.label,
            "box": self.box.as_dict(),
            "level": self.level,
            "mpp": self.mpp,
            "tile_index": self.tile_index,
            "tiles_in_image": self.tiles_in_image,
        } | ({} if self.dicom is None else {"dicom": self.dicom.as_dict()}) | (
            {METADATA_PAYLOAD_KEY: dict(self.metadata)} if self.metadata else {}
        )

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> TileRecord:
        return cls(
            image_id=str(payload["image_id"]),
            source=str(payload.get("source", "")),
            label=payload.get("label"),
            box=Box.from_dict(payload["box"]),
            level=int(payload.get("level", 0)),
            mpp=None if payload.get("mpp") is None else float(payload["mpp"]),
            tile_index=int(payload.get("tile_index", 0)),
            tiles_in_image=int(payload.get("tiles_in_image", 1)),
            dicom=None if payload.get("dicom") is None else DicomReference.from_dict(payload["dicom"]),
            metadata=tuple(sorted((payload.get(METADATA_PAYLOAD_KEY) or {}).items())),
        )


#: A value a filter condition accepts: payload text, or an integer (``level``) or flag.
FilterValue = str | int | bool

#: Payload keys a filter may name: identifiers, dotted for nested objects (``box.w``).
_FILTER_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,3}")
#: Bounds that keep one filter cheap to check and to send: conditions, and values per condition.
MAX_FILTER_CONDITIONS = 32
MAX_FILTER_VALUES = 1024
#: Payload keys stored as integers: text front ends (gateway, CLI) turn their filter values to ``int``.
INTEGER_FILTER_KEYS = frozenset({"level", "tile_index", "tiles_in_image", "box.x", "box.y", "box.w", "box.h"})


@dataclass(frozen=True)
class FieldMatch:
    """One condition: the payload value at ``key`` is one of ``values``.

    ``values`` are all text, or all integers, or a single flag (what every Qdrant engine can match
    exactly); text is compared exactly (case and whitespace included). A tile without the key, or
    with ``null`` there (an unlabelled tile's ``label``), matches no value.
    """

    key: str
    values: tuple[FilterValue, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not _FILTER_KEY.fullmatch(self.key):
            raise InvalidRequest(
                f"filter key {shorten(self.key)} is not a payload key; use letters, digits and '_' "
                "(dots for nested keys), e.g. label, source, image_id, level"
            )
        values = self.values
        if isinstance(values, (str, bytes, int)) or not isinstance(values, Sequence):
            values = (values,)  # type: ignore[assignment]
        values = tuple(values)
        object.__setattr__(self, "values", values)
        if not values or len(values) > MAX_FILTER_VALUES:
            raise InvalidRequest(
                f"filter on {self.key!r} has {len(values)} values; give 1 to {MAX_FILTER_VALUES}"
            )
        if all(isinstance(v, str) for v in values):
            for v in values:
                SOURCE.check(v, f"a filter value for {self.key!r}")
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            pass
        elif len(values) == 1 and isinstance(values[0], bool):
            pass
        else:
            # named by type only: the values are caller text that may carry patient data
            raise InvalidRequest(
                f"filter on {self.key!r} mixes value types or has an unsupported one "
                f"({sorted({type(v).__name__ for v in values})}); give text values, integer values, or one true/false"
            )


@dataclass(frozen=True)
class TileFilter:
    """Which tiles a search may return: every ``must`` condition holds and no ``must_not`` one does.

    Build one with :meth:`where` (``TileFilter.where(label="tumour", organ=["skin", "colon"])``);
    combine with :meth:`also`. An empty filter keeps every tile.
    """

    must: tuple[FieldMatch, ...] = ()
    must_not: tuple[FieldMatch, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "must", tuple(self.must))
        object.__setattr__(self, "must_not", tuple(self.must_not))
        if len(self.must) + len(self.must_not) > MAX_FILTER_CONDITIONS:
            raise InvalidRequest(f"a filter has at most {MAX_FILTER_CONDITIONS} conditions")

    @classmethod
    def where(cls, **conditions: FilterValue | Sequence[FilterValue]) -> TileFilter:
        """Tiles whose ``key`` holds the value (or one of the values) given for each key."""
        return cls(tuple(FieldMatch(key, value) for key, value in conditions.items()))  # type: ignore[arg-type]

    @classmethod
    def from_mapping(
        cls, must: Mapping[str, FilterValue | Sequence[FilterValue]] | None = None,
        must_not: Mapping[str, FilterValue | Sequence[FilterValue]] | None = None,
    ) -> TileFilter:
        """``{key: value or values}`` to keep, and to leave out."""
        return cls(
            tuple(FieldMatch(key, value) for key, value in (must or {}).items()),  # type: ignore[arg-type]
            tuple(FieldMatch(key, value) for key, value in (must_not or {}).items()),  # type: ignore[arg-type]
        )

    def also(self, other: TileFilter | None) -> TileFilter:
        """Both filters' conditions (the tiles both keep)."""
        if other is None:
            return self
        return TileFilter(self.must + other.must, self.must_not + other.must_not)

    @staticmethod
    def combine(tile_filter: TileFilter | None, label: str | None = None) -> TileFilter | None:
        """``tile_filter`` narrowed to ``label`` (the older ``label=`` argument of the search calls);
        ``None`` when no condition is left."""
        must = (tile_filter.must if tile_filter is not None else ()) + (
            (FieldMatch("label", (label,)),) if label is not None else ()
        )
        must_not = tile_filter.must_not if tile_filter is not None else ()
        return TileFilter(must, must_not) if must or must_not else None


@dataclass(frozen=True)
class SearchHit:
    """One retrieved tile. ``score`` is the cosine similarity to the query, in [-1, 1];
    ``dicom``: where its pixels live when it was cut from a DICOM slide."""

    score: float
    point_id: str
    image_id: str
    label: str | None
    source: str
    box: Box
    level: int
    mpp: float | None
    tile_index: int
    dicom: DicomReference | None = None
    metadata: Metadata = ()

    @classmethod
    def from_record(cls, record: TileRecord, score: float, point_id: str | None = None) -> SearchHit:
        """The hit of a stored tile; ``point_id`` as the engine returned it (default: the record's)."""
        return cls(
            score, record.point_id if point_id is None else point_id, record.image_id, record.label,
            record.source, record.box, record.level, record.mpp, record.tile_index, record.dicom, record.metadata,
        )


@dataclass(frozen=True)
class ImageHit:
    """One retrieved image, ranked by combining its tiles' hits (see
    :mod:`histoxplain_service.domain.ranking`).

    Attributes:
        score: mean over the query tiles of this image's best tile score.
        tiles: for each query tile, in query order, this image's best-matching tile.
    """

    score: float
    image_id: str
    label: str | None
    source: str
    tiles: tuple[SearchHit, ...]


@dataclass(frozen=True)
class IndexInfo:
    name: str
    preset: str
    dim: int
    n_points: int
    n_images: int


@dataclass(frozen=True)
class ExplainedHit:
    """One reference explained against the query.

    Attributes:
        hit: the indexed tile (``None`` when the reference was an image given in the request).
        similarity: cosine similarity of the query and this reference as the model computes it.
        image: the reference's pixels (H, W, 3) uint8.
        query_heatmap: (h, w) float32 in [0, 1]: where the query drives this (dis)similarity.
        hit_heatmap: (h, w) float32 in [0, 1]: where the reference drives it.
        position: the reference's place among those explained (its rank in the search, or its
            position in the request); kept when the hits are re-ranked.
        correspondences: matched region pairs (query cell <-> this reference's cell), best
            first; empty unless asked.
        query_faithfulness / hit_faithfulness: each map's deletion/insertion against a random
            map (``verify``); ``None`` unless asked and that side was explained.
    """

    hit: SearchHit | None
    similarity: float
    image: np.ndarray
    query_heatmap: np.ndarray | None
    hit_heatmap: np.ndarray | None
    position: int = 0
    correspondences: tuple[RegionCorrespondence, ...] = ()
    query_faithfulness: Faithfulness | None = None
    hit_faithfulness: Faithfulness | None = None


@dataclass(frozen=True)
class ExplainedSearch:
    """A query explained against each of its references, for one method and polarity."""

    method: str
    polarity: str
    side: str
    query_image: np.ndarray
    hits: tuple[ExplainedHit, ...]

    def ranked(self, k: int = 0) -> ExplainedSearch:
        """The hits most similar first (ties keep their order), cut to the best ``k`` (0: all)."""
        hits = sorted(self.hits, key=lambda hit: -hit.similarity)
        return replace(self, hits=tuple(hits[:k] if k else hits))


@dataclass(frozen=True)
class DeleteSummary:
    """What deleting images from an index did: ``missing_image_ids`` were not in it."""

    images_deleted: int
    tiles_deleted: int
    missing_image_ids: tuple[str, ...]
