"""Collections for a Qdrant cluster and tile pixels that every gateway replica can read.

No Qdrant server runs here (``/work/shared/PLATFORM.md``), so what a server would receive is
checked on the wire: qdrant-client talks to a small HTTP endpoint that records each request and
answers as Qdrant's REST API does. Everything else runs on qdrant-client's local mode, which
accepts the cluster arguments, and on the real in-process model.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from qdrant_client import QdrantClient

from histoxplain_model.errors import InvalidRequest, NotFound
from histoxplain_service.backends.embedded import create_embedded_backend
from histoxplain_service.bootstrap import open_index_engine
from histoxplain_service.config import Settings
from histoxplain_service.domain.retrieval import Retrieval
from histoxplain_service.index.qdrant import QdrantEngine, QdrantIndex, open_qdrant
from histoxplain_service.index.qdrant_config import PIXELS_KEY

CLUSTER = {
    "shard_number": 3, "replication_factor": 2, "write_consistency_factor": 2, "hnsw_m": 32,
    "hnsw_ef_construct": 200, "hnsw_ef": 64, "quantization": "int8", "oversampling": 3.0,
    "vectors_on_disk": True, "payload_on_disk": True, "tile_pixels": "payload",
}


class RecordingQdrant(ThreadingHTTPServer):
    """Answers the REST calls of index creation and search as a Qdrant server would; keeps
    every request as (method, path, JSON body)."""

    def __init__(self, collection_info: dict[str, Any]) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.created = False
        self.collection_info = collection_info
        super().__init__(("127.0.0.1", 0), _Handler)

    def answer(self, method: str, path: str, body: Any) -> Any:
        self.requests.append((method, path, body))
        route = path.split("?")[0]
        if method == "GET" and route.endswith("/exists"):
            return {"exists": self.created}
        if method == "PUT" and re.fullmatch(r"/collections/[^/]+", route):
            self.created = True
            return True
        if method == "PUT" and route.endswith("/index"):
            return {"operation_id": 1, "status": "completed"}
        if method == "GET" and re.fullmatch(r"/collections/[^/]+", route):
            return self.collection_info
        if route.endswith("/points/count"):
            return {"count": 3}
        if route.endswith("/points/query"):
            return {"points": []}
        if route.endswith("/points/query/groups"):
            return {"groups": []}
        raise AssertionError(f"unexpected Qdrant call {method} {route}")


class _Handler(BaseHTTPRequestHandler):
    server: RecordingQdrant

    def _reply(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        result = json.dumps({"result": self.server.answer(method, self.path, body), "status": "ok", "time": 0.0})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(result)))
        self.end_headers()
        self.wfile.write(result.encode())

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        self._reply("GET")

    def do_PUT(self) -> None:  # noqa: N802
        self._reply("PUT")

    def do_POST(self) -> None:  # noqa: N802
        self._reply("POST")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- quiet in tests
        pass


@pytest.fixture
def recording_qdrant(tmp_path: Path) -> Iterator[RecordingQdrant]:
    # what GET /collections/<name> answers: a real collection's info, as local mode builds it
    local = QdrantClient(path=str(tmp_path / "info"))
    QdrantIndex(local, "cases", None).ensure("pixels", 8)
    info = local.get_collection("cases").model_dump(mode="json", exclude_none=True)
    local.close()
    server = RecordingQdrant(info)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_cluster_settings_reach_the_create_collection_request(recording_qdrant: RecordingQdrant, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, qdrant_url=f"http://127.0.0.1:{recording_qdrant.server_port}", **CLUSTER)
    client = open_qdrant(settings)
    try:
        QdrantEngine(settings, client).open_index("cases").ensure("pixels", 8)
    finally:
        client.close()
    (create,) = [body for method, path, body in recording_qdrant.requests
                 if method == "PUT" and path.split("?")[0] == "/collections/cases"]
    assert create["shard_number"] == 3 and create["replication_factor"] == 2
    assert create["write_consistency_factor"] == 2 and create["on_disk_payload"] is True
    assert create["vectors"] == {"size": 8, "distance": "Cosine", "on_disk": True}
    assert create["hnsw_config"]["m"] == 32 and create["hnsw_config"]["ef_construct"] == 200
    assert create["quantization_config"] == {"scalar": {"type": "int8", "quantile": 0.99, "always_ram": True}}
    assert create["metadata"] == {"histoxplain": {"preset": "pixels", "dim": 8, "schema": 1}}
    indexes = {body["field_name"]: body["field_schema"] for method, path, body in recording_qdrant.requests
               if path.split("?")[0] == "/collections/cases/index"}
    assert indexes == {"image_id": "keyword", "label": "keyword", "source": "keyword", "level": "integer"}


def test_server_searches_carry_the_search_settings_and_leave_pixels_out(
    recording_qdrant: RecordingQdrant, tmp_path: Path
) -> None:
    recording_qdrant.created = True
    settings = Settings(data_dir=tmp_path, qdrant_url=f"http://127.0.0.1:{recording_qdrant.server_port}", **CLUSTER)
    client = open_qdrant(settings)
    try:
        index = QdrantEngine(settings, client).open_index("cases")
        assert index.search(np.ones(8, dtype=np.float32), 5) == []
        assert index.best_tile_per_image(np.ones((1, 8), dtype=np.float32), 5) == [{}]
    finally:
        client.close()
    queries = [body for method, path, body in recording_qdrant.requests if "/points/query" in path]
    assert len(queries) == 2
    for query in queries:
        assert query["params"] == {"hnsw_ef": 64, "exact": False, "quantization": {"rescore": True, "oversampling": 3.0}}
        assert query["with_payload"] == {"exclude": [PIXELS_KEY]}


def test_local_mode_accepts_the_cluster_settings(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, index_engine="local", **CLUSTER)
    engine = open_index_engine(settings)
    try:
        index = engine.open_index("cases")
        index.ensure("pixels", 8)
        assert index.encoder() == ("pixels", 8)
        assert engine.list_indexes()[0].name == "cases"
    finally:
        engine.close()


def test_write_consistency_above_replication_and_payload_pixels_on_edge_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="HISTOXPLAIN_REPLICATION_FACTOR"):
        Settings(replication_factor=2, write_consistency_factor=3)
    with pytest.raises(InvalidRequest, match="HISTOXPLAIN_TILE_PIXELS=payload"):
        open_index_engine(Settings(data_dir=tmp_path, tile_pixels="payload"))
    assert not (tmp_path / "edge").exists()


def tissue_image(seed: int) -> np.ndarray:
    """A 224 x 448 pink, textured image: two tiles at the default tile size."""
    rng = np.random.default_rng(seed)
    base = np.array([200, 110, 170]) + rng.integers(-60, 60, (224, 448, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory):
    return create_embedded_backend(Settings(data_dir=tmp_path_factory.mktemp("model")))


def test_a_second_gateway_without_tile_folder_explains_hits(backend, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    originals = {}
    for seed in range(3):
        path = images / f"slide{seed}.png"
        Image.fromarray(tissue_image(seed)).save(path)
        originals[str(path)] = tissue_image(seed)
    # one Qdrant (local mode stands in for the cluster), two gateways with their own data folders
    store = Settings(data_dir=tmp_path / "store", index_engine="local")
    client = open_qdrant(store)
    try:
        first_settings = Settings(data_dir=tmp_path / "first", index_engine="local", tile_pixels="payload", min_tissue=0.0)
        second_settings = Settings(data_dir=tmp_path / "second", index_engine="local", tile_pixels="payload")
        first = Retrieval(first_settings, backend, QdrantEngine(first_settings, client))
        second = Retrieval(second_settings, backend, QdrantEngine(second_settings, client))
        summary = first.index_paths("cases", [images], show_progress=False)
        assert summary.tiles_indexed == 6
        assert not (tmp_path / "first" / "tiles").exists()  # the pixels went into the points

        query = tissue_image(1)[:, :224]
        explained = second.search_and_explain("cases", query, 3, "gradcam")
        assert not (tmp_path / "second").exists()
        top = explained.hits[0]
        assert top.hit is not None and top.hit.source.endswith("slide1.png") and top.hit.box.x == 0
        np.testing.assert_array_equal(top.image, query)  # lossless: the pixels that were embedded
        assert top.hit_heatmap is not None and np.isfinite(top.hit_heatmap).all() and top.hit_heatmap.max() > 0
        for hit in explained.hits:
            box = hit.hit.box
            np.testing.assert_array_equal(hit.image, originals[hit.hit.source][box.y:box.y + box.h, box.x:box.x + box.w])
        same = first.search_and_explain("cases", query, 3, "gradcam")
        for ours, theirs in zip(explained.hits, same.hits):
            np.testing.assert_array_equal(ours.hit_heatmap, theirs.hit_heatmap)

        # payloads read back for searches and records leave the pixels out
        index = second.index("cases")
        records, _ = index.points([top.hit.point_id])
        assert records[0].source == top.hit.source
        raw = client.scroll("cases", limit=10, with_payload=True)[0]
        assert all(PIXELS_KEY in point.payload for point in raw)
        assert all(PIXELS_KEY not in payload for payload, _ in index._image_points(top.hit.image_id))

        # a tile that lost its pixels makes its image incomplete: indexing again restores them
        assert first.index_paths("cases", [images], show_progress=False).tiles_indexed == 0
        client.delete_payload("cases", keys=[PIXELS_KEY], points=[top.hit.point_id])
        with pytest.raises(NotFound, match="no stored pixels"):
            index.load_tile(top.hit)
        assert first.index_paths("cases", [images], show_progress=False).tiles_indexed == 2
        np.testing.assert_array_equal(index.load_tile(top.hit), query)
    finally:
        client.close()


def test_the_cluster_settings_are_documented() -> None:
    from histoxplain_service import config

    guide = (Path(__file__).resolve().parents[3] / "docs" / "SERVING.md").read_text()
    names = [var.env for var in config._VARIABLES if var.field in {
        "tile_pixels", "shard_number", "replication_factor", "write_consistency_factor",
    }]
    assert len(names) == 4
    for variable in names:
        assert f"`{variable}`" in guide, variable
        assert f"``{variable}``" in (config.__doc__ or ""), variable
