"""The index interface: what the domain needs from a vector store, whatever the engine.

Two levels, as in qdrant-client's ``client_base.py``:

* :class:`IndexEngine` is one store (a Qdrant server, Qdrant's embedded engine qdrant-edge, or
  qdrant-client local mode in a folder): it opens
  named indexes, lists them, answers a readiness probe and is closed once by its owner.
* :class:`VectorIndex` is one named index of tile embeddings plus the tiles' pixels: the calls
  :class:`~histoxplain_service.domain.retrieval.Retrieval` and
  :mod:`~histoxplain_service.domain.ingest` make.

The engine adapters (:mod:`.qdrant` for a server and local mode, :mod:`.edge` for qdrant-edge)
implement both; :mod:`histoxplain_service.bootstrap` picks one, so the domain never imports an
engine. The contract every implementation keeps, because
callers and stored data depend on it:

* errors are :mod:`histoxplain_model.errors` classes: ``NotFound`` for a missing or empty index
  or tile, ``FailedPrecondition`` for another encoder or dimension, ``InvalidRequest`` for a bad
  name, ``k`` or point id, ``DependencyUnavailable`` when the store cannot be reached;
* every index records the encoder (preset, dim) it was built with and refuses others;
* point ids are :func:`~histoxplain_service.domain.types.point_id_for` of the tile, so writes
  are idempotent; scores are cosine similarities, best first;
* a :class:`~histoxplain_service.domain.types.TileFilter` means the same on every engine, and
  so do ids, order and scores (to float32 rounding) of exact searches: the congruence suite
  (``tests/unit/service/test_index_congruence.py``) runs the same calls on each.
"""

from __future__ import annotations

import logging
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from histoxplain_model.errors import FailedPrecondition, InvalidRequest, NotFound
from histoxplain_model.limits import INDEX_NAME, POINT_ID, shorten
from histoxplain_service.domain.types import IndexInfo, Metadata, SearchHit, TileFilter, TileRecord, payload_key

if TYPE_CHECKING:
    from histoxplain_service.index.tile_store import TileStore

__all__ = [
    "INDEX_NAME_PATTERN",
    "PAYLOAD_INDEXES",
    "ImageState",
    "IndexEngine",
    "VectorIndex",
    "check_upsert",
    "validate_index_name",
    "validate_k",
]

log = logging.getLogger(__name__)

#: Index names: 1 to ``INDEX_NAME.max_chars`` (64) letters, digits, ``-`` and ``_``, starting with a
#: letter or digit (safe as a collection name and as a folder name for the tile pixels).
INDEX_NAME_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_-]{{0,{INDEX_NAME.max_chars - 1}}}")

#: Payload indexes of every index, on every engine: what filters, grouping and facets look up.
PAYLOAD_INDEXES: tuple[tuple[str, str], ...] = (
    ("image_id", "keyword"), ("label", "keyword"), ("source", "keyword"), ("level", "integer"),
)

#: Whether an image's planned tiles are indexed (see :meth:`VectorIndex.image_state`).
ImageState = Literal["complete", "metadata", "incomplete"]


