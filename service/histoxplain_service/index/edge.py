"""The qdrant-edge adapter of the index interface (:mod:`.base`): Qdrant's own engine in-process.

qdrant-edge-py is the Rust engine of the Qdrant server (segments, HNSW, payload indexes, WAL,
scalar quantization) as a library, so the embedded store answers with the same semantics as a
Qdrant server or cluster (``QDRANT_URL``), without a server process and without qdrant-client
local mode's Python brute force (seconds per query at a million tiles).

Storage
    ``<data_dir>/edge/`` holds one folder per index and a ``.lock`` that one process holds while
    it has the store open (as local mode's folder allows one process)::

        <name>/shard/       the edge shard: segments, WAL, edge_config.json
        <name>/index.json   the encoder record {"histoxplain": {"preset", "dim", "schema": 1}}

    An edge shard is one collection and has no collection metadata, so the encoder record sits
    beside it. It is written last (atomically), after the shard and its payload indexes: an index
    exists once it is there, and a creation cut short leaves an empty, unrecorded shard that the
    next :meth:`EdgeIndex.ensure` reuses. Tile pixels are in the same
    :class:`~.tile_store.TileStore` folder (``<data_dir>/tiles/<index>/``) as with every engine.

Points
    The same ids and payload as :mod:`.qdrant` (``image_id, source, label, box, level, mpp,
    tile_index, tiles_in_image``), with keyword indexes on ``image_id``, ``label`` and ``source``
    and an integer index on ``level``, so filters and facets are index lookups.

Search
    Segments below Qdrant's indexing threshold (10 MB of vectors) are searched exactly; larger
    ones through their HNSW graph once :meth:`EdgeIndex.optimize` has built it (edge runs no
    background optimizer). ``HISTOXPLAIN_HNSW_M`` / ``_EF_CONSTRUCT``, ``HISTOXPLAIN_QUANTIZATION``
    (scalar int8) and the on-disk settings shape an index when it is created;
    ``HISTOXPLAIN_HNSW_EF``, ``HISTOXPLAIN_EXACT_SEARCH``, ``HISTOXPLAIN_RESCORE`` and
    ``HISTOXPLAIN_OVERSAMPLING`` apply per query.

Grouping
    qdrant-edge-py 0.9 has no grouped query (the Rust crate's ``query_groups`` is not exposed to
    Python). :meth:`EdgeIndex.best_tile_per_image` does what Qdrant's ``group_by`` does inside the
    server: ask for the nearest tiles, keep each image's first (best) tile, then ask again
    excluding the images already seen, until ``limit`` images are found or the index has no more.
    With exact search this is exactly the grouped answer (each image's first hit among tiles of
    images not yet excluded is its best tile, and every image scoring above a round's last hit
    appears in that round); with HNSW it is as approximate as the grouped query is.

Threads
    qdrant-edge-py 0.9 holds the GIL inside every call (``optimize`` included), so calls run one
    at a time; a lock here only guards opening and closing shards. Engine errors (``Exception``
    from the Rust side) become ``DependencyUnavailable`` naming what was being done; messages
    name no folder and no image id, as in :mod:`.qdrant`.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import qdrant_edge as qe

from histoxplain_model.errors import DependencyUnavailable, FailedPrecondition, InvalidRequest, NotFound
from histoxplain_service.config import Settings
from histoxplain_service.domain.types import IndexInfo, Metadata, SearchHit, TileFilter, TileRecord
from histoxplain_service.index.base import (
    INDEX_NAME_PATTERN,
    ImageState,
    IndexEngine,
    VectorIndex,
    check_upsert,
    validate_index_name,
    validate_k,
)
from histoxplain_service.index.edge_store import (
    RECORD_FILE,
    SHARD_DIR,
    EdgeOptions,
    create_shard,
    edge_errors,
    edge_filter,
    hold_lock,
    image_filter,
    local_mode_has,
    read_encoder_record,
    write_encoder_record,
)
from histoxplain_service.index.tile_store import TileStore

__all__ = ["EdgeEngine", "EdgeIndex", "EdgeOptions"]

log = logging.getLogger(__name__)

_SCROLL_PAGE = 1024


def _vector(point: Any) -> list[float]:
    vector = point.vector
    return vector[""] if isinstance(vector, dict) else vector


def _hit(point: Any) -> SearchHit:
    return SearchHit.from_record(TileRecord.from_payload(point.payload or {}), float(point.score), str(point.id))


class EdgeIndex(VectorIndex):
    """One named index: an edge shard of tile embeddings plus their stored pixels.

    Opened through :meth:`EdgeEngine.open_index`; valid until the engine is closed.
    """

    def __init__(self, engine: EdgeEngine, name: str, tile_store: TileStore | None = None) -> None:
        self.engine = engine
        self.name = validate_index_name(name)
        self.tile_store = tile_store
        self._metadata_indexed = set()

    # -- shard and encoder record -------------------------------------------------------------

    @property
    def folder(self) -> Path:
        return self.engine.root / self.name

    def exists(self) -> bool:
        return self.engine.encoder_of(self.name) is not None

    def _missing(self) -> NotFound:
        if local_mode_has(self.engine.settings, self.name):
            return NotFound(
                f"index {self.name!r} is in the local-mode store of an earlier version (qdrant/ in the data folder); "
                f"run `histoxplain migrate --index {self.name}` to move it to the embedded engine, or set "
                "HISTOXPLAIN_INDEX_ENGINE=local"
            )
        return NotFound(
            f"index {self.name!r} does not exist; index images into it first "
            f"(IndexImages, client.index_images, or `histoxplain index PATH... --index {self.name}`)"
        )

    def _shard(self) -> qe.EdgeShard:
        shard = self.engine.shard(self.name)
        if shard is None:
            raise self._missing()
        return shard

    def encoder(self) -> tuple[str, int]:
        record = self.engine.encoder_of(self.name)
        if record is None:
            raise self._missing()
        return record

    def ensure(self, preset: str, dim: int) -> None:
        if dim <= 0:
            raise InvalidRequest(f"embedding dimension must be positive, got {dim}")
        if not self.exists():
            if local_mode_has(self.engine.settings, self.name):
                # a second, empty index of the same name would hide the one to migrate
                raise FailedPrecondition(
                    f"index {self.name!r} is in the local-mode store of an earlier version (qdrant/ in the data "
                    f"folder); run `histoxplain migrate --index {self.name}` first, or set HISTOXPLAIN_INDEX_ENGINE=local"
                )
            self.engine.create(self.name, preset, dim)
            log.info("created index %s (%s, %d-d)", self.name, preset, dim)
            return
        self.check_encoder(preset, dim)

    def describe(self) -> IndexInfo:
        preset, dim = self.encoder()
        shard = self._shard()
        with edge_errors(f"counting index {self.name!r}"):
            n_points = shard.count(qe.CountRequest(exact=True))
        return IndexInfo(self.name, preset, dim, n_points, len(self._image_counts()))

    def _image_counts(self) -> dict[str, int]:
        with edge_errors(f"counting images of {self.name!r}"):
            result = self._shard().facet(qe.FacetRequest(key="image_id", limit=2**31 - 1, exact=True))
        # qdrant-edge 0.9's exact facet also lists values whose points were all deleted, with count 0
        return {str(hit.value): int(hit.count) for hit in result.hits if hit.count > 0}

    def image_ids(self) -> list[str]:
        self.encoder()
        return sorted(self._image_counts())

    # -- writing ---------------------------------------------------------------------------------

    def upsert(self, records: Sequence[TileRecord], vectors: np.ndarray, tiles: Sequence[np.ndarray] | None = None) -> None:
        """Write tiles: pixels first (when a tile store is set), then points, in one engine update."""
        _, dim = self.encoder()
        vectors = check_upsert(records, vectors, dim)
        self._index_metadata_keys(key for record in records for key, _ in record.metadata)
        if self.tile_store is not None:
            if tiles is None or len(tiles) != len(records):
                raise ValueError("the index keeps tile pixels: pass one tile per record")
            for record, tile in zip(records, tiles):
                if record.dicom is None:  # a DICOM slide's tiles stay in the PACS (base.VectorIndex.upsert)
                    self.tile_store.save(record.point_id, tile)
        # lists, not numpy rows: the engine converts lists about twice as fast (measured)
        points = [
            qe.Point(record.point_id, vector, record.payload())
            for record, vector in zip(records, vectors.tolist())
        ]
        with edge_errors(f"writing to index {self.name!r}"):
            self._shard().update(qe.UpdateOperation.upsert_points(points))

    def image_state(self, records: Sequence[TileRecord]) -> ImageState:
        if not records:
            return "incomplete"
        image_id = records[0].image_id
        ids = [record.point_id for record in records]
        shard = self._shard()
        with edge_errors(f"checking an image in {self.name!r}"):
            found = shard.retrieve(ids, with_payload=True, with_vector=False)
            total = shard.count(qe.CountRequest(exact=True, filter=image_filter([image_id])))
        if len(found) != len(ids) or total != len(ids):
            return "incomplete"
        payloads = [point.payload or {} for point in found]
        if any(payload.get("tiles_in_image") != len(ids) for payload in payloads):
            return "incomplete"
        with_pixels = [record.point_id for record in records if record.dicom is None]
        if self.tile_store is not None and not all(self.tile_store.has(point_id) for point_id in with_pixels):
            return "incomplete"
        if not self._same_metadata(payloads, records[0]):
            return "metadata"
        return "complete"

    def set_image_metadata(self, image_id: str, label: str | None, source: str, metadata: Metadata = ()) -> None:
        self._index_metadata_keys(key for key, _ in metadata)
        payload = {"label": label, "source": source, "metadata": dict(metadata) or None}
        with edge_errors(f"updating an image in {self.name!r}"):
            self._shard().update(qe.UpdateOperation.set_payload_by_filter(image_filter([image_id]), payload))

    def _create_keyword_index(self, path: str) -> None:
        with edge_errors(f"indexing a metadata field of {self.name!r}"):
            self._shard().update(qe.UpdateOperation.create_field_index(path, qe.PayloadSchemaType.Keyword))

    def _delete_points(self, point_ids: Sequence[str], action: str) -> None:
        with edge_errors(action):
            self._shard().update(qe.UpdateOperation.delete_points(list(point_ids)))

    def optimize(self) -> None:
        """Run Qdrant's optimizers on this shard (HNSW for new segments, merges, vacuum), blocking."""
        if not self.exists():
            return
        shard = self._shard()
        with edge_errors(f"optimizing index {self.name!r}"):
            if shard.optimize():
                log.info("optimized index %s", self.name)
            shard.flush()  # segments on disk: a later open need not replay the run from the WAL

    def _scroll(self, scroll_filter: qe.Filter | None, with_payload: bool, with_vector: bool) -> Iterator[Any]:
        shard = self._shard()
        offset: Any = None
        with edge_errors(f"listing points of {self.name!r}"):
            while True:
                points, offset = shard.scroll(qe.ScrollRequest(
                    offset=offset, limit=_SCROLL_PAGE, filter=scroll_filter,
                    with_payload=with_payload, with_vector=with_vector,
                ))
                yield from points
                if offset is None:
                    return

    def _image_point_ids(self, image_ids: Sequence[str]) -> list[str]:
        return [str(point.id) for point in self._scroll(image_filter(image_ids), False, False)]

    # -- reading ---------------------------------------------------------------------------------

    def _searchable(self, dim: int) -> qe.EdgeShard:
        _, built_dim = self.encoder()
        if dim != built_dim:
            raise FailedPrecondition(
                f"query vectors are {dim}-d but index {self.name!r} holds {built_dim}-d vectors; "
                "search with the encoder the index was built with"
            )
        shard = self._shard()
        with edge_errors(f"counting index {self.name!r}"):
            if shard.count(qe.CountRequest(exact=False)) == 0:
                raise NotFound(
                    f"index {self.name!r} is empty; index images into it first (IndexImages, client.index_images, "
                    f"or `histoxplain index PATH... --index {self.name}`)"
                )
        return shard

    def _request(
        self, vector: np.ndarray, limit: int, query_filter: qe.Filter | None, with_vector: bool = False
    ) -> qe.QueryRequest:
        return qe.QueryRequest(
            limit=limit, query=qe.Query.Nearest(vector.tolist()), filter=query_filter, with_payload=True,
            with_vector=with_vector, params=self.engine.options.search_params(),
        )

    def search(
        self, vector: np.ndarray, k: int, label: str | None = None, timeout: float | None = None,
        tile_filter: TileFilter | None = None,
    ) -> list[SearchHit]:
        return [_hit(point) for point in self._nearest(vector, k, label, tile_filter, with_vector=False)]

    def search_with_vectors(
        self, vector: np.ndarray, k: int, label: str | None = None, timeout: float | None = None,
        tile_filter: TileFilter | None = None,
    ) -> tuple[list[SearchHit], np.ndarray]:
        points = self._nearest(vector, k, label, tile_filter, with_vector=True)
        dim = np.asarray(vector).size
        vectors = np.asarray([_vector(point) for point in points], dtype=np.float32).reshape(len(points), dim)
        return [_hit(point) for point in points], vectors

    def _nearest(
        self, vector: np.ndarray, k: int, label: str | None, tile_filter: TileFilter | None, with_vector: bool
    ) -> list[Any]:
        # ``timeout`` is not passed on: the engine runs in-process and has none; the caller's
        # deadline bounds the call around it (as with local mode).
        validate_k(k)
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        shard = self._searchable(vector.shape[0])
        with edge_errors(f"searching index {self.name!r}"):
            return shard.query(self._request(vector, k, edge_filter(label, None, tile_filter), with_vector))

    def best_tile_per_image(
        self, queries: np.ndarray, limit: int, label: str | None = None,
        image_ids: Sequence[str] | None = None, timeout: float | None = None,
        tile_filter: TileFilter | None = None,
    ) -> list[dict[str, SearchHit]]:
        """Qdrant's ``group_by="image_id"`` (group size 1), done as the server does it: rounds of
        nearest tiles, each excluding the images already found (see the module docstring)."""
        validate_k(limit)
        queries = np.asarray(queries, dtype=np.float32)
        shard = self._searchable(queries.shape[1])
        if image_ids is not None and not image_ids:
            return [{} for _ in queries]
        # Enough tiles per round that a few images owning many near tiles rarely need a second one.
        round_limit = min(max(4 * limit, 32), 4096)
        base = edge_filter(label, image_ids, tile_filter)
        with edge_errors(f"searching index {self.name!r}"):
            first = shard.query_batch(qe.QueryBatchRequest([self._request(q, round_limit, base) for q in queries]))
            return [
                self._group_rounds(shard, query, points, limit, round_limit, label, image_ids, tile_filter)
                for query, points in zip(queries, first)
            ]

    def _group_rounds(
        self, shard: qe.EdgeShard, query: np.ndarray, points: list[Any], limit: int, round_limit: int,
        label: str | None, image_ids: Sequence[str] | None, tile_filter: TileFilter | None,
    ) -> dict[str, SearchHit]:
        best: dict[str, SearchHit] = {}
        while True:
            for point in points:
                image_id = str((point.payload or {}).get("image_id"))
                if image_id not in best:  # results are best first: the first tile is the image's best
                    best[image_id] = _hit(point)
            if len(best) >= limit or len(points) < round_limit:
                break
            round_filter = edge_filter(label, image_ids, tile_filter, exclude_images=list(best))
            points = shard.query(self._request(query, round_limit, round_filter))
        ranked = sorted(best.items(), key=lambda item: (-item[1].score, item[0]))[:limit]
        return dict(ranked)

    def _retrieve(self, point_ids: Sequence[str]) -> dict[str, tuple[dict[str, Any], Sequence[float]]]:
        with edge_errors(f"reading tiles from {self.name!r}"):
            found = self._shard().retrieve(list(point_ids), with_payload=True, with_vector=True)
        return {str(point.id): (point.payload or {}, _vector(point)) for point in found}

    def _image_points(self, image_id: str) -> Iterator[tuple[dict[str, Any], Sequence[float]]]:
        for point in self._scroll(image_filter([image_id]), True, True):
            yield point.payload or {}, _vector(point)


