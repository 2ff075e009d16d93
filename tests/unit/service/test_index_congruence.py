"""Congruence: the same calls give the same answers on every engine (qdrant-client's
``tests/congruence_tests`` habit).

Engines
    * ``local``: qdrant-client local mode, exact brute force: the reference;
    * ``edge``: qdrant-edge with its defaults: a few hundred points stay in a plain segment,
      searched exactly;
    * ``edge-graph-exact``: qdrant-edge with the HNSW graph built (``optimize``) and
      ``HISTOXPLAIN_EXACT_SEARCH`` on: exact search over an indexed segment;
    * ``server``: a Qdrant server when ``QDRANT_URL`` is set.

Every exact engine must return the same ids in the same order, with scores within
:data:`SCORE_ATOL` of the reference and of a numpy oracle computed from the test's own copy of
the data (all compute float32 cosines of L2-normalised vectors and differ only in summation
order: about 1e-7 here). The data are Gaussian, so no two scores tie. Where the engine is
approximate (qdrant-edge HNSW, with and without int8 quantization) the check is recall@10
against exact search, with :data:`MIN_RECALL`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient

from histoxplain_service.config import Settings
from histoxplain_service.domain.ranking import rank_images
from histoxplain_service.domain.types import Box, FieldMatch, TileFilter, TileRecord
from histoxplain_service.index.base import VectorIndex
from histoxplain_service.index.edge import EdgeEngine, EdgeOptions
from histoxplain_service.index.qdrant import QdrantIndex, open_qdrant
from histoxplain_service.index.tile_store import TileStore

DIM = 16
#: Largest score difference between engines, and against the numpy oracle.
SCORE_ATOL = 1e-5
#: Least recall@10 of an approximate (HNSW) engine against exact search.
MIN_RECALL = 0.95
SERVER = bool(os.environ.get("QDRANT_URL"))
EXACT_ENGINES = ["edge", "edge-graph-exact"] + (["server"] if SERVER else [])


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator[Callable[..., VectorIndex]]:
    """``open_store(kind, **edge_options)``: an empty index ``hxtest-...`` on that engine."""
    closers: list[Callable[[], None]] = []
    name = f"hxtest-{uuid.uuid4().hex[:10]}"

    def open_(kind: str, **options: Any) -> VectorIndex:
        folder = tmp_path / f"{kind}-{len(closers)}"
        if kind == "local":
            client = QdrantClient(path=str(folder / "qdrant"))
            closers.append(client.close)
            return QdrantIndex(client, name, TileStore(folder / "tiles"))
        if kind == "server":
            client = open_qdrant(Settings.from_env())
            closers.append(lambda: (client.delete_collection(name), client.close()))
            return QdrantIndex(client, name, TileStore(folder / "tiles"))
        engine = EdgeEngine(Settings(data_dir=folder), EdgeOptions(**options))
        closers.append(engine.close)
        return engine.open_index(name)

    yield open_
    for close in reversed(closers):
        close()


def open_exact(open_store: Callable[..., VectorIndex], kind: str) -> VectorIndex:
    if kind == "edge-graph-exact":
        return open_store("edge", indexing_threshold_kb=1, exact=True)
    return open_store(kind)


# -- one scenario, run on every engine and on a numpy model of the data ---------------------------


class Oracle:
    """What the index should hold, as plain Python: point id -> (payload, vector)."""

    def __init__(self) -> None:
        self.points: dict[str, tuple[dict[str, Any], np.ndarray]] = {}

    def upsert(self, records: list[TileRecord], vectors: np.ndarray) -> None:
        for record, vector in zip(records, unit(vectors)):
            self.points[record.point_id] = (record.payload(), vector)

    def delete_images(self, image_ids: list[str]) -> None:
        self.points = {pid: p for pid, p in self.points.items() if p[0]["image_id"] not in image_ids}

    def keeps(self, payload: dict[str, Any], tile_filter: TileFilter | None) -> bool:
        def value(key: str) -> Any:
            found: Any = payload
            for part in key.split("."):  # nested keys, as Qdrant reads them
                found = found.get(part) if isinstance(found, dict) else None
            return found

        def holds(condition: FieldMatch) -> bool:
            return value(condition.key) is not None and value(condition.key) in condition.values

        if tile_filter is None:
            return True
        return all(map(holds, tile_filter.must)) and not any(map(holds, tile_filter.must_not))

    def search(self, query: np.ndarray, k: int, tile_filter: TileFilter | None) -> list[tuple[str, float]]:
        kept = [(pid, float(vector @ query)) for pid, (payload, vector) in self.points.items() if self.keeps(payload, tile_filter)]
        return sorted(kept, key=lambda item: -item[1])[:k]

    def best_images(self, query: np.ndarray, limit: int, tile_filter: TileFilter | None) -> list[tuple[str, str, float]]:
        best: dict[str, tuple[str, float]] = {}
        for pid, score in self.search(query, len(self.points), tile_filter):
            best.setdefault(self.points[pid][0]["image_id"], (pid, score))
        return [(image_id, pid, score) for image_id, (pid, score) in best.items()][:limit]


def records_of(image_id: str, n: int, rng: np.random.Generator, size: int = 8) -> list[TileRecord]:
    label = ["A", "B", None][int(rng.integers(3))]
    level = int(rng.integers(2))
    return [
        TileRecord(image_id, f"/slides/{image_id[-1]}.svs", label, Box(i * size, 0, size, size), level, 0.5, i, n)
        for i in range(n)
    ]


def build(index: VectorIndex, oracle: Oracle | None = None) -> None:
    """The same writes, in the same order: 14 images, a relabel, a re-tiling, two deletions."""
    rng = np.random.default_rng(12)
    index.ensure("fake", DIM)
    tile = np.zeros((4, 4, 3), np.uint8)
    for i in range(14):
        records = records_of(f"img{i:02d}", int(rng.integers(3, 30)), rng)
        vectors = rng.normal(size=(len(records), DIM)).astype(np.float32)
        index.upsert(records, vectors, [tile] * len(records))
        if oracle:
            oracle.upsert(records, vectors)
    # relabel one image, re-tile another, delete two
    index.set_image_metadata("img03", "B", "/slides/moved.svs")
    retiled = records_of("img05", 4, rng, size=16)
    retiled_vectors = rng.normal(size=(4, DIM)).astype(np.float32)
    index.upsert(retiled, retiled_vectors, [tile] * 4)
    index.finish_image("img05", [r.point_id for r in retiled])
    index.delete(["img07", "img11"])
    if oracle:
        for pid, (payload, vector) in list(oracle.points.items()):
            if payload["image_id"] == "img03":
                oracle.points[pid] = ({**payload, "label": "B", "source": "/slides/moved.svs"}, vector)
        oracle.delete_images(["img05", "img07", "img11"])
        oracle.upsert(retiled, retiled_vectors)
    index.optimize()


FILTERS: list[TileFilter | None] = [
    None,
    TileFilter.where(label="A"),
    TileFilter.where(source="/slides/moved.svs"),
    TileFilter.where(image_id=["img01", "img03", "img08", "img13"]),
    TileFilter.where(level=1),
    TileFilter(must_not=(FieldMatch("label", ("A",)),)),
    TileFilter.from_mapping({"label": ["A", "B"], "level": 0}, must_not={"image_id": "img02"}),
    TileFilter.where(label="no such label"),
    TileFilter.from_mapping({"box.w": 16}),  # a nested key: the re-tiled image's tiles
]


def queries(n: int, seed: int = 3) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(n, DIM)))


def as_tuples(hits: list[Any]) -> list[tuple[str, float]]:
    return [(hit.point_id, hit.score) for hit in hits]


def assert_same(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> None:
    """Same keys in the same order, the trailing score within SCORE_ATOL."""
    assert [item[:-1] for item in got] == [item[:-1] for item in want]
    np.testing.assert_allclose([item[-1] for item in got], [item[-1] for item in want], atol=SCORE_ATOL, rtol=0)


@pytest.fixture
def reference(open_store: Callable[..., VectorIndex]) -> tuple[VectorIndex, Oracle]:
    oracle = Oracle()
    local = open_store("local")
    build(local, oracle)
    return local, oracle


def test_the_reference_agrees_with_the_numpy_oracle(reference: tuple[VectorIndex, Oracle]) -> None:
    local, oracle = reference
    for query in queries(4):
        for tile_filter in FILTERS:
            assert_same(as_tuples(local.search(query, 50, tile_filter=tile_filter)), oracle.search(query, 50, tile_filter))


@pytest.mark.parametrize("kind", EXACT_ENGINES)
def test_the_same_writes_leave_the_same_index(
    kind: str, reference: tuple[VectorIndex, Oracle], open_store: Callable[..., VectorIndex]
) -> None:
    local, oracle = reference
    index = open_exact(open_store, kind)
    build(index)
    images = len({payload["image_id"] for payload, _ in oracle.points.values()})
    assert images == 12
    assert index.describe() == local.describe()
    assert (index.describe().n_points, index.describe().n_images) == (len(oracle.points), images)
    assert index.image_ids() == local.image_ids()
    for image_id in ("img03", "img05"):
        got, want = index.image_tiles(image_id), local.image_tiles(image_id)
        assert got[0] == want[0]
        np.testing.assert_allclose(got[1], want[1], atol=1e-6)
    ids = sorted(oracle.points)[::7]
    assert index.points(ids)[0] == local.points(ids)[0]
    np.testing.assert_allclose(index.points(ids)[1], local.points(ids)[1], atol=1e-6)


@pytest.mark.parametrize("kind", EXACT_ENGINES)
def test_searches_return_the_same_ids_order_and_scores(
    kind: str, reference: tuple[VectorIndex, Oracle], open_store: Callable[..., VectorIndex]
) -> None:
    local, oracle = reference
    index = open_exact(open_store, kind)
    build(index)
    for query in queries(6):
        for k in (1, 5, 50):
            for tile_filter in FILTERS:
                want = as_tuples(local.search(query, k, tile_filter=tile_filter))
                assert_same(as_tuples(index.search(query, k, tile_filter=tile_filter)), want)
                assert_same(want, oracle.search(query, k, tile_filter))
        hits, vectors = index.search_with_vectors(query, 10, label="B")
        local_hits, local_vectors = local.search_with_vectors(query, 10, label="B")
        assert_same(as_tuples(hits), as_tuples(local_hits))
        np.testing.assert_allclose(vectors, local_vectors, atol=1e-6)


@pytest.mark.parametrize("kind", EXACT_ENGINES)
def test_grouped_image_rankings_are_the_same(
    kind: str, reference: tuple[VectorIndex, Oracle], open_store: Callable[..., VectorIndex]
) -> None:
    local, oracle = reference
    index = open_exact(open_store, kind)
    build(index)
    for tile_filter in FILTERS[:4]:
        for limit in (1, 3, 20):
            qs = queries(3, seed=limit)
            got = index.best_tile_per_image(qs, limit, tile_filter=tile_filter)
            want = local.best_tile_per_image(qs, limit, tile_filter=tile_filter)
            for query, got_one, want_one in zip(qs, got, want):
                rows = [(image_id, hit.point_id, hit.score) for image_id, hit in got_one.items()]
                assert_same(rows, [(image_id, hit.point_id, hit.score) for image_id, hit in want_one.items()])
                assert_same(rows, oracle.best_images(query, limit, tile_filter))
        for k in (1, 4, 30):
            got_images = rank_images(index, queries(3, seed=k), k, tile_filter=tile_filter)
            want_images = rank_images(local, queries(3, seed=k), k, tile_filter=tile_filter)
            assert_same([(h.image_id, h.score) for h in got_images], [(h.image_id, h.score) for h in want_images])
            assert [[t.point_id for t in h.tiles] for h in got_images] == [[t.point_id for t in h.tiles] for h in want_images]


def crowded(index: VectorIndex, query: np.ndarray) -> list[str]:
    """One image owns the 300 tiles nearest the query; six others have 3 tiles each, farther away.
    Returns the other images' ids, best first."""
    rng = np.random.default_rng(4)
    index.ensure("fake", DIM)
    big = [TileRecord("big", "/big.svs", "A", Box(i, 0, 1, 1), 0, None, i, 300) for i in range(300)]
    index.upsert(big, unit(query + 0.05 * rng.normal(size=(300, DIM))), [np.zeros((2, 2, 3), np.uint8)] * 300)
    others = []
    for rank in range(6):
        image_id = f"other{rank}"
        records = [TileRecord(image_id, f"/{image_id}.svs", "A", Box(i, 0, 1, 1), 0, None, i, 3) for i in range(3)]
        # further from the query the higher the rank: cos ~ 0.9, 0.8, ... to the query
        direction = unit(rng.normal(size=(3, DIM)))
        weight = 1.5 - 0.25 * rank
        index.upsert(records, unit(weight * query + direction), [np.zeros((2, 2, 3), np.uint8)] * 3)
        others.append(image_id)
    index.optimize()
    return others


