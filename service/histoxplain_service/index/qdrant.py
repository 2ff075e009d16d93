"""Tile embeddings in Qdrant: one collection per index name, one point per tile.

Storage
    Embedded by default: qdrant-client local mode under ``<data_dir>/qdrant`` (one process at a
    time holds the folder). With ``QDRANT_URL`` set: a Qdrant server, optionally with
    ``QDRANT_API_KEY``. Tile pixels live beside it in a :class:`~.tile_store.TileStore`.

Encoder record
    Each collection stores ``{"histoxplain": {"preset": ..., "dim": ..., "schema": 1}}`` in the
    collection ``metadata`` (a Qdrant >= 1.16 feature that qdrant-client 1.20 local mode also
    persists, checked here). That keeps the record in the collection itself, so it moves and is
    backed up with the points, and needs neither a reserved point that every search would have
    to filter out nor a vector name that would tie the preset name to Qdrant's naming rules.
    Indexing or searching with another encoder is refused (:class:`FailedPrecondition`).

Points
    The id is ``uuid5(image_id, level, box)``, so indexing the same image again overwrites its
    points instead of adding copies. The payload holds ``image_id, source, label, box {x, y, w,
    h} (level-0 pixels), level, mpp (µm/px or null), tile_index, tiles_in_image``. An image is
    complete when every expected point exists and no other point carries its ``image_id``;
    :meth:`VectorIndex.finish_image` removes points of an older tiling of the same image.

Nothing here ever drops or recreates an existing collection.
"""

from __future__ import annotations

import contextlib
import math
import logging
import re
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
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
from histoxplain_service.index.tile_store import TileStore

__all__ = [
    "Box",
    "ImageHit",
    "IndexInfo",
    "SearchHit",
    "TileRecord",
    "VectorIndex",
    "list_indexes",
    "open_index",
    "open_qdrant",
    "point_id_for",
    "validate_index_name",
]

log = logging.getLogger(__name__)

_METADATA_KEY = "histoxplain"
_SCHEMA = 1
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
# Fixed namespace so that point ids are the same on every machine and every run.
_POINT_NAMESPACE = uuid.UUID("6f1d3c5e-2b8a-5d4e-9c71-3a0e8f2b6d10")
_SCROLL_PAGE = 1024


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
class TileRecord:
    """What the index stores about one tile (its payload)."""

    image_id: str
    source: str
    label: str | None
    box: Box
    level: int
    mpp: float | None
    tile_index: int
    tiles_in_image: int

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
        }

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
        )


@dataclass(frozen=True)
class SearchHit:
    """One retrieved tile. ``score`` is the cosine similarity to the query, in [-1, 1]."""

    score: float
    point_id: str
    image_id: str
    label: str | None
    source: str
    box: Box
    level: int
    mpp: float | None
    tile_index: int


@dataclass(frozen=True)
class ImageHit:
    """One retrieved image, ranked by combining its tiles' hits (see :meth:`VectorIndex.search_images`).

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


def validate_index_name(name: str) -> str:
    """Index names are 1-63 letters, digits, ``-`` and ``_``, starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"invalid index name {name!r}; use 1-63 letters, digits, '-' or '_', starting with a letter or digit"
        )
    return name


def _lock_holder(lock_file: Path) -> str | None:
    """Best effort (Linux): 'pid N (command line)' of the process holding a flock on lock_file."""
    try:
        inode = lock_file.stat().st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 12345 08:01:1234567 0 EOF"
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                pid = fields[4]
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                return f"pid {pid} ({' '.join(cmdline.split())[:100]})"
    except OSError:
        return None
    return None


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
        holder = _lock_holder(path / ".lock") or "another process"
        raise FailedPrecondition(
            f"the index folder {path} is in use by {holder}; embedded Qdrant allows one process at a "
            "time: stop that process (a running gateway or `histoxplain` command) and retry, or run a "
            "Qdrant server and set QDRANT_URL"
        ) from None


