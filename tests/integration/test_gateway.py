"""The gateway on a free loopback port with real components: SDK round trips for every RPC with
the embedded backend and with TorchServe, every error class as its status code, and health
while TorchServe starts and stops. Qdrant runs in local mode in a temporary folder."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

import histoxplain_client as hc  # noqa: E402
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb  # noqa: E402
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2_grpc as pb_grpc  # noqa: E402
from histoxplain_service.config import GatewaySettings  # noqa: E402
from histoxplain_service.bootstrap import open_index_engine  # noqa: E402
from histoxplain_service.gateway.server import Gateway  # noqa: E402
from histoxplain_service.config import Settings  # noqa: E402

pytestmark = pytest.mark.integration

SERVICE = "histoxplain.v1.RetrievalService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
INPUT = 224  # efficientnet-lite0 input size: heatmap arrays are (224, 224)


class GatewayThread:
    """A :class:`Gateway` on port 0 served by an event loop in a background thread, so that the
    synchronous SDK can call it from the test."""

    def __init__(self, settings: GatewaySettings, backend: Any, qdrant: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.gateway = self._call(self._make(settings, backend, qdrant))
        self._call(self.gateway.start())
        self.target = f"127.0.0.1:{self.gateway.port}"

    @staticmethod
    async def _make(settings: GatewaySettings, backend: Any, qdrant: Any) -> Gateway:
        return Gateway(settings, backend, qdrant)

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(60)

    def health(self, service: str = SERVICE) -> int:
        with grpc.insecure_channel(self.target) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

    def wait_health(self, wanted: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while (status := self.health()) != wanted:
            assert time.monotonic() < deadline, f"health stayed {status}, wanted {wanted}"
            time.sleep(0.1)

    def stop(self) -> None:
        self._call(self.gateway.stop(1.0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiles() -> dict[str, bytes]:
    """Six 224x224 crops (one tile each, no padding) of the scikit-image IHC colon image (real
    histology, 512x512), as PNG."""
    from skimage import data

    ihc = data.immunohistochemistry()
    crops = {}
    for row, y in enumerate((0, 288)):
        for col, x in enumerate((0, 144, 288)):
            crops[f"ihc-{row}-{col}"] = _png(np.ascontiguousarray(ihc[y : y + INPUT, x : x + INPUT]))
    return crops


def _settings(data_dir: Path, **changes: Any) -> GatewaySettings:
    core = Settings(data_dir=data_dir, tile_size=INPUT, min_tissue=0.0)
    values: dict[str, Any] = {"port": 0, "backend": "embedded", "health_interval_s": 0.2, "grace_period_s": 1.0}
    values.update(changes)
    return GatewaySettings(core=core, **values)


@pytest.fixture(scope="module")
def embedded_backend() -> Iterator[Any]:
    from histoxplain_model.encoders import load_encoder

    from histoxplain_service.backends.embedded import EmbeddedBackend

    backend = EmbeddedBackend(load_encoder("efficientnet-lite0-imagenet"))
    yield backend
    backend.close()


@dataclass
class Running:
    gateway: GatewayThread
    client: hc.Client


def _start(data_dir: Path, model_backend: Any, **changes: Any) -> tuple[GatewayThread, Any]:
    settings = _settings(data_dir, **changes)
    qdrant = open_index_engine(settings.core)
    return GatewayThread(settings, model_backend, qdrant), qdrant


@pytest.fixture(scope="module")
def embedded(embedded_backend: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    gateway, qdrant = _start(tmp_path_factory.mktemp("gateway-embedded"), embedded_backend, max_message_bytes=2 * 1024 * 1024)
    client = hc.Client(gateway.target, timeout=120, retry=hc.NO_RETRY)
    try:
        gateway.wait_health(SERVING)
        yield Running(gateway, client)
    finally:
        client.close()
        gateway.stop()
        qdrant.close()


def _round_trip_every_rpc(client: hc.Client, tiles: dict[str, bytes], backend_name: str) -> None:
    info = client.info()
    assert info.backend == backend_name and info.input_size == (INPUT, INPUT)

    images = [hc.IndexImage(data, image_id=name, label="ihc", source=name) for name, data in tiles.items()]
    images.append(hc.IndexImage(b"not an image", image_id="broken", source="broken"))
    summary = client.index_images("roundtrip", images)
    assert summary.images_received == len(tiles) + 1
    assert summary.images_indexed == len(tiles)
    assert [(s.position, s.image_id, s.reason) for s in summary.skipped] == [(len(tiles), "broken", "unreadable_image")]
    assert "PNG, JPEG or TIFF" in summary.skipped[0].message
    described = client.describe_index("roundtrip")
    assert (described.image_count, described.tile_count) == (len(tiles), len(tiles))
    assert "roundtrip" in {info.name for info in client.list_indexes()}

    query = tiles["ihc-0-1"]
    hits = client.search("roundtrip", query, k=3)
    assert len(hits) == 3 and hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert hits[0].source == "ihc-0-1" and hits[0].label == "ihc"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    image_hits = client.search("roundtrip", query, k=2, ranking="image")
    assert image_hits[0].image_id == hits[0].image_id

    explained = client.search_and_explain("roundtrip", query, k=3, method="gradcam")
    assert len(explained.references) == 3
    for reference in explained.references:
        assert reference.query_heatmap.values.shape == (INPUT, INPUT)
        assert reference.reference_heatmap.values.shape == (INPUT, INPUT)
        values = reference.query_heatmap.values
        assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1
        with Image.open(io.BytesIO(reference.query_heatmap.overlay_png)) as overlay:
            assert overlay.size == (INPUT, INPUT)  # drawn at the query's own size
    assert explained.references[0].hit.image_id == hits[0].image_id

    by_ids = client.explain(query, index="roundtrip", image_ids=[hits[1].image_id], point_ids=[hits[2].point_id], side="query")
    assert len(by_ids.references) == 2
    assert by_ids.references[0].reference_heatmap is None and by_ids.references[0].query_heatmap is not None
    assert {r.hit.point_id for r in by_ids.references} == {hits[1].point_id, hits[2].point_id}

    inline = client.explain(query, references=[tiles["ihc-1-2"], query], k=1, side="retrieved", heatmap_dtype="float32")
    assert len(inline.references) == 1
    assert inline.references[0].reference_index == 1  # the query itself is the most similar
    assert inline.references[0].similarity == pytest.approx(1.0, abs=1e-3)
    assert inline.references[0].hit is None

    deleted = client.delete("roundtrip", [hits[0].image_id, "never-indexed"])
    assert deleted.images_deleted == 1 and deleted.tiles_deleted == 1
    assert deleted.missing_image_ids == ("never-indexed",)
    assert hits[0].image_id not in {h.image_id for h in client.search("roundtrip", query, k=5)}


def test_every_rpc_round_trips_with_the_embedded_backend(embedded: Running, tiles: dict[str, bytes]) -> None:
    _round_trip_every_rpc(embedded.client, tiles, "embedded")


def test_a_filtered_search_returns_only_tiles_with_the_wanted_label(embedded: Running, tiles: dict[str, bytes]) -> None:
    client = embedded.client
    names = sorted(tiles)
    client.index_images(
        "filtered", [hc.IndexImage(tiles[name], image_id=name, label="TUM" if i % 2 else "STR") for i, name in enumerate(names)]
    )
    query = tiles[names[0]]
    unfiltered = client.search("filtered", query, k=6)
    assert {hit.label for hit in unfiltered} == {"TUM", "STR"}
    filtered = client.search("filtered", query, k=6, filter={"label": "TUM"})
    assert len(filtered) == 3 and {hit.label for hit in filtered} == {"TUM"}
    images = client.search("filtered", query, k=6, ranking="image", filter={"label": ["TUM"]})
    assert images and {hit.label for hit in images} == {"TUM"}
    explained = client.search_and_explain("filtered", query, k=2, method="simmap", filter={"label": "TUM"})
    assert [ref.hit.label for ref in explained.references] == ["TUM", "TUM"]
    with pytest.raises(hc.InvalidArgument, match="filter.conditions"):
        client.search("filtered", query, k=3, filter={"level": "PATIENT"})


def test_matched_regions_and_the_projection_target_through_the_gateway(embedded: Running, tiles: dict[str, bytes]) -> None:
    client = embedded.client
    from skimage import data

    ihc = data.immunohistochemistry()
    query = _png(np.ascontiguousarray(ihc[:300, :200]))  # non-square: boxes in its own 200x300 px
    references = [tiles["ihc-0-1"], tiles["ihc-1-2"]]
    explained = client.explain(query, references=references, method="gradcam", target="projection", correspondences=4)
    assert explained.references and all(1 <= len(ref.correspondences) <= 4 for ref in explained.references)
    for ref in explained.references:
        assert [pair.rank for pair in ref.correspondences] == list(range(1, len(ref.correspondences) + 1))
        for pair in ref.correspondences:
            q, r = pair.query_box, pair.reference_box
            assert q.x + q.width <= 200 and q.y + q.height <= 300 and r.x + r.width <= INPUT and r.y + r.height <= INPUT
    plain = client.explain(query, references=references, method="gradcam")
    assert all(ref.correspondences == () for ref in plain.references)
    np.testing.assert_allclose(explained.scores, plain.scores, atol=1e-6)  # the scores stay the cosine
    assert not np.allclose(explained.query_heatmaps, plain.query_heatmaps, atol=0.05)  # another target, another map
    with pytest.raises(hc.InvalidArgument, match="correspondences=17 is out of range"):
        client.explain(query, references=references, method="gradcam", correspondences=17)


def test_verify_through_the_gateway_gives_each_maps_faithfulness(embedded: Running, tiles: dict[str, bytes]) -> None:
    references = [tiles["ihc-0-1"], tiles["ihc-1-2"]]
    explained = embedded.client.explain(tiles["ihc-0-0"], references=references, method="gradcam", verify=True)
    for reference in explained.references:
        verified = reference.faithfulness
        assert verified.steps == 8 and verified.query is not None and verified.reference is not None
        for curves in (verified.query, verified.reference):
            assert 0.0 < curves.deletion_auc < 1.0 and 0.0 < curves.random_insertion_auc < 1.0
            assert curves.deletion_difference == pytest.approx(curves.deletion_auc - curves.random_deletion_auc)
    assert all(ref.faithfulness is None for ref in embedded.client.explain(tiles["ihc-0-0"], references=references).references)


@pytest.fixture(scope="module")
def errors_index(embedded: Running, tiles: dict[str, bytes]) -> str:
    embedded.client.index_images("errors", [hc.IndexImage(tiles["ihc-0-0"], image_id="a")])
    return "errors"


@pytest.mark.parametrize(
    ("case", "error_class"),
    [
        ("malformed image", hc.InvalidArgument),
        ("empty request", hc.InvalidArgument),
        ("empty index stream", hc.InvalidArgument),
        ("unknown index", hc.NotFound),
        ("unknown method", hc.InvalidArgument),
        ("k zero", hc.InvalidArgument),
        ("k too large", hc.InvalidArgument),
        ("oversized message", hc.ResourceExhausted),
        ("missed deadline", hc.DeadlineExceeded),
        ("smoothgrad samples out of range", hc.InvalidArgument),
    ],
)
def test_error_reaches_the_client_as_its_status(
    embedded: Running, errors_index: str, tiles: dict[str, bytes], case: str, error_class: type[hc.ApiError]
) -> None:
    client, query = embedded.client, tiles["ihc-0-0"]
    stub = pb_grpc.RetrievalServiceStub(grpc.insecure_channel(embedded.gateway.target))
    calls = {
        "malformed image": lambda: client.search(errors_index, b"\x89PNG\r\n\x1a\n truncated", k=1),
        "empty request": lambda: stub.Search(pb.SearchRequest(), timeout=30),
        "empty index stream": lambda: stub.IndexImages(iter(()), timeout=30),
        "unknown index": lambda: client.search("no-such-index", query, k=1),
        "unknown method": lambda: stub.SearchAndExplain(
            pb.SearchAndExplainRequest(index=errors_index, image=query, k=1, options={"method": 99}), timeout=30
        ),
        "k zero": lambda: stub.Search(pb.SearchRequest(index=errors_index, image=query, k=0), timeout=30),
        "k too large": lambda: client.search_and_explain(errors_index, query, k=101),
        "oversized message": lambda: client.search(errors_index, os.urandom(3 * 1024 * 1024), k=1),
        "missed deadline": lambda: client.search_and_explain(errors_index, query, k=1, method="smoothgrad", timeout=0.05),
        "smoothgrad samples out of range": lambda: client.search_and_explain(
            errors_index, query, k=1, method="smoothgrad", smoothgrad_samples=100000
        ),
    }
    try:
        calls[case]()
    except grpc.RpcError as error:  # raw stub calls
        raised: Exception = hc.errors.from_rpc_error(error)
    except hc.ApiError as error:
        raised = error
    else:
        pytest.fail(f"{case}: no error")
    assert isinstance(raised, error_class), f"{case}: {raised!r}"
    assert raised.details, f"{case}: no message"


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def test_smoothgrad_samples_and_noise_are_honoured(
    embedded: Running, embedded_backend: Any, tiles: dict[str, bytes]
) -> None:
    """smoothgrad_samples=3 gives the library's n=3 map (not the default n=25 one); the noise
    reaches the model too; out-of-range values are INVALID_ARGUMENT with the allowed range."""
    from histoxplain_model.explain import explain_retrieval
    from histoxplain_model.options import SmoothGradOptions
    from histoxplain_model.requests import ExplainRequest

    query_png, reference_png = tiles["ihc-0-1"], tiles["ihc-1-2"]
    query, reference = _pixels(query_png), _pixels(reference_png)

    def served(**options: Any) -> np.ndarray:
        explained = embedded.client.explain(
            query_png, references=[reference_png], method="smoothgrad", side="query", heatmap_dtype="float32", **options
        )
        return explained.query_heatmaps[0]

    def in_process(options: SmoothGradOptions | None) -> np.ndarray:
        return explain_retrieval(
            embedded_backend.encoder, ExplainRequest(query, [reference], "smoothgrad", side="query", options=options)
        ).query_heatmaps[0]

    three = served(smoothgrad_samples=3)
    np.testing.assert_allclose(three, in_process(SmoothGradOptions(n_samples=3)), atol=1e-5)
    assert np.abs(three - in_process(None)).max() > 0.05, "smoothgrad_samples=3 gave the default map"
    # float32 on the wire: 0.3 arrives as 0.30000001192092896, and the gateway uses exactly that.
    noisy = served(smoothgrad_samples=3, smoothgrad_noise=0.3)
    np.testing.assert_allclose(noisy, in_process(SmoothGradOptions(n_samples=3, sigma=float(np.float32(0.3)))), atol=1e-5)
    assert np.abs(noisy - three).max() > 0.05, "smoothgrad_noise had no effect"

    with pytest.raises(hc.InvalidArgument, match="smoothgrad_samples=100000 is out of range; use 1 to 256"):
        served(smoothgrad_samples=100000)
    with pytest.raises(hc.InvalidArgument, match=r"smoothgrad_noise=.* use a number in \(0, 1\]"):
        served(smoothgrad_noise=1.5)


def test_rise_options_are_honoured(embedded: Running, embedded_backend: Any, tiles: dict[str, bytes]) -> None:
    """RiseOptions from the SDK give the library's map with those options (the gateway's backend
    runs the masked images through ONNX Runtime, the library call here through torch); out of
    range: INVALID_ARGUMENT naming the field."""
    from histoxplain_model.explain import explain_retrieval
    from histoxplain_model.options import RiseOptions
    from histoxplain_model.requests import ExplainRequest

    query_png, reference_png = tiles["ihc-0-1"], tiles["ihc-1-2"]

    def served(rise: hc.RiseOptions) -> np.ndarray:
        explained = embedded.client.explain(
            query_png, references=[reference_png], method="rise", side="query", heatmap_dtype="float32", rise=rise
        )
        assert explained.method == "rise"
        return explained.query_heatmaps[0]

    options = RiseOptions(n_masks=16, grid=5, fill="mean", seed=2)
    in_process = explain_retrieval(
        embedded_backend.encoder,
        ExplainRequest(_pixels(query_png), [_pixels(reference_png)], "rise", side="query", options=options),
    ).query_heatmaps[0]
    chosen = served(hc.RiseOptions(masks=16, grid=5, fill="mean", seed=2))
    np.testing.assert_allclose(chosen, in_process, atol=5e-3)
    assert np.abs(served(hc.RiseOptions(masks=16, grid=5, fill="mean", seed=3)) - chosen).max() > 0.05
    with pytest.raises(hc.InvalidArgument, match=r"n_masks \(RISE masks\) must be an integer from 1 to 2000"):
        served(hc.RiseOptions(masks=5000))
    with pytest.raises(hc.InvalidArgument, match=r"keep_probability \(RISE\)"):
        served(hc.RiseOptions(masks=4, keep_probability=1.0))


# -- TorchServe --------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_rpc_round_trips_with_the_torchserve_backend(torchserve: Any, tiles: dict[str, bytes], tmp_path: Path) -> None:
    from histoxplain_service.backends.torchserve.backend import TorchServeBackend

    backend = TorchServeBackend(torchserve.backend_config)
    gateway, qdrant = _start(tmp_path, backend, backend="torchserve")
    try:
        gateway.wait_health(SERVING)
        with hc.Client(gateway.target, timeout=120, retry=hc.NO_RETRY) as client:
            _round_trip_every_rpc(client, tiles, "torchserve")
    finally:
        gateway.stop()
        qdrant.close()
        backend.close()


@pytest.mark.slow
def test_health_follows_torchserve_starting_and_stopping(
    torchserve_model_store: Path, tiles: dict[str, bytes], tmp_path: Path
) -> None:
    from histoxplain_service.backends.torchserve.backend import TorchServeBackend, TorchServeConfig
    from histoxplain_service.backends.torchserve.process import TorchServeProcess

    process = TorchServeProcess(torchserve_model_store, tmp_path / "ts")
    backend = TorchServeBackend(TorchServeConfig(target=process.grpc_target, model_name="histoxplain", key_file=process.key_file))
    gateway, qdrant = _start(tmp_path / "data", backend, backend="torchserve")
    try:
        assert gateway.health() == NOT_SERVING  # TorchServe not started yet
        assert gateway.health("liveness") == SERVING
        with hc.Client(gateway.target, timeout=30, retry=hc.NO_RETRY) as client:
            with pytest.raises(hc.Unavailable):
                client.info()
            process.start()
            try:
                process.register_model("histoxplain.mar", "histoxplain", batch_size=1)
                gateway.wait_health(SERVING)
                assert client.info().backend == "torchserve"
                client.index_images("health", [hc.IndexImage(tiles["ihc-0-0"], image_id="a")])
            finally:
                process.stop()
            gateway.wait_health(NOT_SERVING)
            with pytest.raises(hc.Unavailable) as caught:
                client.search_and_explain("health", tiles["ihc-0-1"], k=1)
            assert caught.value.details
            assert gateway.health("liveness") == SERVING
    finally:
        if process.running:
            process.stop()
        gateway.stop()
        qdrant.close()
        backend.close()
