"""Whole-image ranking: how tile hits become a ranking of images.

Rule
    An image's score is the mean, over the Q query tiles, of the cosine similarity of that
    image's best-matching tile. Candidates are the union of the best ``2k`` images of each query
    tile (the index groups by image id, so no image is crowded out by many tiles of another);
    every candidate is then scored exactly against every query tile. With one query tile the
    ranking is exact; with several, an image outside every query tile's top ``2k`` is not
    considered. Ties are broken by image id, so the order is the same on every engine.

The rule is the domain's; an index engine only answers "the best tile per image" for a query
(:meth:`~histoxplain_service.index.base.VectorIndex.best_tile_per_image`): Qdrant's grouped
query (``query_points_groups``) on a server and in local mode, the same grouping done in rounds
on qdrant-edge, whose Python API has no grouped query (:mod:`histoxplain_service.index.edge`).
So the top ``k`` images come back even when one image owns most of the nearest tiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from histoxplain_model.errors import InvalidRequest
from histoxplain_service.domain.types import ImageHit, SearchHit, TileFilter
from histoxplain_service.index.base import VectorIndex, validate_k

__all__ = ["combine_best_tiles", "rank_images"]


def rank_images(
    index: VectorIndex, vectors: np.ndarray, k: int, label: str | None = None, timeout: float | None = None,
    tile_filter: TileFilter | None = None,
) -> list[ImageHit]:
    """The ``k`` images of ``index`` whose tiles best match the query tiles (Q, D) or (D,), best first.

    Only tiles of ``label`` and kept by ``tile_filter`` count (an image none of whose tiles match
    is not ranked).

    Raises:
        InvalidRequest: k <= 0, or no query vector.  NotFound: missing or empty index.
        FailedPrecondition: D is not the index's dimension.
    """
    validate_k(k)
    queries = np.asarray(vectors, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.shape[0] == 0:
        raise InvalidRequest(f"query vectors must be (Q, D) with Q >= 1, got shape {queries.shape}")
    best = index.best_tile_per_image(queries, 2 * k, label=label, timeout=timeout, tile_filter=tile_filter)
    candidates = sorted(set().union(*best))
    if not candidates:
        return []
    if len(queries) > 1:
        # Score every candidate against every query tile, not only where it made the top 2k.
        best = index.best_tile_per_image(
            queries, len(candidates), label=label, image_ids=candidates, timeout=timeout, tile_filter=tile_filter
        )
    return combine_best_tiles(best, candidates, k)


def combine_best_tiles(
    best: Sequence[Mapping[str, SearchHit]], candidates: Sequence[str], k: int
) -> list[ImageHit]:
    """The ``k`` best of ``candidates``, each scored by the mean of its best tile per query.

    Args:
        best: per query tile, {image id: that image's best tile}; every candidate in each.
        candidates: the image ids to rank.
    """
    ranked: list[ImageHit] = []
    for image_id in candidates:
        tiles = tuple(per_query[image_id] for per_query in best)
        score = float(np.mean([tile.score for tile in tiles]))
        ranked.append(ImageHit(score, image_id, tiles[0].label, tiles[0].source, tiles))
    ranked.sort(key=lambda hit: (-hit.score, hit.image_id))
    return ranked[:k]
