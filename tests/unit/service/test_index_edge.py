"""The qdrant-edge adapter: the index contract of ``test_index.py`` on a real edge shard, and
what only the embedded engine has (its folder, its lock, persistence, HNSW and quantization
options, engine selection)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

# The engine-independent contract tests of test_index.py, collected again here where ``index``
# is an EdgeIndex: the same assertions hold on every engine.
from test_index import (  # noqa: F401
    DIM,
    make_records,
    make_tiles,
    test_a_query_of_another_dimension_is_refused,
    test_delete_removes_points_and_tile_pixels,
    test_ensure_records_the_encoder_and_refuses_another,
    test_finish_image_removes_an_older_tiling,
    test_image_state_sees_missing_points_pixels_and_changed_labels,
    test_k_must_be_a_positive_integer,
    test_missing_and_empty_indexes_say_to_run_index_first,
    test_payload_round_trips_through_a_search_hit,
    test_search_images_averages_each_images_best_tile_over_query_tiles,
    test_search_ranks_by_cosine_and_filters_by_label,
    test_search_with_vectors_returns_each_hits_stored_vector,
    test_upsert_rejects_mismatched_or_invalid_vectors,
    test_upserting_the_same_tiles_again_updates_and_never_duplicates,
    test_vectors_and_image_tiles,
    unit,
)

from histoxplain_model.errors import FailedPrecondition, InvalidRequest, NotFound
from histoxplain_service.bootstrap import open_index_engine
from histoxplain_service.config import Settings
from histoxplain_service.index.edge import EdgeEngine, EdgeIndex, EdgeOptions
from histoxplain_service.index.qdrant import QdrantEngine


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[EdgeEngine]:
    edge = EdgeEngine(Settings(data_dir=tmp_path))
    yield edge
    edge.close()


@pytest.fixture
def index(engine: EdgeEngine) -> EdgeIndex:
    return engine.open_index("hxtest-edge")


def test_an_index_survives_closing_and_reopening_the_store(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    engine = EdgeEngine(settings)
    index = engine.open_index("crc")
    index.ensure("uni", DIM)
    vectors = unit(np.random.default_rng(0).normal(size=(3, DIM)))
    index.upsert(make_records("img", 3), vectors, make_tiles(3, 0))
    engine.close()
    with pytest.raises(Exception, match="closed"):
        index.describe()
    engine = EdgeEngine(settings)
    try:
        info = engine.open_index("crc").describe()
        assert (info.name, info.preset, info.dim, info.n_points, info.n_images) == ("crc", "uni", DIM, 3, 1)
        assert [i.name for i in engine.list_indexes()] == ["crc"]
        np.testing.assert_allclose(engine.open_index("crc").image_tiles("img")[1], vectors, atol=1e-6)
    finally:
        engine.close()
    record = json.loads((tmp_path / "edge" / "crc" / "index.json").read_text())
    assert record == {"histoxplain": {"preset": "uni", "dim": DIM, "schema": 1}}


def test_points_written_without_a_clean_close_are_kept(tmp_path: Path) -> None:
    """The write-ahead log: a process killed after upsert returned loses nothing."""
    script = (
        "import os, numpy as np\n"
        "from histoxplain_service.config import Settings\n"
        "from histoxplain_service.index.edge import EdgeEngine\n"
        "from test_index import make_records, make_tiles, unit\n"
        f"index = EdgeEngine(Settings(data_dir={str(tmp_path)!r})).open_index('crc')\n"
        f"index.ensure('uni', {DIM})\n"
        f"index.upsert(make_records('img', 4), unit(np.ones((4, {DIM}))), make_tiles(4, 0))\n"
        "os._exit(0)\n"  # no close, no flush
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parent, timeout=60)
    engine = EdgeEngine(Settings(data_dir=tmp_path))
    try:
        assert engine.open_index("crc").describe().n_points == 4
    finally:
        engine.close()


def test_a_held_store_names_the_holder_and_frees_when_it_exits(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from histoxplain_service.config import Settings; "
         "from histoxplain_service.index.edge import EdgeEngine; "
         f"e = EdgeEngine(Settings(data_dir={str(tmp_path)!r})); print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(FailedPrecondition) as held:
            EdgeEngine(settings)
        message = str(held.value)
        assert f"pid {holder.pid}" in message and "QDRANT_URL" in message and str(tmp_path) not in message
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    EdgeEngine(settings).close()


def test_a_local_mode_index_is_pointed_to_migration_not_shadowed(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, index_engine="local")
    local = open_index_engine(settings)
    local.open_index("old").ensure("uni", DIM)
    local.close()
    engine = EdgeEngine(settings)
    try:
        old = engine.open_index("old")
        with pytest.raises(NotFound, match="histoxplain migrate --index old"):
            old.search(unit(np.ones(DIM)), k=1)
        with pytest.raises(FailedPrecondition, match="histoxplain migrate --index old"):
            old.ensure("uni", DIM)  # a second, empty index of that name would hide the old one
        assert not (tmp_path / "edge" / "old").exists()
    finally:
        engine.close()


def test_the_engine_is_chosen_by_settings(tmp_path: Path) -> None:
    edge = open_index_engine(Settings(data_dir=tmp_path))
    try:
        assert isinstance(edge, EdgeEngine) and edge.ready()
    finally:
        edge.close()
    local = open_index_engine(Settings(data_dir=tmp_path, index_engine="local"))
    try:
        assert isinstance(local, QdrantEngine)
    finally:
        local.close()
    with pytest.raises(InvalidRequest, match="HISTOXPLAIN_INDEX_ENGINE"):
        Settings.from_env({"HISTOXPLAIN_INDEX_ENGINE": "faiss"})


def test_index_options_come_from_settings_and_shape_new_shards(tmp_path: Path) -> None:
    settings = Settings.from_env({
        "HISTOXPLAIN_DATA": str(tmp_path), "HISTOXPLAIN_HNSW_M": "24", "HISTOXPLAIN_HNSW_EF_CONSTRUCT": "200",
        "HISTOXPLAIN_HNSW_EF": "64", "HISTOXPLAIN_QUANTIZATION": "int8", "HISTOXPLAIN_VECTORS_ON_DISK": "1",
        "HISTOXPLAIN_PAYLOAD_ON_DISK": "0", "HISTOXPLAIN_OVERSAMPLING": "3", "HISTOXPLAIN_RESCORE": "yes",
    })
    options = EdgeOptions.from_settings(settings)
    assert (options.hnsw_m, options.hnsw_ef_construct, options.hnsw_ef, options.quantization) == (24, 200, 64, "int8")
    engine = EdgeEngine(settings)
    try:
        engine.open_index("q8").ensure("uni", DIM)
    finally:
        engine.close()
    config = json.loads((tmp_path / "edge" / "q8" / "shard" / "edge_config.json").read_text())
    assert config["hnsw_config"]["m"] == 24 and config["hnsw_config"]["ef_construct"] == 200
    assert config["quantization_config"]["scalar"]["type"] == "int8"
    assert config["vectors"][""]["memory"] == "cold" and config["payload_memory"] == "cached"
    for variable, value in [("HISTOXPLAIN_HNSW_M", "2"), ("HISTOXPLAIN_QUANTIZATION", "pq"),
                            ("HISTOXPLAIN_OVERSAMPLING", "0.5"), ("HISTOXPLAIN_EXACT_SEARCH", "maybe")]:
        with pytest.raises(InvalidRequest, match=variable):
            Settings.from_env({variable: value})


def test_an_interrupted_creation_is_reused_not_refused(engine: EdgeEngine) -> None:
    from histoxplain_service.index.edge_store import create_shard

    create_shard(engine.root / "half" / "shard", engine.options, DIM).close()  # no encoder record yet
    index = engine.open_index("half")
    assert not index.exists()
    index.ensure("uni", DIM)
    index.upsert(make_records("img", 2), unit(np.eye(DIM)[:2]), make_tiles(2, 0))
    assert index.describe().n_points == 2


def test_optimize_builds_the_hnsw_graph_and_search_stays_exact_enough(tmp_path: Path) -> None:
    options = EdgeOptions(indexing_threshold_kb=1, hnsw_ef=64)  # a graph over a few hundred points
    engine = EdgeEngine(Settings(data_dir=tmp_path), options)
    try:
        index = engine.open_index("graph")
        index.ensure("uni", 16)
        rng = np.random.default_rng(5)
        vectors = unit(rng.normal(size=(400, 16)))
        records = [r for i in range(40) for r in make_records(f"img{i}", 10)]
        index.upsert(records, vectors, None if index.tile_store is None else make_tiles(400, 1))
        shard = engine.shard("graph")
        assert shard is not None and shard.info().indexed_vectors_count == 0
        index.optimize()
        assert shard.info().indexed_vectors_count == 400
        queries = unit(rng.normal(size=(20, 16)))
        recall = np.mean([
            len({h.point_id for h in index.search(q, 10)} & {records[i].point_id for i in np.argsort(-(vectors @ q))[:10]}) / 10
            for q in queries
        ])
        assert recall >= 0.95
    finally:
        engine.close()


def test_opening_the_store_points_to_indexes_still_in_local_mode(tmp_path: Path, caplog) -> None:
    local = open_index_engine(Settings(data_dir=tmp_path, index_engine="local"))
    local.open_index("old").ensure("uni", DIM)
    local.close()
    with caplog.at_level("WARNING", logger="histoxplain_service.index.edge"):
        EdgeEngine(Settings(data_dir=tmp_path)).close()
    assert "1 index(es) of the local-mode store" in caplog.text and "histoxplain migrate" in caplog.text


def test_every_index_setting_is_documented() -> None:
    from histoxplain_service import config

    guide = (Path(__file__).resolve().parents[3] / "docs" / "SERVING.md").read_text()
    index_variables = [var.env for var in config._VARIABLES if var.field in {
        "index_engine", "hnsw_m", "hnsw_ef_construct", "hnsw_ef", "exact_search", "quantization", "rescore",
        "oversampling", "vectors_on_disk", "payload_on_disk",
    }]
    assert len(index_variables) == 10
    for variable in index_variables:
        assert f"`{variable}`" in guide, variable
        assert f"``{variable}``" in (config.__doc__ or ""), variable
