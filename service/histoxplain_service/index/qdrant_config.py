"""How histoxplain creates and searches collections on a Qdrant server or cluster (:mod:`.qdrant`).

A collection is shaped once, when the gateway creates it, by :class:`~histoxplain_service.config.Settings`:
the same HNSW, quantization and on-disk settings the embedded engine takes (:mod:`.edge_store`),
plus what only a cluster has: ``shard_number`` (shards spread over the nodes),
``replication_factor`` (copies of each shard: 2 keeps every shard readable while one node is down)
and ``write_consistency_factor`` (copies that must acknowledge a write). An existing collection
keeps its own configuration; Qdrant changes it only through its own API. Local mode accepts
every argument and ignores what has no meaning in one process (shards, replicas, memory placement).

Tile pixels in the payload (``HISTOXPLAIN_TILE_PIXELS=payload``): each point carries its tile as
a base64 PNG under :data:`PIXELS_KEY`, so every gateway replica in front of the cluster can
explain any hit. PNG because explanations must run on the exact pixels that were embedded (a
JPEG or lossy WebP copy would explain slightly different pixels than the vector stands for);
``benchmarks/RESULTS.md`` gives the cost per tile. Payload on disk (the default) keeps those bytes
out of RAM, and every read except :meth:`QdrantIndex.load_tile` excludes the key, so searches
never transfer pixels.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from qdrant_client import models as qm

from histoxplain_service.config import Settings
from histoxplain_service.index.tile_store import decode_tile_png, encode_tile_png

__all__ = ["PIXELS_KEY", "WITHOUT_PIXELS", "collection_config", "pixels_from_payload", "pixels_payload", "search_params"]

#: Payload key of a tile's pixels (base64 PNG) when they are kept in the payload.
PIXELS_KEY = "pixels_png"
#: The payload of a point without its pixels: what searches, scrolls and retrievals ask for.
WITHOUT_PIXELS = qm.PayloadSelectorExclude(exclude=[PIXELS_KEY])
#: Qdrant's default full-scan threshold (KB of vectors), as in :mod:`.edge_store`.
_FULL_SCAN_THRESHOLD_KB = 10_000


def collection_config(settings: Settings, dim: int) -> dict[str, Any]:
    """The ``create_collection`` arguments (besides name and metadata) of a new ``dim``-d index."""
    quantization = None
    if settings.quantization == "int8":
        # quantile 0.99 and always in RAM: as the edge engine's (edge_store.EdgeOptions.shard_config)
        quantization = qm.ScalarQuantization(
            scalar=qm.ScalarQuantizationConfig(type=qm.ScalarType.INT8, quantile=0.99, always_ram=True)
        )
    return {
        "vectors_config": qm.VectorParams(size=dim, distance=qm.Distance.COSINE, on_disk=settings.vectors_on_disk),
        "hnsw_config": qm.HnswConfigDiff(
            m=settings.hnsw_m, ef_construct=settings.hnsw_ef_construct, full_scan_threshold=_FULL_SCAN_THRESHOLD_KB,
        ),
        "quantization_config": quantization,
        "on_disk_payload": settings.payload_on_disk,
        "shard_number": settings.shard_number,
        "replication_factor": settings.replication_factor,
        "write_consistency_factor": settings.write_consistency_factor,
    }


def search_params(settings: Settings) -> qm.SearchParams:
    """Per-query parameters (ignored by local mode, which always searches exactly)."""
    return qm.SearchParams(
        hnsw_ef=settings.hnsw_ef, exact=settings.exact_search,
        quantization=qm.QuantizationSearchParams(rescore=settings.rescore, oversampling=settings.oversampling),
    )


def pixels_payload(tile: np.ndarray) -> str:
    """A tile (H, W, 3) uint8 as the payload value under :data:`PIXELS_KEY` (base64 of its PNG)."""
    return base64.b64encode(encode_tile_png(tile)).decode("ascii")


def pixels_from_payload(value: str) -> np.ndarray:
    """The tile (H, W, 3) uint8 of a :data:`PIXELS_KEY` payload value."""
    return decode_tile_png(base64.b64decode(value))
