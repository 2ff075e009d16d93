"""The Qdrant index adapter on qdrant-client local mode (and on a real server when QDRANT_URL is set)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient
from qdrant_client import models as qm

from histoxplain_model.errors import FailedPrecondition, InvalidRequest, NotFound
from histoxplain_model.limits import MAX_INDEX_NAME_CHARS
from histoxplain_service.domain.ranking import rank_images
from histoxplain_service.domain.types import Box, TileRecord, point_id_for
from histoxplain_service.index.base import validate_index_name
from histoxplain_service.index.qdrant import QdrantEngine, QdrantIndex, open_qdrant
from histoxplain_service.config import Settings
from histoxplain_service.index.tile_store import TileStore

DIM = 6
_BACKENDS = ["local"] + (["server"] if os.environ.get("QDRANT_URL") else [])


@pytest.fixture(params=_BACKENDS)
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QdrantClient]:
    if request.param == "local":
        qdrant = QdrantClient(path=str(tmp_path / "qdrant"))
        yield qdrant
        qdrant.close()
        return
    qdrant = open_qdrant(Settings.from_env())  # the server named by QDRANT_URL / QDRANT_API_KEY
    before = {c.name for c in qdrant.get_collections().collections}
    yield qdrant
    for collection in qdrant.get_collections().collections:
        if collection.name not in before and collection.name.startswith("hxtest-"):
            qdrant.delete_collection(collection.name)
    qdrant.close()


@pytest.fixture
def index(client: QdrantClient, tmp_path: Path) -> QdrantIndex:
    name = f"hxtest-{uuid.uuid4().hex[:10]}"
    return QdrantIndex(client, name, TileStore(tmp_path / "tiles" / name))


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def make_records(image_id: str, n: int, label: str | None = "A", size: int = 8) -> list[TileRecord]:
    return [
        TileRecord(image_id, f"/data/{image_id}.png", label, Box(i * size, 0, size, size), 0, 0.5, i, n)
        for i in range(n)
    ]


def make_tiles(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]


def test_ensure_records_the_encoder_and_refuses_another(index: QdrantIndex) -> None:
    index.ensure("fake-preset", DIM)
    assert index.encoder() == ("fake-preset", DIM)
    index.ensure("fake-preset", DIM)  # same encoder: accepted, nothing recreated
    index.upsert(make_records("img", 2), unit(np.eye(DIM)[:2]), make_tiles(2, 0))
    for preset, dim in [("other-preset", DIM), ("fake-preset", DIM + 1)]:
        with pytest.raises(FailedPrecondition, match="was built with encoder 'fake-preset'"):
            index.ensure(preset, dim)
    assert index.describe().n_points == 2  # refusing never touches the data


def test_encoder_record_survives_reopening_the_folder(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    client = open_qdrant(settings)
    QdrantEngine(settings, client).open_index("crc").ensure("uni", 1024)
    client.close()
    client = open_qdrant(settings)
    try:
        info = QdrantEngine(settings, client).open_index("crc").describe()
        assert (info.name, info.preset, info.dim, info.n_points, info.n_images) == ("crc", "uni", 1024, 0, 0)
    finally:
        client.close()


def test_a_foreign_collection_is_refused_not_recreated(client: QdrantClient, tmp_path: Path) -> None:
    name = f"hxtest-{uuid.uuid4().hex[:10]}"
    client.create_collection(name, vectors_config=qm.VectorParams(size=DIM, distance=qm.Distance.COSINE))
    client.upsert(name, [qm.PointStruct(id=1, vector=[1.0] * DIM, payload={"x": 1})], wait=True)
    with pytest.raises(FailedPrecondition, match="not created by histoxplain"):
        QdrantIndex(client, name).ensure("fake", DIM)
    assert client.count(name, exact=True).count == 1
    assert name not in [info.name for info in QdrantEngine(Settings(data_dir=tmp_path), client).list_indexes()]


def test_point_ids_are_deterministic() -> None:
    box = Box(224, 448, 224, 224)
    assert point_id_for("abc", 0, box) == point_id_for("abc", 0, Box(224, 448, 224, 224))
    assert str(uuid.UUID(point_id_for("abc", 0, box))) == point_id_for("abc", 0, box)
    others = {point_id_for("abd", 0, box), point_id_for("abc", 1, box), point_id_for("abc", 0, Box(224, 448, 224, 223))}
    assert point_id_for("abc", 0, box) not in others and len(others) == 3


def test_upserting_the_same_tiles_again_updates_and_never_duplicates(index: QdrantIndex) -> None:
    index.ensure("fake", DIM)
    records = make_records("img", 3)
    index.upsert(records, unit(np.eye(DIM)[:3]), make_tiles(3, 0))
    index.upsert(records, unit(np.eye(DIM)[3:6]), make_tiles(3, 1))
    assert index.describe().n_points == 3
    np.testing.assert_allclose(index.points([r.point_id for r in records])[1], np.eye(DIM)[3:6], atol=1e-6)
    np.testing.assert_array_equal(index.load_tile(records[1].point_id), make_tiles(3, 1)[1])


def test_payload_round_trips_through_a_search_hit(index: QdrantIndex) -> None:
    index.ensure("fake", DIM)
    record = TileRecord("img", "/slides/a.svs", "tumour", Box(448, 224, 224, 224), 1, 0.998, 4, 9)
    index.upsert([record], unit(np.ones((1, DIM))), make_tiles(1, 0))
    (hit,) = index.search(unit(np.ones(DIM)), k=1)
    assert (hit.image_id, hit.source, hit.label, hit.box, hit.level, hit.mpp, hit.tile_index) == (
        "img", "/slides/a.svs", "tumour", Box(448, 224, 224, 224), 1, 0.998, 4,
    )
    assert hit.point_id == record.point_id
    assert hit.score == pytest.approx(1.0, abs=1e-5)


def test_search_ranks_by_cosine_and_filters_by_label(index: QdrantIndex) -> None:
    index.ensure("fake", DIM)
    vectors = unit(np.random.default_rng(0).normal(size=(12, DIM)))
    records = make_records("a", 6, label="A") + make_records("b", 6, label="B")
    index.upsert(records, vectors, make_tiles(12, 0))
    query = unit(np.random.default_rng(1).normal(size=DIM))
    cosine = vectors @ query
    hits = index.search(query, k=5)
    assert [h.point_id for h in hits] == [records[i].point_id for i in np.argsort(-cosine)[:5]]
    np.testing.assert_allclose([h.score for h in hits], np.sort(cosine)[::-1][:5], atol=1e-5)
    only_b = index.search(query, k=10, label="B")
    assert len(only_b) == 6 and {h.label for h in only_b} == {"B"}


def test_search_with_vectors_returns_each_hits_stored_vector(index: QdrantIndex) -> None:
    index.ensure("fake", DIM)
    vectors = unit(np.random.default_rng(3).normal(size=(8, DIM)))
    records = make_records("a", 4, label="A") + make_records("b", 4, label="B")
    index.upsert(records, vectors, make_tiles(8, 0))
    query = unit(np.random.default_rng(4).normal(size=DIM))
    hits, hit_vectors = index.search_with_vectors(query, k=5, label="A")
    assert [h.point_id for h in hits] == [h.point_id for h in index.search(query, k=5, label="A")]
    assert len(hits) == 4 and hit_vectors.shape == (4, DIM) and hit_vectors.dtype == np.float32
    by_id = {record.point_id: vector for record, vector in zip(records, vectors)}
    np.testing.assert_allclose(hit_vectors, np.stack([by_id[h.point_id] for h in hits]), atol=1e-6)
    np.testing.assert_allclose(hit_vectors @ query, [h.score for h in hits], atol=1e-5)


def test_the_request_deadline_reaches_qdrant(index: QdrantIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    index.ensure("fake", DIM)
    index.upsert(make_records("a", 2), unit(np.eye(DIM)[:2]), make_tiles(2, 0))
    seen: list[object] = []
    for method in ("query_points", "query_points_groups"):
        original = getattr(index.client, method)

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("timeout"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(index.client, method, spy)
    index.search(unit(np.eye(DIM)[0]), k=1, timeout=2.3)
    rank_images(index, unit(np.eye(DIM)[:1]), k=1, timeout=0.2)
    index.search(unit(np.eye(DIM)[0]), k=1)
    assert seen == [3, 1, None]


def test_search_images_averages_each_images_best_tile_over_query_tiles(index: QdrantIndex) -> None:
    index.ensure("fake", DIM)
    rng = np.random.default_rng(3)
    images = {f"img{i}": unit(rng.normal(size=(4, DIM))) for i in range(5)}
    for image_id, vectors in images.items():
        index.upsert(make_records(image_id, 4), vectors, make_tiles(4, 0))
    queries = unit(rng.normal(size=(3, DIM)))
    # the documented rule, computed by brute force
    expected = {
        image_id: float(np.mean([(vectors @ q).max() for q in queries])) for image_id, vectors in images.items()
    }
    ranking = sorted(expected, key=lambda i: -expected[i])
    hits = rank_images(index, queries, k=3)
    assert [h.image_id for h in hits] == ranking[:3]
    for hit in hits:
        assert hit.score == pytest.approx(expected[hit.image_id], abs=1e-5)
        assert len(hit.tiles) == 3
        for q, tile in zip(queries, hit.tiles):
            assert tile.image_id == hit.image_id
            assert tile.score == pytest.approx((images[hit.image_id] @ q).max(), abs=1e-5)
    # one query tile: the best tile per image, and k larger than the number of images
    single = rank_images(index, queries[0], k=10)
    assert len(single) == 5
    assert [h.image_id for h in single] == sorted(images, key=lambda i: -(images[i] @ queries[0]).max())


def test_missing_and_empty_indexes_say_to_run_index_first(index: QdrantIndex) -> None:
    with pytest.raises(NotFound, match="does not exist; index images into it first"):
        index.search(unit(np.ones(DIM)), k=1)
    with pytest.raises(NotFound, match="does not exist"):
        index.describe()
    index.ensure("fake", DIM)
    with pytest.raises(NotFound, match="is empty; index images into it first"):
        index.search(unit(np.ones(DIM)), k=1)
    with pytest.raises(NotFound, match="is empty"):
        rank_images(index, unit(np.ones((2, DIM))), k=1)


@pytest.mark.parametrize("k", [0, -3, 1.5, True])
def test_k_must_be_a_positive_integer(index: QdrantIndex, k: object) -> None:
    index.ensure("fake", DIM)
    index.upsert(make_records("img", 1), unit(np.ones((1, DIM))), make_tiles(1, 0))
    with pytest.raises(InvalidRequest, match="k must be a positive integer"):
        index.search(unit(np.ones(DIM)), k=k)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="k must be a positive integer"):
        rank_images(index, unit(np.ones((1, DIM))), k=k)  # type: ignore[arg-type]


def test_a_query_of_another_dimension_is_refused(index: QdrantIndex) -> None:
    index.ensure("fake", DIM)
    index.upsert(make_records("img", 1), unit(np.ones((1, DIM))), make_tiles(1, 0))
    with pytest.raises(FailedPrecondition, match="query vectors are 7-d"):
        index.search(unit(np.ones(DIM + 1)), k=1)


def test_delete_removes_points_and_tile_pixels(index: QdrantIndex) -> None:
    index.ensure("fake", DIM)
    a, b = make_records("a", 3), make_records("b", 2)
    index.upsert(a + b, unit(np.random.default_rng(0).normal(size=(5, DIM))), make_tiles(5, 0))
    assert index.delete(["a", "missing"]) == 3
    info = index.describe()
    assert (info.n_points, info.n_images) == (2, 1)
    assert index.image_ids() == ["b"]
    assert index.tile_store is not None
    assert not any(index.tile_store.has(r.point_id) for r in a)
    assert all(index.tile_store.has(r.point_id) for r in b)
    with pytest.raises(NotFound, match="no stored pixels") as missing:
        index.load_tile(a[0].point_id)
    assert str(index.tile_store.root) not in str(missing.value)  # no server path to the client
    assert index.delete([]) == 0


def test_finish_image_removes_an_older_tiling(index: QdrantIndex) -> None:
    index.ensure("fake", DIM)
    old = make_records("img", 4, size=8)
    index.upsert(old, unit(np.ones((4, DIM))), make_tiles(4, 0))
    new = make_records("img", 2, size=16)
    index.upsert(new, unit(np.ones((2, DIM))), make_tiles(2, 0))
    assert index.image_state(new) == "incomplete"  # old points still carry the image id
    removed = index.finish_image("img", [r.point_id for r in new])
    # old[0] has box (0,0,8,8), new[0] (0,0,16,16): all 4 old ids differ from the new ones
    assert removed == 4
    assert index.image_state(new) == "complete"
    records, vectors = index.image_tiles("img")
    assert [r.box for r in records] == [r.box for r in new] and vectors.shape == (2, DIM)


def test_image_state_sees_missing_points_pixels_and_changed_labels(index: QdrantIndex) -> None:
    index.ensure("fake", DIM)
    records = make_records("img", 3)
    assert index.image_state(records) == "incomplete"
    index.upsert(records[:2], unit(np.ones((2, DIM))), make_tiles(2, 0))
    assert index.image_state(records) == "incomplete"
    index.upsert(records[2:], unit(np.ones((1, DIM))), make_tiles(1, 0))
    assert index.image_state(records) == "complete"
    relabelled = make_records("img", 3, label="B")
    assert index.image_state(relabelled) == "metadata"
    index.set_image_metadata("img", "B", relabelled[0].source)
    assert index.image_state(relabelled) == "complete"
    assert index.tile_store is not None
    index.tile_store.path(records[1].point_id).unlink()
    assert index.image_state(relabelled) == "incomplete"


def test_tile_store_writes_atomically_and_round_trips(tmp_path: Path) -> None:
    store = TileStore(tmp_path / "tiles")
    tile = make_tiles(1, 7)[0]
    store.save("p1", tile)
    store.save("p1", tile[::-1].copy())
    np.testing.assert_array_equal(store.load("p1"), tile[::-1])
    assert sorted(p.name for p in (tmp_path / "tiles").iterdir()) == ["p1.png"]  # no temporary left
    with pytest.raises(ValueError, match="uint8"):
        store.save("p2", tile.astype(np.float32))
    assert store.delete(["p1", "p2"]) == 1


def test_vectors_and_image_tiles(index: QdrantIndex) -> None:
    index.ensure("fake", DIM)
    records = make_records("img", 3)
    vectors = unit(np.random.default_rng(2).normal(size=(3, DIM)))
    index.upsert(records[::-1], vectors[::-1], make_tiles(3, 0))
    got_records, got_vectors = index.image_tiles("img")
    assert got_records == records
    np.testing.assert_allclose(got_vectors, vectors, atol=1e-6)
    np.testing.assert_allclose(index.points([records[2].point_id, records[0].point_id])[1], vectors[[2, 0]], atol=1e-6)
    with pytest.raises(NotFound):
        index.points([point_id_for("nope", 0, Box(0, 0, 1, 1))])
    with pytest.raises(NotFound):
        index.image_tiles("nope")


def test_upsert_rejects_mismatched_or_invalid_vectors(index: QdrantIndex) -> None:
    index.ensure("fake", DIM)
    with pytest.raises(ValueError, match="one vector per record"):
        index.upsert(make_records("img", 2), unit(np.ones((3, DIM))), make_tiles(2, 0))
    with pytest.raises(ValueError, match="NaN"):
        index.upsert(make_records("img", 1), np.full((1, DIM), np.nan, np.float32), make_tiles(1, 0))
    with pytest.raises(FailedPrecondition, match=f"holds {DIM}-d"):
        index.upsert(make_records("img", 1), unit(np.ones((1, DIM + 2))), make_tiles(1, 0))
    assert index.describe().n_points == 0


@pytest.mark.parametrize("name", ["", "a b", "../etc", "x" * 65, "-lead", "naïve", "a/b"])
def test_invalid_index_names(name: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid index name"):
        validate_index_name(name)


def test_index_names_up_to_the_contract_limit_are_valid_and_long_ones_are_not_echoed() -> None:
    assert validate_index_name("x" * MAX_INDEX_NAME_CHARS) == "x" * MAX_INDEX_NAME_CHARS
    with pytest.raises(InvalidRequest) as caught:
        validate_index_name("y" * 10_000)
    message = str(caught.value)
    assert len(message) < 200 and "10,000 characters" in message and f"1-{MAX_INDEX_NAME_CHARS}" in message


def test_list_indexes(client: QdrantClient, tmp_path: Path) -> None:
    names = [f"hxtest-{uuid.uuid4().hex[:10]}" for _ in range(2)]
    for i, name in enumerate(names):
        QdrantIndex(client, name).ensure(f"preset{i}", DIM + i)
    listed = {info.name: (info.preset, info.dim) for info in QdrantEngine(Settings(data_dir=tmp_path), client).list_indexes()}
    assert listed[names[0]] == ("preset0", DIM) and listed[names[1]] == ("preset1", DIM + 1)


def test_a_locked_local_folder_names_the_holder(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from qdrant_client import QdrantClient; "
         f"c = QdrantClient(path={str(settings.qdrant_path)!r}); print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(FailedPrecondition) as excinfo:
            open_qdrant(settings)
        message = str(excinfo.value)
        assert f"pid {holder.pid}" in message and "QDRANT_URL" in message
        # neither the folder nor the holder's command line (its arguments may name patients)
        assert str(tmp_path) not in message and "QdrantClient" not in message
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    open_qdrant(settings).close()  # free again once the holder exits
