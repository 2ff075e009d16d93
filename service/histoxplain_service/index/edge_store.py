"""Storage details of the qdrant-edge adapter (:mod:`.edge`): how a shard is configured and
created, where an index's encoder record lives, the store's lock, filters and error mapping.

Kept apart from the adapter's calls so each module stays readable; :mod:`.migrate` builds shards
with the same functions, so a migrated index is configured exactly as a new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import qdrant_edge as qe

from histoxplain_model.errors import DependencyUnavailable, FailedPrecondition, InvalidRequest, NotFound
from histoxplain_service.config import Settings
from histoxplain_service.domain.types import FieldMatch, TileFilter, payload_key
from histoxplain_service.index.base import PAYLOAD_INDEXES
from histoxplain_service.index.local_lock import lock_holder

__all__ = [
    "RECORD_FILE", "SHARD_DIR", "EdgeOptions", "create_shard", "edge_errors", "edge_filter",
    "hold_lock", "image_filter", "local_mode_has", "read_encoder_record", "write_encoder_record",
]

log = logging.getLogger(__name__)

_METADATA_KEY = "histoxplain"
_SCHEMA = 1
RECORD_FILE = "index.json"
SHARD_DIR = "shard"
#: Qdrant's default full-scan threshold (KB of vectors): filters matching less are scanned.
_FULL_SCAN_THRESHOLD_KB = 10_000


@dataclass(frozen=True)
class EdgeOptions:
    """How new edge indexes are built and how every query searches (from :class:`Settings`).

    ``indexing_threshold_kb``: segments with more vectors than this get an HNSW graph (``None``:
    Qdrant's default, 10 MB; tests lower it to build graphs over a few points).
    """

    # Defaults are the settings' own (one table: config.py).
    hnsw_m: int = Settings.hnsw_m
    hnsw_ef_construct: int = Settings.hnsw_ef_construct
    hnsw_ef: int = Settings.hnsw_ef
    exact: bool = Settings.exact_search
    quantization: str = Settings.quantization
    rescore: bool = Settings.rescore
    oversampling: float = Settings.oversampling
    vectors_on_disk: bool = Settings.vectors_on_disk
    payload_on_disk: bool = Settings.payload_on_disk
    indexing_threshold_kb: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> EdgeOptions:
        return cls(
            hnsw_m=settings.hnsw_m, hnsw_ef_construct=settings.hnsw_ef_construct, hnsw_ef=settings.hnsw_ef,
            exact=settings.exact_search, quantization=settings.quantization, rescore=settings.rescore,
            oversampling=settings.oversampling, vectors_on_disk=settings.vectors_on_disk,
            payload_on_disk=settings.payload_on_disk,
        )

    def shard_config(self, dim: int) -> qe.EdgeConfig:
        """The configuration a new shard of ``dim``-d cosine vectors is created with."""
        quantization = None
        if self.quantization == "int8":
            # quantile 0.99: Qdrant's recommended clipping of outliers; kept in RAM (the point of it)
            quantization = qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, memory=qe.Memory.Pinned)
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(
                size=dim, distance=qe.Distance.Cosine,
                memory=qe.Memory.Cold if self.vectors_on_disk else qe.Memory.Cached,
            ),
            hnsw_config=qe.HnswIndexConfig(
                m=self.hnsw_m, ef_construct=self.hnsw_ef_construct, full_scan_threshold=_FULL_SCAN_THRESHOLD_KB,
            ),
            quantization_config=quantization,
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=self.indexing_threshold_kb),
            payload_memory=qe.Memory.Cold if self.payload_on_disk else qe.Memory.Cached,
        )

    def search_params(self) -> qe.SearchParams:
        """Per-query parameters; the quantization ones are ignored by shards without quantization."""
        return qe.SearchParams(
            hnsw_ef=self.hnsw_ef, exact=self.exact,
            quantization=qe.QuantizationSearchParams(rescore=self.rescore, oversampling=self.oversampling),
        )


@contextlib.contextmanager
def edge_errors(action: str) -> Iterator[None]:
    """Errors raised by the engine (plain ``Exception`` from Rust) -> DependencyUnavailable."""
    try:
        yield
    except (InvalidRequest, NotFound, FailedPrecondition, DependencyUnavailable, ValueError):
        raise
    except Exception as exc:  # the engine raises bare Exception with its own message
        log.warning("the embedded index engine failed while %s: %s", action, exc)
        raise DependencyUnavailable(
            f"the embedded index engine failed while {action}; see the log (disk full or a damaged "
            "edge/ folder in the data folder?)"
        ) from exc


def _match(condition: FieldMatch) -> qe.FieldCondition:
    values, key = list(condition.values), payload_key(condition.key)
    if len(values) == 1:
        return qe.FieldCondition(key=key, match=qe.MatchValue(values[0]))
    return qe.FieldCondition(key=key, match=qe.MatchAny(values))


def edge_filter(
    label: str | None = None, image_ids: Sequence[str] | None = None, tile_filter: TileFilter | None = None,
    exclude_images: Sequence[str] = (),
) -> qe.Filter | None:
    """Tiles ``tile_filter`` keeps, of ``label``, of ``image_ids`` (``None``: any) and not of
    ``exclude_images``, as an edge filter (``None``: no condition)."""
    combined = TileFilter.combine(tile_filter, label)
    must = [_match(c) for c in combined.must] if combined else []
    must_not = [_match(c) for c in combined.must_not] if combined else []
    if image_ids is not None:
        must.append(qe.FieldCondition(key="image_id", match=qe.MatchAny(list(image_ids))))
    if exclude_images:
        must_not.append(qe.FieldCondition(key="image_id", match=qe.MatchAny(list(exclude_images))))
    if not must and not must_not:
        return None
    return qe.Filter(must=must or None, must_not=must_not or None)


def image_filter(image_ids: Sequence[str]) -> qe.Filter:
    return qe.Filter(must=[qe.FieldCondition(key="image_id", match=qe.MatchAny(list(image_ids)))])


def local_mode_has(settings: Settings, name: str) -> bool:
    """Whether qdrant-client local mode's folder (``<data_dir>/qdrant``) holds a collection ``name``;
    read from its layout, without opening (and locking) the folder."""
    return (settings.qdrant_path / "collection" / name / "storage.sqlite").is_file()


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_encoder_record(folder: Path, preset: str, dim: int) -> None:
    """Record the encoder of the index in ``folder`` (the step that makes the index exist)."""
    record = {_METADATA_KEY: {"preset": preset, "dim": dim, "schema": _SCHEMA}}
    _write_atomically(folder / RECORD_FILE, json.dumps(record))


def read_encoder_record(folder: Path) -> tuple[str, int] | None:
    try:
        record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))[_METADATA_KEY]
        return str(record["preset"]), int(record["dim"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        raise FailedPrecondition(
            "an index's encoder record (index.json under edge/ in the data folder) is damaged; restore it "
            "from a backup or re-index into another --index"
        ) from None


def create_shard(shard_dir: Path, options: EdgeOptions, dim: int) -> qe.EdgeShard:
    """A new, empty shard with the payload indexes every histoxplain index has."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    shard = qe.EdgeShard.create(str(shard_dir), options.shard_config(dim))
    for key, kind in PAYLOAD_INDEXES:
        schema = qe.PayloadSchemaType.Keyword if kind == "keyword" else qe.PayloadSchemaType.Integer
        shard.update(qe.UpdateOperation.create_field_index(key, schema))
    return shard


def hold_lock(path: Path) -> TextIO:
    """An exclusive flock on ``path`` for as long as the returned file stays open."""
    handle = open(path, "a+")  # noqa: SIM115 -- held open until EdgeEngine.close()
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        holder = lock_holder(path) or "another process"
        raise FailedPrecondition(
            f"the embedded index store (edge/ in the data folder, HISTOXPLAIN_DATA or --data-dir) is in use by "
            f"{holder}; it allows one process at a time: stop that process (a running gateway or `histoxplain` "
            "command) and retry, or run a Qdrant server and set QDRANT_URL"
        ) from None
    return handle