@pytest.mark.parametrize("kind", ["local", "edge", "edge-graph", "edge-graph-int8"] + (["server"] if SERVER else []))
def test_the_top_images_come_back_when_one_image_owns_the_nearest_tiles(
    kind: str, open_store: Callable[..., VectorIndex]
) -> None:
    query = queries(1, seed=9)[0]
    if kind.startswith("edge-graph"):
        index = open_store("edge", indexing_threshold_kb=1, quantization="int8" if kind.endswith("int8") else "none")
    else:
        index = open_store(kind)
    others = crowded(index, query)
    assert {hit.image_id for hit in index.search(query, 100)} == {"big"}  # tiles alone: one image
    ranked = rank_images(index, query, k=4)
    assert [hit.image_id for hit in ranked] == ["big", *others[:3]]
    assert len(index.best_tile_per_image(query[None, :], 7)[0]) == 7


def recall_at_10(found: list[list[str]], exact: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_hnsw_recall_against_exact_search(quantization: str, open_store: Callable[..., VectorIndex]) -> None:
    rng = np.random.default_rng(21)
    centres = unit(rng.normal(size=(40, 32)))
    vectors = unit(centres[rng.integers(0, 40, 4000)] + 0.6 * rng.normal(size=(4000, 32)) / np.sqrt(32))
    records = [TileRecord(f"img{i // 20}", "/s.svs", "A", Box(i % 20, 0, 1, 1), 0, None, i % 20, 20) for i in range(4000)]
    index = open_store("edge", indexing_threshold_kb=1, quantization=quantization, hnsw_ef=64)
    index.ensure("fake", 32)
    index.tile_store = None  # pixels are not what this measures
    for start in range(0, 4000, 500):
        index.upsert(records[start:start + 500], vectors[start:start + 500])
    index.optimize()
    qs = unit(centres[rng.integers(0, 40, 50)] + 0.6 * rng.normal(size=(50, 32)) / np.sqrt(32))
    exact = [[records[i].point_id for i in np.argsort(-(vectors @ q))[:10]] for q in qs]
    hits = [index.search(q, 10) for q in qs]
    assert recall_at_10([[h.point_id for h in hs] for hs in hits], exact) >= MIN_RECALL
    # rescoring (on by default) makes the returned scores the exact float cosines
    for q, hs in zip(qs, hits):
        by_id = {r.point_id: v for r, v in zip(records, vectors)}
        np.testing.assert_allclose([h.score for h in hs], [by_id[h.point_id] @ q for h in hs], atol=SCORE_ATOL)


@pytest.mark.parametrize(("build_filter", "message"), [
    (lambda: TileFilter.where(**{"label; drop": "A"}), "is not a payload key"),
    (lambda: TileFilter.where(label=[]), "has 0 values"),
    (lambda: TileFilter.where(label=["A", 1]), "mixes value types"),
    (lambda: TileFilter.where(level=[True, False]), "mixes value types"),
    (lambda: TileFilter.where(mpp=0.5), "unsupported one"),
    (lambda: TileFilter.where(image_id=[f"i{n}" for n in range(2000)]), "give 1 to 1024"),
    (lambda: TileFilter.where(source="x" * 5000), "the source of a filter value"),
    (lambda: TileFilter(tuple(FieldMatch(f"k{n}", "v") for n in range(40))), "at most 32 conditions"),
])
def test_a_filter_refuses_what_no_engine_can_match_the_same_way(build_filter: Callable[[], TileFilter], message: str) -> None:
    from histoxplain_model.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match=message) as refused:
        build_filter()
    assert "xxxxxxxx" not in str(refused.value)  # caller text is never repeated


def test_filters_compose_with_the_label_argument() -> None:
    keep = TileFilter.where(source="/a.svs").also(TileFilter(must_not=(FieldMatch("level", 1),)))
    combined = TileFilter.combine(keep, label="A")
    assert combined == TileFilter(
        (FieldMatch("source", ("/a.svs",)), FieldMatch("label", ("A",))), (FieldMatch("level", (1,)),)
    )
    assert TileFilter.combine(None) is None and TileFilter.combine(TileFilter()) is None
    assert TileFilter.from_mapping({"box.w": 224}).must == (FieldMatch("box.w", (224,)),)
