"""The domain hands the backend the vectors it already has (query embedding, stored hit vectors)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.requests import ExplainRequest
from histoxplain_model.results import RetrievalExplanation
from histoxplain_model.results import ModelInfo
from histoxplain_service.domain.retrieval import Retrieval
from histoxplain_service.domain.types import Box, TileRecord
from histoxplain_service.index.qdrant import QdrantEngine
from histoxplain_service.config import Settings

DIM = 4
INDEX = "spy"


class SpyBackend:
    """Embeds a tile as its normalised (R, G, B, 1) means; records what explain receives."""

    def __init__(self) -> None:
        self.explained: list[dict[str, object]] = []
        self.embedded = 0
        self.scores: np.ndarray | None = None  # what explain answers (default: zeros)

    def info(self) -> ModelInfo:
        return ModelInfo("spy", "spy", DIM, (8, 8), ("gradcam",), "spy")

    def embed(self, images: Sequence[np.ndarray], timeout: float | None = None) -> np.ndarray:
        self.embedded += len(images)
        features = np.array([[*image.reshape(-1, 3).mean(axis=0), 64.0] for image in images], dtype=np.float32)
        return features / np.linalg.norm(features, axis=1, keepdims=True)

    def explain(self, request: ExplainRequest, timeout: float | None = None) -> RetrievalExplanation:
        self.explained.append(
            {"query_embedding": request.query_embedding, "reference_embeddings": request.reference_embeddings}
        )
        count = len(request.references)
        scores = self.scores if self.scores is not None else np.zeros(count, np.float32)
        return RetrievalExplanation(request.method, request.polarity, scores, None, None)

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        pass


@pytest.fixture
def retrieval(tmp_path: Path) -> Iterator[Retrieval]:
    qdrant = QdrantClient(path=str(tmp_path / "qdrant"))
    settings = Settings(data_dir=tmp_path / "data")
    domain = Retrieval(settings, SpyBackend(), QdrantEngine(settings, qdrant))
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(6)]
    records = [TileRecord(f"img{i // 3}", f"/data/img{i // 3}.png", None, Box(8 * (i % 3), 0, 8, 8), 0, 0.5, i % 3, 3)
               for i in range(6)]
    index = domain.index(INDEX)
    index.ensure("spy", DIM)
    # Stored vectors differ from what the spy would embed now, so a re-embedding would show.
    stored = domain.backend.embed(tiles) * np.array([1, 1, 1, -1], np.float32)
    index.upsert(records, stored, tiles)
    domain.backend.embedded = 0
    yield domain
    qdrant.close()


def test_search_and_explain_passes_the_query_vector_and_the_stored_hit_vectors(retrieval: Retrieval) -> None:
    query = np.full((8, 8, 3), 120, np.uint8)
    retrieval.search_and_explain(INDEX, query, 4, "gradcam")
    assert retrieval.backend.embedded == 1  # the query, once, for the search
    (call,) = retrieval.backend.explained
    hits, vectors = retrieval.index(INDEX).search_with_vectors(retrieval.embed_query(query), 4)
    np.testing.assert_allclose(call["query_embedding"], retrieval.embed_query(query), atol=1e-6)
    np.testing.assert_allclose(call["reference_embeddings"], vectors, atol=1e-6)
    _, by_point = retrieval.index(INDEX).points([hit.point_id for hit in hits])
    np.testing.assert_allclose(call["reference_embeddings"], by_point, atol=1e-6)


def test_explain_hits_passes_the_indexed_vectors_of_the_hits(retrieval: Retrieval) -> None:
    query = np.full((8, 8, 3), 30, np.uint8)
    hits = retrieval.indexed_hits(INDEX, query, image_ids=["img1"], point_ids=[])
    hits += retrieval.indexed_hits(INDEX, query, point_ids=[hits[0].point_id])
    retrieval.explain_hits(INDEX, query, hits, "gradcam")
    (call,) = retrieval.backend.explained
    _, stored = retrieval.index(INDEX).points([hit.point_id for hit in hits])
    np.testing.assert_allclose(call["reference_embeddings"], stored, atol=1e-6)
    assert call["reference_embeddings"].shape == (2, DIM)


def test_explain_indexed_embeds_the_query_once_and_passes_every_vector(retrieval: Retrieval) -> None:
    query = np.full((8, 8, 3), 200, np.uint8)
    explained = retrieval.explain_indexed(INDEX, query, ["img0"], [], "gradcam")
    assert retrieval.backend.embedded == 1  # scoring the image's tiles and explaining share it
    (call,) = retrieval.backend.explained
    np.testing.assert_allclose(call["query_embedding"], retrieval.embed_query(query), atol=1e-6)
    (hit,) = [item.hit for item in explained.hits]
    assert hit.image_id == "img0"
    _, stored = retrieval.index(INDEX).points([hit.point_id])
    np.testing.assert_allclose(call["reference_embeddings"], stored, atol=1e-6)


def test_references_given_as_images_have_no_stored_vectors(retrieval: Retrieval) -> None:
    image = np.full((8, 8, 3), 90, np.uint8)
    retrieval.explain_images(image, [image, image], "gradcam")
    (call,) = retrieval.backend.explained
    assert call["query_embedding"] is None and call["reference_embeddings"] is None


def test_delete_images_counts_each_id_once_and_reports_the_missing(retrieval: Retrieval) -> None:
    summary = retrieval.delete_images(INDEX, ["img0", "nope", "img0"])
    assert (summary.images_deleted, summary.tiles_deleted, summary.missing_image_ids) == (1, 3, ("nope",))
    assert retrieval.index(INDEX).image_ids() == ["img1"]
    with pytest.raises(InvalidRequest, match="at least one"):
        retrieval.delete_images(INDEX, [])


def test_explained_hits_rank_by_similarity_and_keep_their_positions(retrieval: Retrieval) -> None:
    query = np.full((8, 8, 3), 200, np.uint8)
    retrieval.backend.scores = np.array([0.1, 0.9, 0.5], np.float32)
    explained = retrieval.explain_images(query, [query, query, query], "gradcam")
    assert [hit.position for hit in explained.hits] == [0, 1, 2]
    assert [hit.position for hit in explained.ranked().hits] == [1, 2, 0]
    assert [hit.similarity for hit in explained.ranked(2).hits] == pytest.approx([0.9, 0.5])


def test_image_ranking_explains_each_image_by_its_best_tile(retrieval: Retrieval) -> None:
    query = np.full((8, 8, 3), 120, np.uint8)
    image_hits, explained = retrieval.search_images_and_explain(INDEX, query, 2, "gradcam")
    assert len(image_hits) == len(explained.hits) == 2
    for image_hit, item in zip(image_hits, explained.hits):
        assert item.hit == max(image_hit.tiles, key=lambda tile: tile.score)