def validate_index_name(name: str) -> str:
    """Index names are 1-64 letters, digits, ``-`` and ``_``, starting with a letter or digit.

    The message repeats a short prefix of a refused name (:func:`~histoxplain_model.limits.shorten`),
    so a huge name cannot make the error itself too large to deliver.
    """
    if not isinstance(name, str) or not INDEX_NAME_PATTERN.fullmatch(name):
        raise InvalidRequest(
            f"invalid index name {shorten(name)}; use 1-{INDEX_NAME.max_chars} letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


def validate_k(k: int) -> int:
    """``k`` (how many hits) must be a positive integer; ``bool`` is refused although it is an int."""
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise InvalidRequest(f"k must be a positive integer, got {k!r}")
    return k


def check_upsert(records: Sequence[TileRecord], vectors: np.ndarray, dim: int) -> np.ndarray:
    """``vectors`` as (N, dim) float32, one finite row per record (what every engine's upsert checks).

    Raises:
        ValueError: not one finite vector per record.  FailedPrecondition: another dimension.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(records):
        raise ValueError(f"need one vector per record: {len(records)} records, vectors {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("embeddings contain NaN or infinity; the encoder produced invalid output")
    if vectors.shape[1] != dim:
        raise FailedPrecondition(f"the index holds {dim}-d vectors; got {vectors.shape[1]}-d")
    return vectors


class VectorIndex(ABC):
    """One named index: tile embeddings (cosine), their payload and their stored pixels.

    Attributes:
        name: the index name (:data:`INDEX_NAME_PATTERN`).
        tile_store: where tile pixels are kept; ``None`` keeps none.
    """

    name: str
    tile_store: TileStore | None
    #: metadata fields this instance has already given a payload index (see _index_metadata_keys)
    _metadata_indexed: set[str]

    # -- encoder record ----------------------------------------------------------------------------

    @abstractmethod
    def encoder(self) -> tuple[str, int]:
        """(preset, dim) the index was built with.

        Raises:
            NotFound: no such index.
            FailedPrecondition: a store entry of that name not created by histoxplain.
        """

    @abstractmethod
    def ensure(self, preset: str, dim: int) -> None:
        """Create the index for this encoder, or check that an existing one was built with it.

        Raises:
            InvalidRequest: ``dim`` <= 0.
            FailedPrecondition: the index exists with another preset or dimension.
        """

    def check_encoder(self, preset: str, dim: int) -> None:
        """Refuse vectors from an encoder other than the one the index was built with.

        Shared by every engine: it needs only :meth:`encoder`, and the message must not depend
        on where the index lives.
        """
        built_preset, built_dim = self.encoder()
        if (built_preset, built_dim) != (preset, dim):
            raise FailedPrecondition(
                f"index {self.name!r} was built with encoder {built_preset!r} ({built_dim}-d) but this "
                f"request uses {preset!r} ({dim}-d); use the same --model (HISTOXPLAIN_MODEL) or another --index"
            )

    @abstractmethod
    def describe(self) -> IndexInfo:
        """Name, encoder and exact point and image counts (NotFound: no such index)."""

    @abstractmethod
    def image_ids(self) -> list[str]:
        """Every image id in the index, sorted."""

    # -- writing -----------------------------------------------------------------------------------

    @abstractmethod
    def upsert(
        self, records: Sequence[TileRecord], vectors: np.ndarray, tiles: Sequence[np.ndarray] | None = None
    ) -> None:
        """Write tiles under their point ids: pixels first, then points, so a point never
        exists without its stored tile. Tiles whose record carries a ``dicom`` reference keep no
        pixels (the PACS holds them; callers re-read them from it), and :meth:`image_state`
        does not ask for theirs.

        Args:
            records: one per tile.
            vectors: (N, D) float32 embeddings, L2-normalised.
            tiles: (H, W, 3) uint8 pixels per record; required when the index keeps pixels.

        Raises:
            ValueError: not one finite vector (and tile) per record.
            FailedPrecondition: D is not the index's dimension.
        """

    @abstractmethod
    def image_state(self, records: Sequence[TileRecord]) -> ImageState:
        """Whether one image's planned tiles are already indexed.

        Returns:
            ``"complete"``: every planned point exists with this label and source, its pixels are
            stored, and no other point carries the image id; ``"metadata"``: the same, except
            the label, source or metadata differ (see :meth:`set_image_metadata`); ``"incomplete"``:
            anything else.
        """

    @abstractmethod
    def set_image_metadata(self, image_id: str, label: str | None, source: str, metadata: Metadata = ()) -> None:
        """Change the label, source and metadata of every tile of one image (no re-embedding)."""

    @staticmethod
    def _same_metadata(payloads: Iterable[dict[str, Any]], record: TileRecord) -> bool:
        """Whether every stored payload has the record's label, source and metadata."""
        wanted = record.payload()
        keys = ("label", "source", "metadata")
        return all(payload.get(key) == wanted.get(key) for payload in payloads for key in keys)

    def _index_metadata_keys(self, keys: Iterable[str]) -> None:
        """A keyword payload index on each of these metadata fields (``metadata.<key>``, what
        filters on the field look up), created once per field and index instance."""
        for key in sorted(set(keys) - self._metadata_indexed):
            self._create_keyword_index(payload_key(key))
            self._metadata_indexed.add(key)

    @abstractmethod
    def _create_keyword_index(self, path: str) -> None:
        """A keyword payload index on ``path`` (a no-op when it exists)."""

    def finish_image(self, image_id: str, point_ids: Sequence[str]) -> int:
        """Delete the points (and pixels) of ``image_id`` that are not in ``point_ids``.

        Called once all of an image's tiles are written, this removes what an older tiling
        left; returns how many points were removed.
        """
        keep = set(point_ids)
        stale = [pid for pid in self._image_point_ids([image_id]) if pid not in keep]
        if stale:
            self._remove(stale, f"removing stale tiles from {self.name!r}")
            log.info("removed %d stale tiles of one image from index %s", len(stale), self.name)
        return len(stale)

    def delete(self, image_ids: Sequence[str]) -> int:
        """Delete every tile of these images (points, then pixels); returns the number of tiles removed."""
        self.encoder()
        if not image_ids:
            return 0
        point_ids = self._image_point_ids(image_ids)
        if point_ids:
            self._remove(point_ids, f"deleting from index {self.name!r}")
        return len(point_ids)

    def _remove(self, point_ids: Sequence[str], action: str) -> None:
        """Points first, then their pixels: a failure in between leaves pixels without points,
        which nothing reads and the next write of the tile replaces."""
        self._delete_points(point_ids, action)
        if self.tile_store is not None:
            self.tile_store.delete(point_ids)

    @abstractmethod
    def _image_point_ids(self, image_ids: Sequence[str]) -> list[str]:
        """The point ids of every tile of these images."""

    @abstractmethod
    def _delete_points(self, point_ids: Sequence[str], action: str) -> None:
        """Delete these points from the engine, waiting until it has; ``action`` names the
        operation in the error an engine failure raises."""

    def optimize(self) -> None:
        """Make recent writes fast to search (build the HNSW graph of new segments), blocking.

        Called once a run of writes ends (an indexing run). Engines that optimize on their own (a
        Qdrant server) or have nothing to build (local mode) do nothing, the default.
        """

    # -- reading -----------------------------------------------------------------------------------

    @abstractmethod
    def search(
        self, vector: np.ndarray, k: int, label: str | None = None, timeout: float | None = None,
        tile_filter: TileFilter | None = None,
    ) -> list[SearchHit]:
        """The ``k`` tiles nearest to ``vector`` (D,) by cosine similarity, best first.

        ``label`` keeps only tiles of that label and ``tile_filter`` only tiles it keeps (both:
        tiles both keep); ``timeout`` is the seconds the caller has left.

        Raises:
            InvalidRequest: k <= 0.  NotFound: missing or empty index.
            FailedPrecondition: the vector's dimension is not the index's.
        """

    @abstractmethod
    def search_with_vectors(
        self, vector: np.ndarray, k: int, label: str | None = None, timeout: float | None = None,
        tile_filter: TileFilter | None = None,
    ) -> tuple[list[SearchHit], np.ndarray]:
        """:meth:`search` plus the hits' stored vectors (N, D) float32, row i for hit i.

        The vectors are what the index holds (L2-normalised); explanations reuse them instead of
        embedding the hits again.
        """

    @abstractmethod
    def best_tile_per_image(
        self, queries: np.ndarray, limit: int, label: str | None = None,
        image_ids: Sequence[str] | None = None, timeout: float | None = None,
        tile_filter: TileFilter | None = None,
    ) -> list[dict[str, SearchHit]]:
        """For each query (Q, D), the ``limit`` best images as {image id: its best tile}, best first.

        The engine groups by image id, so many similar tiles of one image never crowd the
        others out; how the groups become a ranking is the domain's rule
        (:func:`histoxplain_service.domain.ranking.rank_images`).

        Args:
            queries: (Q, D) float32 query vectors.
            limit: at most this many images per query.
            label: only tiles of this label.
            image_ids: only these images (``None``: all).
            tile_filter: only tiles it keeps.

        Raises:
            NotFound: missing or empty index.  FailedPrecondition: D is not the index's dimension.
        """

    def points(self, point_ids: Sequence[str]) -> tuple[list[TileRecord], np.ndarray]:
        """The stored records and vectors (N, D) float32 of these tiles, in the given order.

        Raises:
            InvalidRequest: a point id that is not a UUID.  NotFound: one that is not in the index.
        """
        for position, point_id in enumerate(point_ids):
            try:
                POINT_ID.check(point_id, f"point_ids[{position}]")
                uuid.UUID(point_id)
            except ValueError:
                # named by position: a value that is not a point id may be anything the caller had
                raise InvalidRequest(f"point_ids[{position}] is not a UUID; use point ids from a search") from None
        _, dim = self.encoder()
        found = self._retrieve(point_ids)
        missing = [pid for pid in point_ids if pid not in found]
        if missing:
            named = ", ".join(shorten(point_id, POINT_ID.max_chars) for point_id in missing[:5])
            raise NotFound(f"tile(s) {named} not in index {self.name!r}; use point ids from a search")
        records = [TileRecord.from_payload(found[pid][0]) for pid in point_ids]
        vectors = np.asarray([found[pid][1] for pid in point_ids], dtype=np.float32).reshape(len(point_ids), dim)
        return records, vectors

    def image_tiles(self, image_id: str) -> tuple[list[TileRecord], np.ndarray]:
        """Every tile of one image (in tile order) and its vectors (N, D).

        Raises:
            NotFound: no tile with this image id.
        """
        _, dim = self.encoder()
        records = [(TileRecord.from_payload(payload), vector) for payload, vector in self._image_points(image_id)]
        if not records:  # the id is caller text (see the module docstring): not repeated here
            raise NotFound(f"the image id is not in index {self.name!r}; use image ids from a search")
        records.sort(key=lambda item: item[0].tile_index)
        return [r for r, _ in records], np.asarray([v for _, v in records], dtype=np.float32).reshape(-1, dim)

    def load_tile(self, hit: SearchHit | str) -> np.ndarray:
        """Pixels (H, W, 3) uint8 of a hit (or a point id), as they were embedded."""
        if self.tile_store is None:
            raise FailedPrecondition(f"index {self.name!r} was opened without a tile store")
        return self.tile_store.load(hit.point_id if isinstance(hit, SearchHit) else hit)

    @abstractmethod
    def _retrieve(self, point_ids: Sequence[str]) -> dict[str, tuple[dict[str, Any], Sequence[float]]]:
        """(payload, vector) of each of these points that the index holds, by point id."""

    @abstractmethod
    def _image_points(self, image_id: str) -> Iterable[tuple[dict[str, Any], Sequence[float]]]:
        """(payload, vector) of every point of one image, in any order."""


class IndexEngine(ABC):
    """One vector store holding any number of named indexes.

    The owner (whoever opened it: the CLI, the gateway's ``serve``, a test) closes it once;
    indexes opened from it are valid until then.
    """

    @abstractmethod
    def open_index(self, name: str) -> VectorIndex:
        """The index ``name``, whether or not it exists yet (InvalidRequest: a bad name)."""

    @abstractmethod
    def list_indexes(self) -> list[IndexInfo]:
        """Every histoxplain index in this store (other entries are left out), by name."""

    @abstractmethod
    def ready(self) -> bool:
        """Readiness probe: True when the store answers; may raise when it does not."""

    @abstractmethod
    def close(self) -> None:
        """Release the store (connections, or the lock on a local folder)."""
