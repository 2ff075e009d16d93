"""The demo through a running gateway with the SDK (``histoxplain demo --server HOST:PORT``).

The samples are tiled here exactly as the in-process demo tiles them (same tile plan), each
tile is streamed to the gateway as an image, and the explanations that come back are written
into the same report. The report draws the returned heatmap values over the local tile pixels,
looked up by the ``source`` name each tile was sent with.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from histoxplain_client import Client, IndexImage, Unavailable
from histoxplain_model.errors import DependencyUnavailable
from histoxplain_model.results import RegionCorrespondence
from histoxplain_service.app.demo.queries import demo_correspondences
from histoxplain_service.domain.ingest import InputFile, iter_tiles, open_source, plan_tiles
from histoxplain_service.domain.types import Box, ExplainedHit, ExplainedSearch, SearchHit
from histoxplain_service.app.samples import HE_LABEL, IHC_LABEL, he_slide_path, ihc_image_path
from histoxplain_service.config import Settings

_TIMEOUT_S = 600.0


def _sample_tiles(settings: Settings, tile: int, ihc_stride: int) -> Iterator[tuple[str, str, np.ndarray]]:
    """(source name, label, pixels) of every demo tile, the in-process demo's tile plan."""
    plans = (
        (he_slide_path(), HE_LABEL, settings.with_changes(tile_size=tile, stride=tile)),
        (ihc_image_path(), IHC_LABEL, settings.with_changes(tile_size=tile, stride=ihc_stride)),
    )
    for path, label, tiling in plans:
        source = open_source(InputFile(Path(path), label), tiling)
        try:
            records = plan_tiles(source, tiling.tile_size, tiling.tile_stride, tiling.min_tissue)
            for record, pixels in zip(records, iter_tiles(source, records, tiling.tile_size)):
                yield f"{Path(path).name}@{record.box.x},{record.box.y}", label, pixels
        finally:
            source.close()


def run_remote(
    server: str, queries: dict, index: str, k: int, runs: Sequence[tuple[str, str, str]], tile: int, ihc_stride: int
) -> tuple[list[ExplainedSearch], list[str]]:

    tiles = {name: (label, pixels) for name, label, pixels in _sample_tiles(Settings(), tile, ihc_stride)}
    try:
        with Client(server, timeout=_TIMEOUT_S) as client:
            client.wait_until_ready(timeout=30.0)
            model = client.info()
            summary = client.index_images(
                index,
                [IndexImage(pixels, label=label, source=name) for name, (label, pixels) in tiles.items()],
                tile_size=tile, stride=tile,
            )
            searches = []
            for query_name, method, polarity in runs:
                query = queries[query_name].image
                explanation = client.search_and_explain(
                    index, query, k=k, method=method, polarity=polarity, side="both",
                    correspondences=demo_correspondences(method),
                )
                searches.append(_to_search(explanation, query, tiles))
    except Unavailable as exc:
        raise DependencyUnavailable(f"no histoxplain gateway answers at {server} ({exc}); start one with `make serve`") from exc
    notes = [
        f"encoder: {model.preset} ({model.architecture}, {model.embedding_dim}-d), through the gateway at {server} "
        f"({model.backend} backend)",
        f"index '{index}': {summary.images_indexed} tile images indexed now, {summary.images_received} sent",
    ]
    return searches, notes


def _box(box) -> tuple[int, int, int, int]:
    """An SDK box as the library's (x, y, width, height)."""
    return box.x, box.y, box.width, box.height


def _to_search(explanation, query: np.ndarray, tiles: dict[str, tuple[str, np.ndarray]]) -> ExplainedSearch:

    hits = []
    for reference in explanation.references:
        remote = reference.hit
        box = Box(remote.box.x, remote.box.y, remote.box.width, remote.box.height)
        hit = SearchHit(remote.score, remote.point_id, remote.image_id, remote.label or None, remote.source, box,
                        remote.level, remote.mpp, 0)
        hits.append(ExplainedHit(
            position=reference.reference_index,
            hit=hit,
            similarity=reference.similarity,
            image=tiles[remote.source][1],
            query_heatmap=None if reference.query_heatmap is None else reference.query_heatmap.values,
            hit_heatmap=None if reference.reference_heatmap is None else reference.reference_heatmap.values,
            correspondences=tuple(
                RegionCorrespondence(_box(pair.query_box), _box(pair.reference_box), pair.share, pair.rank)
                for pair in reference.correspondences
            ),
        ))
    return ExplainedSearch(explanation.method, explanation.polarity, explanation.side, query, tuple(hits))