@contextlib.contextmanager
def _qdrant_errors(action: str) -> Iterator[None]:
    """Connection failures and server errors -> DependencyUnavailable with what was being done."""
    try:
        yield
    except ResponseHandlingException as exc:
        raise DependencyUnavailable(f"Qdrant is unreachable while {action}: {exc}; check QDRANT_URL") from exc
    except UnexpectedResponse as exc:
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
    record = TileRecord.from_payload(point.payload or {})
    return SearchHit(
        score=float(point.score),
        point_id=str(point.id),
        image_id=record.image_id,
        label=record.label,
        source=record.source,
        box=record.box,
        level=record.level,
        mpp=record.mpp,
        tile_index=record.tile_index,
    )


def _server_timeout(timeout: float | None) -> int | None:
    """A request's remaining seconds as Qdrant's server-side timeout (whole seconds, at least 1)."""
    return None if timeout is None else max(1, math.ceil(timeout))


def _image_filter(image_ids: Sequence[str]) -> qm.Filter:
    return qm.Filter(must=[qm.FieldCondition(key="image_id", match=qm.MatchAny(any=list(image_ids)))])


class VectorIndex:
    """One named index: a Qdrant collection of tile embeddings plus their stored pixels.

    Args:
        client: from :func:`open_qdrant`.
        name: the index name (letters, digits, ``-``, ``_``); also the collection name.
        tile_store: where tile pixels are kept; ``None`` keeps none (then ``load_tile`` fails).
    """

    def __init__(self, client: QdrantClient, name: str, tile_store: TileStore | None = None) -> None:
        self.client = client
        self.name = validate_index_name(name)
        self.tile_store = tile_store

    # -- collection and encoder record ---------------------------------------------------------

    def exists(self) -> bool:
        with _qdrant_errors(f"looking up index {self.name!r}"):
            return bool(self.client.collection_exists(self.name))

    def _missing(self) -> NotFound:
        return NotFound(f"index {self.name!r} does not exist; run `histoxplain index PATH... --index {self.name}` first")

    def encoder(self) -> tuple[str, int]:
        """(preset, dim) the index was built with.

        Raises:
            NotFound: no such index.
            FailedPrecondition: a collection of that name not created by histoxplain.
        """
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
        """Create the index for this encoder, or check that an existing one was built with it.

        Raises:
            FailedPrecondition: the index exists with another preset or dimension.
        """
        if dim <= 0:
            raise InvalidRequest(f"embedding dimension must be positive, got {dim}")
        if not self.exists():
            with _qdrant_errors(f"creating index {self.name!r}"):
                try:
                    self.client.create_collection(
                        self.name,
                        vectors_config=qm.VectorParams(size=dim, distance=qm.Distance.COSINE),
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
            for key in ("image_id", "label"):
                self.client.create_payload_index(self.name, key, qm.PayloadSchemaType.KEYWORD)

    def check_encoder(self, preset: str, dim: int) -> None:
        """Refuse vectors from an encoder other than the one the index was built with."""
        built_preset, built_dim = self.encoder()
        if (built_preset, built_dim) != (preset, dim):
            raise FailedPrecondition(
                f"index {self.name!r} was built with encoder {built_preset!r} ({built_dim}-d) but this "
                f"request uses {preset!r} ({dim}-d); use the same --model (HISTOXPLAIN_MODEL) or another --index"
            )

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
        """Every image id in the index, sorted."""
        self.encoder()
        return sorted(self._image_counts())

    # -- writing -------------------------------------------------------------------------------

    def upsert(self, records: Sequence[TileRecord], vectors: np.ndarray, tiles: Sequence[np.ndarray] | None = None) -> None:
        """Write tiles: pixels first (when a tile store is set), then points, in one Qdrant call.

        Pixels go first so a point never exists without its stored tile.

        Args:
            records: one per tile.
            vectors: (N, D) float32 embeddings, L2-normalised.
            tiles: (H, W, 3) uint8 pixels per record; required when the index has a tile store.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(records):
            raise ValueError(f"need one vector per record: {len(records)} records, vectors {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError("embeddings contain NaN or infinity; the encoder produced invalid output")
        _, dim = self.encoder()
        if vectors.shape[1] != dim:
            raise FailedPrecondition(f"index {self.name!r} holds {dim}-d vectors; got {vectors.shape[1]}-d")
        if self.tile_store is not None:
            if tiles is None or len(tiles) != len(records):
                raise ValueError("the index keeps tile pixels: pass one tile per record")
            for record, tile in zip(records, tiles):
                self.tile_store.save(record.point_id, tile)
        points = [
            qm.PointStruct(id=record.point_id, vector=vector.tolist(), payload=record.payload())
            for record, vector in zip(records, vectors)
        ]
        with _qdrant_errors(f"writing to index {self.name!r}"):
            self.client.upsert(self.name, points=points, wait=True)

    def image_state(self, records: Sequence[TileRecord]) -> str:
        """Whether one image's planned tiles are already indexed.

        Returns:
            ``"complete"``: every planned point exists with this label and source, its pixels are
            stored, and no other point carries the image id; ``"metadata"``: the same, except
            the label or source differ (see :meth:`set_image_metadata`); ``"incomplete"``: anything else.
        """
        if not records:
            return "incomplete"
        image_id = records[0].image_id
        ids = [record.point_id for record in records]
        with _qdrant_errors(f"checking image {image_id} in {self.name!r}"):
            found = self.client.retrieve(self.name, ids=ids, with_payload=["label", "source", "tiles_in_image"])
            total = self.client.count(self.name, count_filter=_image_filter([image_id]), exact=True).count
        if len(found) != len(ids) or total != len(ids):
            return "incomplete"
        if any(point.payload.get("tiles_in_image") != len(ids) for point in found):
            return "incomplete"
        if self.tile_store is not None and not all(self.tile_store.has(point_id) for point_id in ids):
            return "incomplete"
        label, source = records[0].label, records[0].source
        if any(point.payload.get("label") != label or point.payload.get("source") != source for point in found):
            return "metadata"
        return "complete"

    def set_image_metadata(self, image_id: str, label: str | None, source: str) -> None:
        """Change the label and source of every tile of one image (no re-embedding)."""
        with _qdrant_errors(f"updating image {image_id} in {self.name!r}"):
            self.client.set_payload(
                self.name, payload={"label": label, "source": source}, points=_image_filter([image_id]), wait=True
            )

    def finish_image(self, image_id: str, point_ids: Sequence[str]) -> int:
        """Delete the points (and pixels) of ``image_id`` that are not in ``point_ids``.

        Called once all of an image's tiles are written, this removes what an older tiling
        left; returns how many points were removed.
        """
        keep = set(point_ids)
        stale = [pid for pid in self._point_ids(_image_filter([image_id])) if pid not in keep]
        if stale:
            with _qdrant_errors(f"removing stale tiles of {image_id} from {self.name!r}"):
                self.client.delete(self.name, points_selector=qm.PointIdsList(points=stale), wait=True)
            if self.tile_store is not None:
                self.tile_store.delete(stale)
            log.info("removed %d stale tiles of image %s", len(stale), image_id)
        return len(stale)

    def delete(self, image_ids: Sequence[str]) -> int:
        """Delete every tile of these images (points, then pixels); returns the number of tiles removed."""
        self.encoder()
        if not image_ids:
            return 0
        point_ids = self._point_ids(_image_filter(image_ids))
        if point_ids:
            with _qdrant_errors(f"deleting from index {self.name!r}"):
                self.client.delete(self.name, points_selector=qm.PointIdsList(points=point_ids), wait=True)
            if self.tile_store is not None:
                self.tile_store.delete(point_ids)
        return len(point_ids)

    def _point_ids(self, scroll_filter: qm.Filter) -> list[str]:
        ids: list[str] = []
        offset: Any = None
        with _qdrant_errors(f"listing points of {self.name!r}"):
            while True:
                points, offset = self.client.scroll(
                    self.name, scroll_filter=scroll_filter, limit=_SCROLL_PAGE, offset=offset,
                    with_payload=False, with_vectors=False,
                )
                ids.extend(str(point.id) for point in points)
                if offset is None:
                    return ids

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
                    f"index {self.name!r} is empty; run `histoxplain index PATH... --index {self.name}` first"
                )

    @staticmethod
    def _check_k(k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise InvalidRequest(f"k must be a positive integer, got {k!r}")

    @staticmethod
    def _label_filter(label: str | None) -> qm.Filter | None:
        if label is None:
            return None
        return qm.Filter(must=[qm.FieldCondition(key="label", match=qm.MatchValue(value=label))])

    def search(
        self, vector: np.ndarray, k: int, label: str | None = None, timeout: float | None = None
    ) -> list[SearchHit]:
        """The ``k`` tiles nearest to ``vector`` (D,) by cosine similarity, best first.

        Raises:
            InvalidRequest: k <= 0.  NotFound: missing or empty index.
            FailedPrecondition: the vector's dimension is not the index's.
        """
        return [_hit(point) for point in self._nearest(vector, k, label, timeout, with_vectors=False)]

    def search_with_vectors(
        self, vector: np.ndarray, k: int, label: str | None = None, timeout: float | None = None
    ) -> tuple[list[SearchHit], np.ndarray]:
        """:meth:`search` plus the hits' stored vectors (N, D) float32, row i for hit i.

        The vectors are what the index holds (L2-normalised); explanations reuse them instead of
        embedding the hits again.
        """
        points = self._nearest(vector, k, label, timeout, with_vectors=True)
        dim = np.asarray(vector).size
        vectors = np.asarray([point.vector for point in points], dtype=np.float32).reshape(len(points), dim)
        return [_hit(point) for point in points], vectors

    def _nearest(
        self, vector: np.ndarray, k: int, label: str | None, timeout: float | None, with_vectors: bool
    ) -> list[Any]:
        self._check_k(k)
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        self._searchable(vector.shape[0])
        with _qdrant_errors(f"searching index {self.name!r}"):
            response = self.client.query_points(
                self.name, query=vector.tolist(), limit=k, query_filter=self._label_filter(label), with_payload=True,
                with_vectors=with_vectors, timeout=_server_timeout(timeout),
            )
        return list(response.points)

    def _best_per_image(
        self, vector: list[float], limit: int, query_filter: qm.Filter | None, timeout: float | None
    ) -> dict[str, SearchHit]:
        with _qdrant_errors(f"searching index {self.name!r}"):
            result = self.client.query_points_groups(
                self.name, query=vector, group_by="image_id", limit=limit, group_size=1,
                query_filter=query_filter, with_payload=True, timeout=_server_timeout(timeout),
            )
        return {str(group.id): _hit(group.hits[0]) for group in result.groups if group.hits}

    def search_images(
        self, vectors: np.ndarray, k: int, label: str | None = None, timeout: float | None = None
    ) -> list[ImageHit]:
        """Rank whole images by their tiles' similarity to the query tiles (Q, D), best first.

        Rule: an image's score is the mean, over the Q query tiles, of the cosine similarity
        of that image's best-matching tile. Candidates are the union of the best ``2k`` images
        of each query tile (Qdrant groups by image id, so no image is crowded out by many
        tiles of another); every candidate is then scored exactly against every query tile.
        With one query tile the ranking is exact; with several, an image outside every query
        tile's top ``2k`` is not considered.
        """
        self._check_k(k)
        queries = np.asarray(vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[0] == 0:
            raise InvalidRequest(f"query vectors must be (Q, D) with Q >= 1, got shape {queries.shape}")
        self._searchable(queries.shape[1])
        label_filter = self._label_filter(label)
        query_lists = [query.tolist() for query in queries]
        best = [self._best_per_image(query, 2 * k, label_filter, timeout) for query in query_lists]
        candidates = sorted(set().union(*best))
        if not candidates:
            return []
        if len(query_lists) > 1:
            candidate_filter = _image_filter(candidates)
            best = [self._best_per_image(query, len(candidates), candidate_filter, timeout) for query in query_lists]
        ranked: list[ImageHit] = []
        for image_id in candidates:
            tiles = tuple(per_query[image_id] for per_query in best)
            score = float(np.mean([tile.score for tile in tiles]))
            ranked.append(ImageHit(score, image_id, tiles[0].label, tiles[0].source, tiles))
        ranked.sort(key=lambda hit: (-hit.score, hit.image_id))
        return ranked[:k]

    def points(self, point_ids: Sequence[str]) -> tuple[list[TileRecord], np.ndarray]:
        """The stored records and vectors (N, D) float32 of these tiles, in the given order.

        Raises:
            InvalidRequest: a point id that is not a UUID.  NotFound: one that is not in the index.
        """
        for point_id in point_ids:
            try:
                uuid.UUID(point_id)
            except ValueError:
                raise InvalidRequest(f"point id {point_id!r} is not a UUID; use point ids from a search") from None
        _, dim = self.encoder()
        with _qdrant_errors(f"reading tiles from {self.name!r}"):
            found = self.client.retrieve(self.name, ids=list(point_ids), with_payload=True, with_vectors=True)
        by_id = {str(point.id): point for point in found}
        missing = [pid for pid in point_ids if pid not in by_id]
        if missing:
            raise NotFound(f"tile(s) {', '.join(missing[:5])} not in index {self.name!r}; use point ids from a search")
        records = [TileRecord.from_payload(by_id[pid].payload or {}) for pid in point_ids]
        vectors = np.asarray([by_id[pid].vector for pid in point_ids], dtype=np.float32).reshape(len(point_ids), dim)
        return records, vectors

    def image_tiles(self, image_id: str) -> tuple[list[TileRecord], np.ndarray]:
        """Every tile of one image (in tile order) and its vectors (N, D).

        Raises:
            NotFound: no tile with this image id.
        """
        _, dim = self.encoder()
        records: list[tuple[TileRecord, list[float]]] = []
        offset: Any = None
        with _qdrant_errors(f"reading image {image_id} from {self.name!r}"):
            while True:
                points, offset = self.client.scroll(
                    self.name, scroll_filter=_image_filter([image_id]), limit=_SCROLL_PAGE, offset=offset,
                    with_payload=True, with_vectors=True,
                )
                records.extend((TileRecord.from_payload(p.payload or {}), p.vector) for p in points)
                if offset is None:
                    break
        if not records:
            raise NotFound(f"image {image_id!r} is not in index {self.name!r}")
        records.sort(key=lambda item: item[0].tile_index)
        return [r for r, _ in records], np.asarray([v for _, v in records], dtype=np.float32).reshape(-1, dim)

    def load_tile(self, hit: SearchHit | str) -> np.ndarray:
        """Pixels (H, W, 3) uint8 of a hit (or a point id), as they were embedded."""
        if self.tile_store is None:
            raise FailedPrecondition(f"index {self.name!r} was opened without a tile store")
        return self.tile_store.load(hit.point_id if isinstance(hit, SearchHit) else hit)


def open_index(settings: Settings, name: str, client: QdrantClient) -> VectorIndex:
    """The index ``name`` with its tile store under ``settings.tiles_dir(name)``."""
    validate_index_name(name)
    return VectorIndex(client, name, TileStore(settings.tiles_dir(name)))


def list_indexes(client: QdrantClient) -> list[IndexInfo]:
    """Every histoxplain index on this Qdrant (collections without an encoder record are left out)."""
    with _qdrant_errors("listing indexes"):
        names = sorted(collection.name for collection in client.get_collections().collections)
    infos = []
    for name in names:
        if not _NAME_RE.fullmatch(name):
            continue
        try:
            infos.append(VectorIndex(client, name).describe())
        except FailedPrecondition:
            log.debug("collection %s is not a histoxplain index", name)
    return infos
