"""The domain: index, search and explain, shared by the CLI and the gRPC gateway.

Everything here takes and returns numpy arrays and frozen dataclasses; no protobuf. The model
side is any :class:`~histoxplain_service.backends.ModelBackend` (in-process or TorchServe), the
index side any :class:`~histoxplain_service.index.base.IndexEngine`; both are chosen by
:mod:`histoxplain_service.bootstrap`, never here.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from histoxplain_model.deadlines import time_left
from histoxplain_model.errors import FailedPrecondition, InvalidRequest, NotFound
from histoxplain_model.limits import IMAGE_ID, MAX_K, POINT_ID
from histoxplain_model.vocabulary import DEFAULT_TARGET, POLARITIES, SIDES, check_name
from histoxplain_model.options import SaliencyOptions
from histoxplain_model.requests import ExplainRequest
from histoxplain_model.results import ModelInfo
from histoxplain_service.backends import ModelBackend
from histoxplain_service.domain.ingest import ArraySource, IndexSummary, index_images, index_paths, iter_tiles, plan_tiles
from histoxplain_service.config import Settings
from histoxplain_service.domain.checks import EncodedImage, check_texts
from histoxplain_service.domain.ranking import rank_images
from histoxplain_service.domain.types import (
    DeleteSummary,
    ExplainedHit,
    ExplainedSearch,
    ImageHit,
    IndexInfo,
    SearchHit,
    TileFilter,
)
from histoxplain_service.index.base import IndexEngine, VectorIndex

#: Threads reading the tiles of DICOM hits from the PACS at once (:meth:`Retrieval.explain_hits`).
DICOM_READERS = 4


def check_k(k: int, limit: int = MAX_K, what: str = "k") -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= limit:
        raise InvalidRequest(f"{what} must be an integer from 1 to {limit}, got {k!r}")
    return k


class Retrieval:
    """Search and explanation over named indexes, with one model backend and one index engine.

    Args:
        settings: tiling and limits (indexing and query tiles).
        backend: embeds and explains; not closed here.
        index_engine: holds the indexes; not closed here (its opener owns it).
        dicom_tiles: reads the pixels of hits cut from DICOM slides (``hit.dicom``) from the PACS,
            which keeps them (the index does not: :mod:`histoxplain_service.pacs`); ``None``: such
            hits cannot be explained.
    """

    def __init__(
        self, settings: Settings, backend: ModelBackend, index_engine: IndexEngine,
        dicom_tiles: Callable[[SearchHit], np.ndarray] | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.index_engine = index_engine
        self.dicom_tiles = dicom_tiles
        self._info: ModelInfo | None = None

    @property
    def model(self) -> ModelInfo:
        if self._info is None:
            self._info = self.backend.info()
        return self._info

    # -- indexes -----------------------------------------------------------------------------------

    def index(self, name: str) -> VectorIndex:
        return self.index_engine.open_index(name)

    def searchable(self, name: str) -> VectorIndex:
        """An existing index built with this backend's encoder (NotFound / FailedPrecondition)."""
        index = self.index(name)
        index.check_encoder(self.model.preset, self.model.embedding_dim)
        return index

    def list_indexes(self) -> list[IndexInfo]:
        return self.index_engine.list_indexes()

    def describe(self, name: str) -> IndexInfo:
        return self.index(name).describe()

    def delete_images(self, name: str, image_ids: Sequence[str]) -> DeleteSummary:
        """Delete images (all their tiles); ids given twice count once, unknown ids are reported."""
        wanted = list(dict.fromkeys(check_texts(image_ids, IMAGE_ID, "image_ids")))
        if not wanted:
            raise InvalidRequest("no image ids to delete; give at least one")
        index = self.searchable(name)
        held = set(index.image_ids())
        present = [image_id for image_id in wanted if image_id in held]
        tiles = index.delete(present) if present else 0
        return DeleteSummary(len(present), tiles, tuple(image_id for image_id in wanted if image_id not in held))

    def index_paths(
        self, name: str, paths: Iterable[str | os.PathLike[str]], label: str | None = None, show_progress: bool = True,
        metadata: Mapping[str, str] | None = None,
    ) -> IndexSummary:
        """Index files and folders (``metadata``: descriptive fields stored with every tile)."""
        index = self.index(name)
        summary = index_paths(
            paths, index, self._embed_tiles, self.settings,
            preset=self.model.preset, dim=self.model.embedding_dim, label=label, show_progress=show_progress,
            metadata=metadata,
        )
        _settle(index, summary)
        return summary

    def index_encoded(self, name: str, images: Iterable[EncodedImage]) -> IndexSummary:
        """Index encoded images (:class:`~.checks.EncodedImage` each) as ``images`` yields them.

        An empty stream leaves the index (and the model) untouched. Under
        ``histoxplain_model.deadlines.deadline`` the run stops between batches when its caller
        cancels or its deadline passes (:attr:`IndexSummary.stopped`)."""
        stream = iter(images)
        first = next(stream, None)
        if first is None:
            return IndexSummary(name, (), ())
        index = self.index(name)
        summary = index_images(
            itertools.chain([first], stream), index, self._embed_tiles, self.settings,
            preset=self.model.preset, dim=self.model.embedding_dim,
        )
        _settle(index, summary)
        return summary

    def _embed_tiles(self, tiles: Sequence[np.ndarray]) -> np.ndarray:
        """One embedding batch of an indexing run, within the run's deadline, if it has one."""
        return self.backend.embed(tiles, timeout=time_left())

    # -- search ------------------------------------------------------------------------------------

    def embed_query(self, image: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """The whole query image as one tile -> (D,) float32."""
        return self.backend.embed([image], timeout=timeout)[0]

    def query_tiles(self, image: np.ndarray) -> list[np.ndarray]:
        """The query cut into index-sized tissue tiles (one tile when it is that small)."""
        source = ArraySource(image, "query", "query")
        size = self.settings.tile_size
        records = plan_tiles(source, size, self.settings.tile_stride, self.settings.min_tissue)
        return list(iter_tiles(source, records, size)) or [image]

    def search(
        self, name: str, image: np.ndarray, k: int, label: str | None = None, timeout: float | None = None,
        tile_filter: TileFilter | None = None,
    ) -> list[SearchHit]:
        """The ``k`` indexed tiles most similar to the query (treated as one tile), best first.

        ``label`` and ``tile_filter`` (e.g. ``TileFilter.where(source=..., organ="skin")``) keep
        only the tiles they match; the index searches among those, so ``k`` of them come back
        when there are that many."""
        check_k(k)
        index = self.searchable(name)
        return index.search(self.embed_query(image, timeout), k, label=label, timeout=timeout, tile_filter=tile_filter)

    def search_images(
        self, name: str, image: np.ndarray, k: int, label: str | None = None, timeout: float | None = None,
        tile_filter: TileFilter | None = None,
    ) -> list[ImageHit]:
        """The ``k`` indexed images whose tiles best match the query's tiles (see :mod:`.ranking`),
        among tiles of ``label`` and kept by ``tile_filter``."""
        check_k(k)
        index = self.searchable(name)
        vectors = self.backend.embed(self.query_tiles(image), timeout=timeout)
        return rank_images(index, vectors, k, label=label, timeout=timeout, tile_filter=tile_filter)

    def search_images_and_explain(
        self, name: str, image: np.ndarray, k: int, method: str, polarity: str = "similar",
        side: str = "both", timeout: float | None = None, options: SaliencyOptions | None = None,
        tile_filter: TileFilter | None = None, target: str = DEFAULT_TARGET, correspondences: int = 0,
        verify: bool = False,
    ) -> tuple[list[ImageHit], ExplainedSearch]:
        """:meth:`search_images`, then each image's best tile explained against the query.

        Returns the image hits and the explanation, hit ``i`` explained by tile ``i``."""
        self._check_explain_options(method, polarity, side)
        image_hits = self.search_images(name, image, k, timeout=timeout, tile_filter=tile_filter)
        tiles = [max(hit.tiles, key=lambda tile: tile.score) for hit in image_hits]
        return image_hits, self.explain_hits(
            name, image, tiles, method, polarity, side, timeout, options, target=target, correspondences=correspondences,
            verify=verify,
        )

    # -- explain -----------------------------------------------------------------------------------

    def _check_explain_options(self, method: str, polarity: str, side: str) -> None:
        check_name("method", method, self.model.methods)
        check_name("polarity", polarity, POLARITIES)
        check_name("side", side, SIDES)

    def explain_hits(
        self, name: str, image: np.ndarray, hits: Sequence[SearchHit], method: str,
        polarity: str = "similar", side: str = "both", timeout: float | None = None,
        options: SaliencyOptions | None = None, query_embedding: np.ndarray | None = None,
        target: str = DEFAULT_TARGET, correspondences: int = 0, verify: bool = False,
    ) -> ExplainedSearch:
        """Explain the query against indexed tiles (their stored pixels and vectors).

        ``options``: the method's own options type (e.g. ``SmoothGradOptions`` for its samples and
        noise; another method's raise InvalidRequest); ``None``: the method's defaults.
        ``query_embedding``: the query's vector when the caller has it.
        ``target`` ("cosine" or "projection"), ``correspondences`` (region pairs per hit, 0:
        none) and ``verify`` (each map's faithfulness): as
        :class:`histoxplain_model.requests.ExplainRequest` (every explain method here).
        """
        self._check_explain_options(method, polarity, side)
        if not hits:
            raise InvalidRequest("nothing to explain against: the search returned no hits")
        index = self.index(name)
        references = self._load_tiles(index, hits)
        return self._explain(
            image, references, list(hits), method, polarity, side, timeout, options,
            query_embedding=query_embedding, reference_embeddings=self._stored_vectors(index, hits),
            target=target, correspondences=correspondences, verify=verify,
        )

    def _load_tiles(self, index: VectorIndex, hits: Sequence[SearchHit]) -> list[np.ndarray]:
        """The hits' pixels, in order. DICOM tiles come over the network, one WADO-RS round trip
        or more each, so they are read by up to :data:`DICOM_READERS` threads at once; the threads
        are started here, so they share this thread's network namespace, and each runs in a copy
        of its context (the caller's deadline and stop signal)."""
        if sum(hit.dicom is not None for hit in hits) < 2:
            return [self._load_tile(index, hit) for hit in hits]
        with ThreadPoolExecutor(max_workers=min(len(hits), DICOM_READERS), thread_name_prefix="dicom-tiles") as pool:
            futures = {
                position: pool.submit(contextvars.copy_context().run, self._load_tile, index, hit)
                for position, hit in enumerate(hits) if hit.dicom is not None
            }
            try:
                return [
                    futures[position].result() if position in futures else self._load_tile(index, hit)
                    for position, hit in enumerate(hits)
                ]
            finally:
                for future in futures.values():
                    future.cancel()  # after a failure: the reads not started yet never are

    def _load_tile(self, index: VectorIndex, hit: SearchHit) -> np.ndarray:
        """A hit's pixels as embedded: from the index's copy, or re-read from the PACS for a DICOM tile."""
        if hit.dicom is None:
            return index.load_tile(hit)
        if self.dicom_tiles is None:
            raise FailedPrecondition(
                "a hit is a tile of a DICOM slide, whose pixels stay in the PACS; set HISTOXPLAIN_DICOMWEB_URL "
                "(and its credentials) to explain it"
            )
        return self.dicom_tiles(hit)

    def _stored_vectors(self, index: VectorIndex, hits: Sequence[SearchHit]) -> np.ndarray | None:
        """The hits' vectors (K, D) as the index stores them, or None when they are not this
        model's (an index built with another encoder: the backend embeds the tiles instead)."""
        if index.encoder() != (self.model.preset, self.model.embedding_dim):
            return None
        _, vectors = index.points([hit.point_id for hit in hits])
        return vectors

    def explain_images(
        self, image: np.ndarray, references: Sequence[np.ndarray], method: str,
        polarity: str = "similar", side: str = "both", timeout: float | None = None,
        options: SaliencyOptions | None = None, target: str = DEFAULT_TARGET, correspondences: int = 0,
        verify: bool = False,
    ) -> ExplainedSearch:
        """Explain the query against reference images given directly (no index)."""
        self._check_explain_options(method, polarity, side)
        if not references:
            raise InvalidRequest("no reference images to explain against; give at least one")
        return self._explain(
            image, list(references), [None] * len(references), method, polarity, side, timeout, options,
            target=target, correspondences=correspondences, verify=verify,
        )

    def indexed_hits(
        self, name: str, image: np.ndarray, image_ids: Sequence[str] = (), point_ids: Sequence[str] = (),
        timeout: float | None = None, query_embedding: np.ndarray | None = None,
    ) -> list[SearchHit]:
        """Indexed references as hits scored against the query: each image id becomes its tile
        most similar to the query, each point id its own tile (image ids first, in the given order).

        ``query_embedding``: the query's vector when the caller has it (else it is embedded).
        An unknown image id is named by its position (``image_ids[i]``): ids may carry patient
        data and error messages are logged."""
        if not image_ids and not point_ids:
            raise InvalidRequest("no image ids or point ids given; name at least one indexed image or tile")
        check_texts(image_ids, IMAGE_ID, "image_ids")
        check_texts(point_ids, POINT_ID, "point_ids")
        index = self.searchable(name)
        query = self.embed_query(image, timeout) if query_embedding is None else query_embedding
        hits = []
        for position, image_id in enumerate(image_ids):
            try:
                records, vectors = index.image_tiles(image_id)
            except NotFound:
                raise NotFound(
                    f"image_ids[{position}] is not in index {name!r}; use image ids from a search"
                ) from None
            scores = vectors @ query
            best = int(np.argmax(scores))
            hits.append(SearchHit.from_record(records[best], float(scores[best])))
        if point_ids:
            records, vectors = index.points(point_ids)
            hits.extend(SearchHit.from_record(record, float(score)) for record, score in zip(records, vectors @ query))
        return hits

    def explain_indexed(
        self, name: str, image: np.ndarray, image_ids: Sequence[str], point_ids: Sequence[str], method: str,
        polarity: str = "similar", side: str = "both", timeout: float | None = None,
        options: SaliencyOptions | None = None, target: str = DEFAULT_TARGET, correspondences: int = 0,
        verify: bool = False,
    ) -> ExplainedSearch:
        """:meth:`indexed_hits` then :meth:`explain_hits`, embedding the query once, so the
        backend embeds nothing again."""
        self._check_explain_options(method, polarity, side)
        query_vector = self.embed_query(image, timeout)
        hits = self.indexed_hits(name, image, image_ids, point_ids, timeout, query_embedding=query_vector)
        return self.explain_hits(
            name, image, hits, method, polarity, side, timeout, options, query_embedding=query_vector,
            target=target, correspondences=correspondences, verify=verify,
        )

    def search_and_explain(
        self, name: str, image: np.ndarray, k: int, method: str, polarity: str = "similar",
        side: str = "both", label: str | None = None, timeout: float | None = None,
        options: SaliencyOptions | None = None, tile_filter: TileFilter | None = None,
        target: str = DEFAULT_TARGET, correspondences: int = 0, verify: bool = False,
    ) -> ExplainedSearch:
        """:meth:`search` (``label`` and ``tile_filter`` as there) then :meth:`explain_hits`,
        reusing the query's embedding and the hits' stored vectors so the backend embeds nothing again."""
        self._check_explain_options(method, polarity, side)
        check_k(k)
        index = self.searchable(name)
        query_vector = self.embed_query(image, timeout)
        hits, vectors = index.search_with_vectors(
            query_vector, k, label=label, timeout=timeout, tile_filter=tile_filter
        )
        if not hits:
            raise InvalidRequest("nothing to explain against: the search returned no hits")
        references = self._load_tiles(index, hits)
        return self._explain(
            image, references, hits, method, polarity, side, timeout, options,
            query_embedding=query_vector, reference_embeddings=vectors,
            target=target, correspondences=correspondences, verify=verify,
        )

    def _explain(
        self, image: np.ndarray, references: list[np.ndarray], hits: list[SearchHit | None],
        method: str, polarity: str, side: str, timeout: float | None, options: SaliencyOptions | None,
        query_embedding: np.ndarray | None = None, reference_embeddings: np.ndarray | None = None,
        target: str = DEFAULT_TARGET, correspondences: int = 0, verify: bool = False,
    ) -> ExplainedSearch:
        # The deadline travels with the request, so the explanation stops itself once its
        # caller has given up, also inside a TorchServe worker (histoxplain_model.deadlines).
        request = ExplainRequest(
            image, references, method, polarity, side, options,
            query_embedding=query_embedding, reference_embeddings=reference_embeddings,
            deadline=None if timeout is None else time.time() + timeout,
            target=target, correspondences=correspondences, verify=verify,
        )
        result = self.backend.explain(request, timeout=timeout)
        explained = tuple(
            ExplainedHit(
                position=i,
                hit=hit,
                similarity=float(result.scores[i]),
                image=references[i],
                query_heatmap=None if result.query_heatmaps is None else result.query_heatmaps[i],
                hit_heatmap=None if result.reference_heatmaps is None else result.reference_heatmaps[i],
                correspondences=() if result.correspondences is None else result.correspondences[i],
                query_faithfulness=None if result.query_faithfulness is None else result.query_faithfulness[i],
                hit_faithfulness=None if result.reference_faithfulness is None else result.reference_faithfulness[i],
            )
            for i, hit in enumerate(hits)
        )
        return ExplainedSearch(method, polarity, side, image, explained)


def _settle(index: VectorIndex, summary: IndexSummary) -> None:
    """After an indexing run that wrote tiles, let the engine build what makes them fast to
    search (edge: the HNSW graph of new segments). A run that stopped early leaves it to the next."""
    if summary.tiles_indexed and summary.stopped is None:
        index.optimize()


__all__ = [
    "DICOM_READERS",
    "Retrieval",
    "check_k",
]
