"""The Qdrant adapter of the index interface (:mod:`.base`): one collection per index name,
one point per tile.

Storage
    With ``QDRANT_URL`` set: a Qdrant server, optionally with ``QDRANT_API_KEY``. Otherwise, with
    ``HISTOXPLAIN_INDEX_ENGINE=local``: qdrant-client local mode under ``<data_dir>/qdrant`` (one
    process at a time holds the folder; the embedded default is :mod:`.edge`). Tile pixels live
    beside it in a :class:`~.tile_store.TileStore`, or, with ``HISTOXPLAIN_TILE_PIXELS=payload``
    (several gateways in front of one Qdrant), in each point's payload. A new collection takes
    its shards, replication, HNSW, quantization and on-disk settings from :mod:`.qdrant_config`.

Encoder record
    Each collection stores ``{"histoxplain": {"preset": ..., "dim": ..., "schema": 1}}`` in the
    collection ``metadata`` (a Qdrant >= 1.16 feature that qdrant-client 1.20 local mode also
    persists, checked here). That keeps the record in the collection itself, so it moves and is
    backed up with the points, and needs neither a reserved point that every search would have
    to filter out nor a vector name that would tie the preset name to Qdrant's naming rules.
    Indexing or searching with another encoder is refused (:class:`FailedPrecondition`).

Points
    The id is :func:`~histoxplain_service.domain.types.point_id_for` (``uuid5(image_id, level,
    box)``), so indexing the same image again overwrites its points instead of adding copies.
    The payload holds ``image_id, source, label, box {x, y, w, h} (level-0 pixels), level, mpp
    (µm/px or null), tile_index, tiles_in_image``. An image is complete when every expected
    point exists and no other point carries its ``image_id``; :meth:`QdrantIndex.finish_image`
    removes points of an older tiling of the same image.

Errors
    Connection failures and server errors become ``DependencyUnavailable`` naming what was being
    done (:func:`_qdrant_errors`), so callers never see qdrant-client's exception types. Messages
    reach gateway clients and the log, so they name neither the Qdrant address, nor a folder, nor
    an image id (caller text that may carry patient data); the log gets the client's error.

Nothing here ever drops or recreates an existing collection. The module is longer than most:
it is the whole adapter (client, error mapping, collection logic), and each method is a few
Qdrant calls that read best next to the filters and the error mapping they share.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from qdrant_client import QdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from histoxplain_model.errors import (
    DependencyUnavailable,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
)
from histoxplain_service.config import Settings
from histoxplain_service.domain.types import (
    FieldMatch,
    IndexInfo,
    Metadata,
    SearchHit,
    TileFilter,
    TileRecord,
    payload_key,
)
from histoxplain_service.index.base import (
    INDEX_NAME_PATTERN,
    PAYLOAD_INDEXES,
    ImageState,
    IndexEngine,
    VectorIndex,
    validate_index_name,
    validate_k,
)
from histoxplain_service.index.local_lock import lock_holder
from histoxplain_service.index.qdrant_config import (
    PIXELS_KEY,
    WITHOUT_PIXELS,
    collection_config,
    pixels_from_payload,
    pixels_payload,
    search_params,
)
from histoxplain_service.index.tile_store import TileStore

__all__ = ["QdrantEngine", "QdrantIndex", "open_qdrant"]

log = logging.getLogger(__name__)

_METADATA_KEY = "histoxplain"
_SCHEMA = 1
_SCROLL_PAGE = 1024


def open_qdrant(settings: Settings, timeout_s: int | None = None) -> QdrantClient:
    """A Qdrant client: the server at ``settings.qdrant_url``, else local mode under the data folder.

    ``timeout_s``: the HTTP timeout of server calls (``None``: qdrant-client's default).

    Raises:
        FailedPrecondition: the local folder is held by another process (local mode allows one).
    """
    if settings.qdrant_url:
        # No compatibility check here: it would contact the server at start-up; the first call
        # reports an unreachable server as DependencyUnavailable instead.
        return QdrantClient(
            url=settings.qdrant_url, api_key=settings.qdrant_api_key, timeout=timeout_s, check_compatibility=False
        )
    path = settings.qdrant_path
    path.mkdir(parents=True, exist_ok=True)
    try:
        return QdrantClient(path=str(path))
    except RuntimeError as exc:
        if "already accessed" not in str(exc):
            raise
        holder = lock_holder(path / ".lock") or "another process"
        raise FailedPrecondition(
            f"the embedded index store (qdrant/ in the data folder, HISTOXPLAIN_DATA or --data-dir) is in use "
            f"by {holder}; embedded Qdrant allows one process at a time: stop that process (a running gateway "
            "or `histoxplain` command) and retry, or run a Qdrant server and set QDRANT_URL"
        ) from None


@contextlib.contextmanager
def _qdrant_errors(action: str) -> Iterator[None]:
    """Connection failures and server errors -> DependencyUnavailable with what was being done."""
    try:
        yield
    except ResponseHandlingException as exc:
        log.warning("Qdrant is unreachable while %s: %s", action, exc)
        raise DependencyUnavailable(f"Qdrant is unreachable while {action}; check QDRANT_URL") from exc
    except UnexpectedResponse as exc:
        log.warning("Qdrant answered HTTP %s while %s", exc.status_code, action)
        hint = "check QDRANT_API_KEY" if exc.status_code in (401, 403) else "check the Qdrant server log"
        raise DependencyUnavailable(
            f"Qdrant answered HTTP {exc.status_code} while {action}; {hint}"
        ) from exc


def _encoder_record(metadata: Mapping[str, Any] | None) -> tuple[str, int] | None:
    record = (metadata or {}).get(_METADATA_KEY)
    if not isinstance(record, Mapping) or "preset" not in record or "dim" not in record:
        return None
    return str(record["preset"]), int(record["dim"])


def _hit(point: Any) -> SearchHit:
    return SearchHit.from_record(TileRecord.from_payload(point.payload or {}), float(point.score), str(point.id))


def _server_timeout(timeout: float | None) -> int | None:
    """A request's remaining seconds as Qdrant's server-side timeout (whole seconds, at least 1)."""
    return None if timeout is None else max(1, math.ceil(timeout))


def _image_condition(image_ids: Sequence[str]) -> qm.FieldCondition:
    return qm.FieldCondition(key="image_id", match=qm.MatchAny(any=list(image_ids)))


def _image_filter(image_ids: Sequence[str]) -> qm.Filter:
    return qm.Filter(must=[_image_condition(image_ids)])


def _field_condition(condition: FieldMatch) -> qm.FieldCondition:
    values, key = list(condition.values), payload_key(condition.key)
    if len(values) == 1:
        return qm.FieldCondition(key=key, match=qm.MatchValue(value=values[0]))
    return qm.FieldCondition(key=key, match=qm.MatchAny(any=values))


def _search_filter(
    label: str | None, image_ids: Sequence[str] | None = None, tile_filter: TileFilter | None = None
) -> qm.Filter | None:
    """Only tiles ``tile_filter`` keeps, of ``label`` and of ``image_ids`` (each ``None``: no restriction)."""
    combined = TileFilter.combine(tile_filter, label)
    must: list[qm.Condition] = [_field_condition(c) for c in combined.must] if combined else []
    must_not: list[qm.Condition] = [_field_condition(c) for c in combined.must_not] if combined else []
    if image_ids is not None:
        must.append(_image_condition(image_ids))
    return qm.Filter(must=must or None, must_not=must_not or None) if must or must_not else None


class QdrantIndex(VectorIndex):
    """One named index: a Qdrant collection of tile embeddings plus their stored pixels.

    Args:
        client: from :func:`open_qdrant`.
        name: the index name (letters, digits, ``-``, ``_``); also the collection name.
        tile_store: where tile pixels are kept; ``None`` keeps none there (then ``load_tile``
            fails unless ``settings.tile_pixels`` keeps them in the payload).
        settings: how a new collection is created and queries search (:mod:`.qdrant_config`),
            and whether pixels go in the payload (``tile_pixels="payload"``); default: the defaults.
    """

    def __init__(
        self, client: QdrantClient, name: str, tile_store: TileStore | None = None, settings: Settings | None = None,
    ) -> None:
        self.client = client
        self.name = validate_index_name(name)
        self.tile_store = tile_store
        self.settings = settings or Settings()
        self.pixels_in_payload = self.settings.tile_pixels == "payload"
        self._metadata_indexed = set()
        # local mode searches exactly and warns that search parameters have no effect there
        self._search_params = search_params(self.settings) if self.settings.qdrant_url else None

    # -- collection and encoder record ---------------------------------------------------------

    def exists(self) -> bool:
        with _qdrant_errors(f"looking up index {self.name!r}"):
            return bool(self.client.collection_exists(self.name))

    def _missing(self) -> NotFound:
        return NotFound(
            f"index {self.name!r} does not exist; index images into it first "
            f"(IndexImages, client.index_images, or `histoxplain index PATH... --index {self.name}`)"
        )

    def encoder(self) -> tuple[str, int]:
        if not self.exists():
            raise self._missing()
        with _qdrant_errors(f"reading index {self.name!r}"):
            info = self.client.get_collection(self.name)
        record = _encoder_record(info.config.metadata)
        if record is None:
            raise FailedPrecondition(
                f"Qdrant collection {self.name!r} was not created by histoxplain (no encoder record); "
                "choose another --index name"
            )
        return record

    def ensure(self, preset: str, dim: int) -> None:
        if dim <= 0:
            raise InvalidRequest(f"embedding dimension must be positive, got {dim}")
        if not self.exists():
            with _qdrant_errors(f"creating index {self.name!r}"):
                try:
                    self.client.create_collection(
                        self.name, **collection_config(self.settings, dim),
                        metadata={_METADATA_KEY: {"preset": preset, "dim": dim, "schema": _SCHEMA}},
                    )
                except ValueError:
                    # created by a concurrent writer between exists() and here: check it below
                    log.info("index %s was created concurrently", self.name)
                else:
                    self._create_payload_indexes()
                    log.info("created index %s (%s, %d-d)", self.name, preset, dim)
                    return
        self.check_encoder(preset, dim)

    def _create_payload_indexes(self) -> None:
        # The server needs keyword indexes for fast filters, group_by and facet. Local mode
        # scans anyway and warns that they have no effect: the warning is expected there.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Payload indexes have no effect")
            for key, kind in PAYLOAD_INDEXES:
                schema = qm.PayloadSchemaType.KEYWORD if kind == "keyword" else qm.PayloadSchemaType.INTEGER
                self.client.create_payload_index(self.name, key, schema)

    def _create_keyword_index(self, path: str) -> None:
        with warnings.catch_warnings(), _qdrant_errors(f"indexing a metadata field of {self.name!r}"):
            warnings.filterwarnings("ignore", message="Payload indexes have no effect")
            self.client.create_payload_index(self.name, path, qm.PayloadSchemaType.KEYWORD)

    def describe(self) -> IndexInfo:
        preset, dim = self.encoder()
        with _qdrant_errors(f"counting index {self.name!r}"):
            n_points = self.client.count(self.name, exact=True).count
            n_images = len(self._image_counts())
        return IndexInfo(self.name, preset, dim, n_points, n_images)

    def _image_counts(self) -> dict[str, int]:
        """Points per image id (facet: counted by Qdrant, exact).

        Local mode returns keyword values that parse as UUIDs in UUID form; ingest's image ids
        (40 hex digits) never do.
        """
        with _qdrant_errors(f"counting images of {self.name!r}"):
            result = self.client.facet(self.name, key="image_id", limit=2**31 - 1, exact=True)
        return {str(hit.value): int(hit.count) for hit in result.hits}

    def image_ids(self) -> list[str]:
        self.encoder()
        return sorted(self._image_counts())

    # -- writing -------------------------------------------------------------------------------

    def upsert(self, records: Sequence[TileRecord], vectors: np.ndarray, tiles: Sequence[np.ndarray] | None = None) -> None:
        """Write tiles: pixels first (when a tile store is set), then points, in one Qdrant call;
        with pixels in the payload, each point carries its own (written in the same call)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(records):
            raise ValueError(f"need one vector per record: {len(records)} records, vectors {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError("embeddings contain NaN or infinity; the encoder produced invalid output")
        _, dim = self.encoder()
        if vectors.shape[1] != dim:
            raise FailedPrecondition(f"index {self.name!r} holds {dim}-d vectors; got {vectors.shape[1]}-d")
        self._index_metadata_keys(key for record in records for key, _ in record.metadata)
        payloads = [record.payload() for record in records]
        if self.tile_store is not None or self.pixels_in_payload:
            if tiles is None or len(tiles) != len(records):
                raise ValueError("the index keeps tile pixels: pass one tile per record")
            for record, tile, payload in zip(records, tiles, payloads):
                if record.dicom is not None:  # a DICOM slide's tiles stay in the PACS (base.VectorIndex.upsert)
                    continue
                if self.pixels_in_payload:
                    payload[PIXELS_KEY] = pixels_payload(tile)
                else:
                    self.tile_store.save(record.point_id, tile)  # type: ignore[union-attr]
        points = [
            qm.PointStruct(id=record.point_id, vector=vector.tolist(), payload=payload)
            for record, vector, payload in zip(records, vectors, payloads)
        ]
        with _qdrant_errors(f"writing to index {self.name!r}"):
            self.client.upsert(self.name, points=points, wait=True)

    def image_state(self, records: Sequence[TileRecord]) -> ImageState:
        if not records:
            return "incomplete"
        image_id = records[0].image_id
        ids = [record.point_id for record in records]
        with _qdrant_errors(f"checking an image in {self.name!r}"):
            found = self.client.retrieve(
                self.name, ids=ids, with_payload=["label", "source", "metadata", "tiles_in_image"]
            )
            total = self.client.count(self.name, count_filter=_image_filter([image_id]), exact=True).count
        if len(found) != len(ids) or total != len(ids):
            return "incomplete"
        if any(point.payload.get("tiles_in_image") != len(ids) for point in found):
            return "incomplete"
        with_pixels = [record.point_id for record in records if record.dicom is None]
        if self.tile_store is not None and not all(self.tile_store.has(point_id) for point_id in with_pixels):
            return "incomplete"
        if self.pixels_in_payload and with_pixels and self._count_without_pixels(image_id):
            return "incomplete"
        if not self._same_metadata((point.payload or {} for point in found), records[0]):
            return "metadata"
        return "complete"

    def _count_without_pixels(self, image_id: str) -> int:
        """Tiles of the image that should carry pixels in their payload but do not (counted by
        Qdrant: no pixels are transferred)."""
        missing = qm.Filter(must=[
            _image_condition([image_id]),
            qm.IsEmptyCondition(is_empty=qm.PayloadField(key=PIXELS_KEY)),
            qm.IsEmptyCondition(is_empty=qm.PayloadField(key="dicom")),
        ])
        with _qdrant_errors(f"checking an image in {self.name!r}"):
            return self.client.count(self.name, count_filter=missing, exact=True).count

    def load_tile(self, hit: SearchHit | str) -> np.ndarray:
        """The pixels of a hit: from the tile store, or from the point's payload when they are kept there."""
        if not self.pixels_in_payload:
            return super().load_tile(hit)
        point_id = hit.point_id if isinstance(hit, SearchHit) else hit
        with _qdrant_errors(f"reading a tile from {self.name!r}"):
            found = self.client.retrieve(
                self.name, ids=[point_id], with_payload=qm.PayloadSelectorInclude(include=[PIXELS_KEY])
            )
        value = (found[0].payload or {}).get(PIXELS_KEY) if found else None
        if not isinstance(value, str):
            raise NotFound(
                f"no stored pixels for tile {point_id} in index {self.name!r}; re-index its image "
                "(it was indexed while tile pixels were kept on a gateway's disk: HISTOXPLAIN_TILE_PIXELS=local)"
            )
        return pixels_from_payload(value)

    def set_image_metadata(self, image_id: str, label: str | None, source: str, metadata: Metadata = ()) -> None:
        self._index_metadata_keys(key for key, _ in metadata)
        payload = {"label": label, "source": source, "metadata": dict(metadata) or None}
        with _qdrant_errors(f"updating an image in {self.name!r}"):
            self.client.set_payload(self.name, payload=payload, points=_image_filter([image_id]), wait=True)

    def _delete_points(self, point_ids: Sequence[str], action: str) -> None:
        with _qdrant_errors(action):
            self.client.delete(self.name, points_selector=qm.PointIdsList(points=list(point_ids)), wait=True)

    def _scroll(self, scroll_filter: qm.Filter, with_payload: bool, with_vectors: bool) -> Iterator[Any]:
        offset: Any = None
        with _qdrant_errors(f"listing points of {self.name!r}"):
            while True:
                points, offset = self.client.scroll(
                    self.name, scroll_filter=scroll_filter, limit=_SCROLL_PAGE, offset=offset,
                    with_payload=WITHOUT_PIXELS if with_payload else False, with_vectors=with_vectors,
                )
                yield from points
                if offset is None:
                    return

    def _image_point_ids(self, image_ids: Sequence[str]) -> list[str]:
        return [str(point.id) for point in self._scroll(_image_filter(image_ids), False, False)]

    # -- reading -------------------------------------------------------------------------------

    def _searchable(self, dim: int) -> None:
        _, built_dim = self.encoder()
        if dim != built_dim:
            raise FailedPrecondition(
                f"query vectors are {dim}-d but index {self.name!r} holds {built_dim}-d vectors; "
                "search with the encoder the index was built with"
            )
        with _qdrant_errors(f"counting index {self.name!r}"):
            if self.client.count(self.name, exact=False).count == 0:
                raise NotFound(
                    f"index {self.name!r} is empty; index images into it first (IndexImages, client.index_images, "
                    f"or `histoxplain index PATH... --index {self.name}`)"
                )

    def search(
        self, vector: np.ndarray, k: int, label: str | None = None, timeout: float | None = None,
        tile_filter: TileFilter | None = None,
    ) -> list[SearchHit]:
        return [_hit(point) for point in self._nearest(vector, k, label, timeout, False, tile_filter)]

    def search_with_vectors(
        self, vector: np.ndarray, k: int, label: str | None = None, timeout: float | None = None,
        tile_filter: TileFilter | None = None,
    ) -> tuple[list[SearchHit], np.ndarray]:
        points = self._nearest(vector, k, label, timeout, True, tile_filter)
        dim = np.asarray(vector).size
        vectors = np.asarray([point.vector for point in points], dtype=np.float32).reshape(len(points), dim)
        return [_hit(point) for point in points], vectors

    def _nearest(
        self, vector: np.ndarray, k: int, label: str | None, timeout: float | None, with_vectors: bool,
        tile_filter: TileFilter | None = None,
    ) -> list[Any]:
        validate_k(k)
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        self._searchable(vector.shape[0])
        with _qdrant_errors(f"searching index {self.name!r}"):
            response = self.client.query_points(
                self.name, query=vector.tolist(), limit=k, query_filter=_search_filter(label, None, tile_filter),
                search_params=self._search_params, with_payload=WITHOUT_PIXELS,
                with_vectors=with_vectors, timeout=_server_timeout(timeout),
            )
        return list(response.points)

    def best_tile_per_image(
        self, queries: np.ndarray, limit: int, label: str | None = None,
        image_ids: Sequence[str] | None = None, timeout: float | None = None,
        tile_filter: TileFilter | None = None,
    ) -> list[dict[str, SearchHit]]:
        """One ``group_by="image_id"`` query (group size 1) per query vector."""
        queries = np.asarray(queries, dtype=np.float32)
        self._searchable(queries.shape[1])
        query_filter = _search_filter(label, image_ids, tile_filter)
        best = []
        for query in queries:
            with _qdrant_errors(f"searching index {self.name!r}"):
                result = self.client.query_points_groups(
                    self.name, query=query.tolist(), group_by="image_id", limit=limit, group_size=1,
                    query_filter=query_filter, search_params=self._search_params,
                    with_payload=WITHOUT_PIXELS, timeout=_server_timeout(timeout),
                )
            best.append({str(group.id): _hit(group.hits[0]) for group in result.groups if group.hits})
        return best

    def _retrieve(self, point_ids: Sequence[str]) -> dict[str, tuple[dict[str, Any], Sequence[float]]]:
        with _qdrant_errors(f"reading tiles from {self.name!r}"):
            found = self.client.retrieve(self.name, ids=list(point_ids), with_payload=WITHOUT_PIXELS, with_vectors=True)
        return {str(point.id): (point.payload or {}, point.vector) for point in found}

    def _image_points(self, image_id: str) -> Iterator[tuple[dict[str, Any], Sequence[float]]]:
        for point in self._scroll(_image_filter([image_id]), with_payload=True, with_vectors=True):
            yield point.payload or {}, point.vector


class QdrantEngine(IndexEngine):
    """A Qdrant (server or local folder) whose collections are histoxplain indexes.

    Args:
        settings: where each index keeps its tile pixels (``settings.tiles_dir(name)``).
        client: from :func:`open_qdrant`; :meth:`close` closes it.
    """

    def __init__(self, settings: Settings, client: QdrantClient) -> None:
        self.settings = settings
        self.client = client

    def open_index(self, name: str) -> QdrantIndex:
        """The index ``name``, its pixels in a tile store under ``settings.tiles_dir(name)`` or, with
        ``settings.tile_pixels == "payload"``, in its points' payload."""
        validate_index_name(name)  # before the name becomes a folder
        tiles = None if self.settings.tile_pixels == "payload" else TileStore(self.settings.tiles_dir(name))
        return QdrantIndex(self.client, name, tiles, self.settings)

    def list_indexes(self) -> list[IndexInfo]:
        """Every histoxplain index on this Qdrant (collections without an encoder record are left out)."""
        with _qdrant_errors("listing indexes"):
            names = sorted(collection.name for collection in self.client.get_collections().collections)
        infos = []
        for name in names:
            if not INDEX_NAME_PATTERN.fullmatch(name):
                continue
            try:
                infos.append(QdrantIndex(self.client, name).describe())
            except FailedPrecondition:
                log.debug("collection %s is not a histoxplain index", name)
        return infos

    def ready(self) -> bool:
        """Qdrant answers when it can list its collections (local mode: the folder is open)."""
        self.client.get_collections()
        return True

    def close(self) -> None:
        self.client.close()
