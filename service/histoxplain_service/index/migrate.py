"""Move indexes from qdrant-client local mode (the embedded store of earlier versions) to qdrant-edge.

What moves
    Every point of a local-mode collection (``<data_dir>/qdrant``): id, vector and payload, into a
    new edge index of the same name with the same encoder record. Tile pixels do not move: the
    tile store (``<data_dir>/tiles/<index>/``, PNGs named by point id) is the same folder for
    every engine and the ids are kept, so the new index reads the very files the old one did.
    The migration checks that every point with pixels has its PNG and reports those that do not
    (they were missing before; copying a million PNGs would only double the disk).

Nothing is lost or half-written
    1. The edge shard is built aside, in ``edge/.migrating-<name>/`` (a leftover of an
       interrupted run is removed first); the source is only read.
    2. It is verified against the source: the same number of points, and every source point
       read back with the same payload and the same vector (to :data:`VECTOR_TOLERANCE`).
    3. It is moved into place with one rename: the index appears whole or not at all.
    4. Only then, unless ``keep_source``, is the local-mode collection deleted.

    A failure in 1-3 removes the staging folder and leaves the source as it was. A run cut short
    between 3 and 4 leaves both copies; running the migration again verifies the edge index
    against the source once more and then finishes step 4.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import qdrant_edge as qe
from qdrant_client import QdrantClient

from histoxplain_model.errors import FailedPrecondition, NotFound
from histoxplain_service.config import Settings
from histoxplain_service.domain.types import TileRecord
from histoxplain_service.index.edge import EdgeEngine, EdgeIndex
from histoxplain_service.index.edge_store import (
    create_shard,
    local_mode_has,
    read_encoder_record,
    write_encoder_record,
)
from histoxplain_service.index.qdrant import QdrantEngine, QdrantIndex, open_qdrant
from histoxplain_service.index.tile_store import TileStore

__all__ = ["VECTOR_TOLERANCE", "MigrationReport", "migrate_local_indexes"]

log = logging.getLogger(__name__)

#: Largest difference allowed between a source vector and its copy (both are stored L2-normalised
#: float32; they agree to rounding).
VECTOR_TOLERANCE = 1e-6
_PAGE = 1024


@dataclass(frozen=True)
class MigrationReport:
    """What migrating one index did.

    Attributes:
        points: points copied (and verified).
        images: distinct image ids among them.
        tiles_missing: points whose record says the index keeps pixels but whose PNG is absent.
        source_removed: whether the local-mode collection was deleted.
        resumed: the edge index existed already (an earlier run stopped after step 3).
    """

    name: str
    preset: str
    dim: int
    points: int
    images: int
    tiles_missing: int
    source_removed: bool
    resumed: bool


def _source_points(client: QdrantClient, name: str) -> Iterator[list[Any]]:
    """Pages of the collection's points, with payload and vector."""
    offset: Any = None
    while True:
        points, offset = client.scroll(name, limit=_PAGE, offset=offset, with_payload=True, with_vectors=True)
        if points:
            yield points
        if offset is None:
            return


def _copy(client: QdrantClient, name: str, shard: qe.EdgeShard) -> int:
    copied = 0
    for page in _source_points(client, name):
        shard.update(qe.UpdateOperation.upsert_points(
            [qe.Point(str(point.id), list(point.vector), dict(point.payload or {})) for point in page]
        ))
        copied += len(page)
    return copied


def _verify(client: QdrantClient, name: str, shard: qe.EdgeShard, tiles: TileStore) -> tuple[int, int, int]:
    """(points, images, tiles missing) once every source point is in ``shard`` unchanged.

    Raises:
        FailedPrecondition: a count, payload or vector differs (the message says which).
    """
    expected = client.count(name, exact=True).count
    copied = shard.count(qe.CountRequest(exact=True))
    if copied != expected:
        raise FailedPrecondition(f"migrating index {name!r}: {copied} points copied but the source holds {expected}")
    images: set[str] = set()
    missing_tiles = 0
    for page in _source_points(client, name):
        found = {str(p.id): p for p in shard.retrieve([str(p.id) for p in page], with_payload=True, with_vector=True)}
        for point in page:
            copy = found.get(str(point.id))
            if copy is None:
                raise FailedPrecondition(f"migrating index {name!r}: a point was not copied")
            if (copy.payload or {}) != (point.payload or {}):
                raise FailedPrecondition(f"migrating index {name!r}: a point's payload differs after copying")
            vector = copy.vector[""] if isinstance(copy.vector, dict) else copy.vector
            if not np.allclose(vector, point.vector, rtol=0, atol=VECTOR_TOLERANCE):
                raise FailedPrecondition(f"migrating index {name!r}: a point's vector differs after copying")
            record = TileRecord.from_payload(point.payload or {})
            images.add(record.image_id)
            if record.dicom is None and not tiles.has(str(point.id)):
                missing_tiles += 1
    return expected, len(images), missing_tiles