class EdgeEngine(IndexEngine):
    """The embedded store: one edge shard per index under ``settings.edge_path``.

    Holds the folder's lock from construction to :meth:`close` (FailedPrecondition when another
    process holds it); shards are opened on first use and closed (flushed) by :meth:`close`.

    Args:
        settings: data folder (``edge_path``, ``tiles_dir``) and, unless ``options`` is given,
            the HNSW / quantization / on-disk settings.
        options: how new indexes are built and queries search (default: from ``settings``).
    """

    def __init__(self, settings: Settings, options: EdgeOptions | None = None) -> None:
        self.settings = settings
        self.options = options or EdgeOptions.from_settings(settings)
        self.root = settings.edge_path
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_file: TextIO | None = hold_lock(self.root / ".lock")
        self._mutex = threading.RLock()
        self._shards: dict[str, qe.EdgeShard] = {}
        self._records: dict[str, tuple[str, int]] = {}
        self._point_to_migration()

    def _point_to_migration(self) -> None:
        """Say so when the data folder still holds local-mode indexes that this store does not show."""
        collections = self.settings.qdrant_path / "collection"
        if not collections.is_dir():
            return
        waiting = sorted(
            entry.name for entry in collections.iterdir()
            if local_mode_has(self.settings, entry.name) and read_encoder_record(self.root / entry.name) is None
        )
        if waiting:
            log.warning(
                "the data folder holds %d index(es) of the local-mode store of earlier versions (%s); run "
                "`histoxplain migrate` to move them to the embedded engine, or set HISTOXPLAIN_INDEX_ENGINE=local",
                len(waiting), ", ".join(waiting[:5]) + (", ..." if len(waiting) > 5 else ""),
            )

    def _check_open(self) -> None:
        if self._lock_file is None:
            raise DependencyUnavailable("the embedded index store was closed; open it again")

    def encoder_of(self, name: str) -> tuple[str, int] | None:
        """(preset, dim) of index ``name``, or None when it does not exist (the record never changes)."""
        with self._mutex:
            self._check_open()
            if name not in self._records:
                record = read_encoder_record(self.root / name)
                if record is None:
                    return None
                self._records[name] = record
            return self._records[name]

    def shard(self, name: str) -> qe.EdgeShard | None:
        """The open shard of index ``name`` (loaded on first use), or None when it does not exist."""
        with self._mutex:
            if name in self._shards:
                return self._shards[name]
            if self.encoder_of(name) is None:
                return None
            with edge_errors(f"opening index {name!r}"):
                shard = qe.EdgeShard.load(str(self.root / name / SHARD_DIR))
            self._shards[name] = shard
            return shard

    def create(self, name: str, preset: str, dim: int) -> None:
        """Create index ``name``: the shard and its payload indexes, then the encoder record."""
        with self._mutex:
            self._check_open()
            if self.encoder_of(name) is not None:
                return
            folder = self.root / name
            shard_dir = folder / SHARD_DIR
            with edge_errors(f"creating index {name!r}"):
                if (shard_dir / "edge_config.json").exists():
                    shard = qe.EdgeShard.load(str(shard_dir))  # a creation cut short: reuse it if empty
                    if shard.count(qe.CountRequest(exact=True)):
                        shard.close()
                        raise FailedPrecondition(
                            f"the edge/ folder of index {name!r} holds points without an encoder record; "
                            "choose another --index name"
                        )
                    shard.close()
                    shutil.rmtree(shard_dir)
                shard = create_shard(shard_dir, self.options, dim)
                shard.flush()
            write_encoder_record(folder, preset, dim)
            self._shards[name] = shard

    def open_index(self, name: str) -> EdgeIndex:
        """The index ``name`` with its tile store under ``settings.tiles_dir(name)``."""
        validate_index_name(name)  # before the name becomes a folder
        self._check_open()
        return EdgeIndex(self, name, TileStore(self.settings.tiles_dir(name)))

    def list_indexes(self) -> list[IndexInfo]:
        """Every index in the store (folders without an encoder record are left out), by name."""
        self._check_open()
        names = sorted(
            entry.name for entry in self.root.iterdir()
            if entry.is_dir() and INDEX_NAME_PATTERN.fullmatch(entry.name) and (entry / RECORD_FILE).is_file()
        )
        return [EdgeIndex(self, name).describe() for name in names]

    def ready(self) -> bool:
        """Ready while the store is open (it is in-process: nothing else to reach)."""
        self._check_open()
        return True

    def close(self) -> None:
        """Flush and close every open shard, then release the folder's lock."""
        with self._mutex:
            shards, self._shards = self._shards, {}
            try:
                for name, shard in shards.items():
                    with edge_errors(f"closing index {name!r}"):
                        shard.flush()
                        shard.close()
            finally:
                if self._lock_file is not None:
                    self._lock_file.close()  # closing the file releases the flock
                    self._lock_file = None
