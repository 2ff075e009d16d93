"""The domain's value types: tiles, hits, index descriptions and explained searches.

Frozen dataclasses that every layer passes around (the index engines fill them, the domain
combines them, the gateway converts them to messages). This module imports nothing from the
service and no engine, so the index adapters can return these types without an import cycle
and without the domain knowing which engine made them.

Point ids
    A tile's id is ``uuid5(namespace, "image_id/level/x,y,w,h")`` with a fixed namespace, so the
    same tile gets the same id on every machine and every run: indexing an image again
    overwrites its points instead of adding copies. Existing indexes hold ids made by this
    rule; changing the namespace or the name format would orphan them.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

__all__ = [
    "Box",
    "DeleteSummary",
    "ExplainedHit",
    "ExplainedSearch",
    "ImageHit",
    "IndexInfo",
    "SearchHit",
    "TileRecord",
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

    @classmethod
    def from_record(cls, record: TileRecord, score: float, point_id: str | None = None) -> SearchHit:
        """The hit of a stored tile; ``point_id`` as the engine returned it (default: the record's)."""
        return cls(
            score, record.point_id if point_id is None else point_id, record.image_id, record.label,
            record.source, record.box, record.level, record.mpp, record.tile_index,
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
    """

    hit: SearchHit | None
    similarity: float
    image: np.ndarray
    query_heatmap: np.ndarray | None
    hit_heatmap: np.ndarray | None
    position: int = 0


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