def _clear_unrecorded(folder: os.PathLike[str]) -> None:
    """Remove an edge folder left by a creation cut short (no encoder record, no points)."""
    shard_dir = os.path.join(folder, "shard")
    if os.path.exists(os.path.join(shard_dir, "edge_config.json")):
        shard = qe.EdgeShard.load(shard_dir)
        try:
            if shard.count(qe.CountRequest(exact=True)):
                raise FailedPrecondition(
                    f"the edge/ folder {os.path.basename(folder)!r} holds points without an encoder record; "
                    "move it away before migrating an index of that name"
                )
        finally:
            shard.close()
    shutil.rmtree(folder)


def _migrate_one(
    settings: Settings, engine: EdgeEngine, client: QdrantClient, name: str, keep_source: bool
) -> MigrationReport:
    preset, dim = QdrantIndex(client, name).encoder()
    tiles = TileStore(settings.tiles_dir(name))
    final = engine.root / name
    resumed = read_encoder_record(final) is not None
    if resumed:
        if (preset, dim) != read_encoder_record(final):
            raise FailedPrecondition(
                f"index {name!r} exists in both stores with different encoders; keep one with HISTOXPLAIN_INDEX_ENGINE "
                "and remove the other"
            )
        shard = engine.shard(name)
        if shard is None:
            raise FailedPrecondition(f"index {name!r} of the embedded engine could not be opened")
        try:
            points, images, missing = _verify(client, name, shard, tiles)
        except FailedPrecondition as exc:
            raise FailedPrecondition(
                f"index {name!r} exists in both stores and they differ ({exc}); the embedded copy changed after an "
                "earlier migration kept the source: keep the one you want and remove the other"
            ) from None
    else:
        if final.exists():
            _clear_unrecorded(final)
        staging = engine.root / f".migrating-{name}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            shard = create_shard(staging / "shard", engine.options, dim)
            try:
                _copy(client, name, shard)
                shard.flush()
                points, images, missing = _verify(client, name, shard, tiles)
            finally:
                shard.close()
            write_encoder_record(staging, preset, dim)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        EdgeIndex(engine, name).optimize()  # the HNSW graph, as after an indexing run
    if not keep_source:
        client.delete_collection(name)
    log.info("migrated index %s: %d points, %d images", name, points, images)
    return MigrationReport(name, preset, dim, points, images, missing, not keep_source, resumed)


def migrate_local_indexes(
    settings: Settings, engine: EdgeEngine, names: Sequence[str] | None = None, keep_source: bool = False,
    on_done: Callable[[MigrationReport], None] | None = None,
) -> list[MigrationReport]:
    """Move local-mode indexes (``names``; ``None``: all of them) into the edge ``engine``.

    Args:
        settings: the data folder whose ``qdrant/`` holds the local-mode store.
        engine: the open edge store of the same data folder.
        keep_source: keep the local-mode collections after a verified copy.
        on_done: called with each index's report as it completes.

    Raises:
        NotFound: no local-mode store, or a named index is not in it.
        FailedPrecondition: the local-mode folder is held by another process, or a copy did not
            verify (nothing was changed for that index; the indexes before it are done).
    """
    if names is not None:
        absent = [name for name in names if not local_mode_has(settings, name)]
        if absent:
            raise NotFound(
                f"index(es) {', '.join(map(repr, absent))} not in the local-mode store (qdrant/ in the data folder); "
                "`histoxplain info` with HISTOXPLAIN_INDEX_ENGINE=local lists its indexes"
            )
    if not (settings.qdrant_path / "collection").is_dir():
        raise NotFound("the data folder has no local-mode store (qdrant/) to migrate")
    client = open_qdrant(settings.with_changes(qdrant_url=None))
    try:
        found = [info.name for info in QdrantEngine(settings, client).list_indexes()]
        reports = []
        for name in found if names is None else list(dict.fromkeys(names)):
            report = _migrate_one(settings, engine, client, name, keep_source)
            reports.append(report)
            if on_done is not None:
                on_done(report)
        return reports
    finally:
        client.close()
