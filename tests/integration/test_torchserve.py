"""TorchServe side: the handler, its wire envelope, and the congruence of the two backends.

One TorchServe (fixture ``torchserve`` in conftest.py) serves the real efficientnet-lite0
weights with batching on (batch size 4, max batch delay 50 ms) and token authorization on.
Congruence: TorchServe and the in-process EmbeddedBackend give
  - embeddings with cosine >= 0.9999 per image (batch composition changes float rounding);
  - scores within SCORE_ATOL; GradCAM/GradCAM++/simmap maps within CAM_ATOL (they travel as raw
    float32 maps on the target layer's grid, finished with numpy) and SmoothGrad maps within HEATMAP_ATOL (they travel as
    float16, which alone moves a value by <= 2.4e-4); max abs differences, maps in [0, 1].
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType, SimpleNamespace

import grpc
import numpy as np
import pytest
import torch

from histoxplain_model import errors
from histoxplain_model.wire.envelope import decode_envelope, encode_request_image
from histoxplain_model.wire.cams import finish_cams
from histoxplain_model.options import RiseOptions, SmoothGradOptions
from histoxplain_model.requests import ExplainRequest
from histoxplain_model.wire.inputs import encode_float32
from histoxplain_model.wire.outputs import decode_explanation
from histoxplain_service.backends.torchserve.backend import TorchServeBackend, TorchServeConfig
from histoxplain_service.backends.torchserve.mar import stage_weights
from histoxplain_service.backends.torchserve.process import TorchServeProcess

torch.set_num_threads(1)

PRESET = "efficientnet-lite0-imagenet"
SCORE_ATOL = 1e-4
HEATMAP_ATOL = 5e-4  # SmoothGrad travels as float16: measured 2.44e-4, the float16 rounding alone
CAM_ATOL = 1e-5  # GradCAM(++) travel as raw float32 CAMs, finished with numpy: float32 rounding only


def _load_handler_module() -> ModuleType:
    return importlib.import_module("retrieval_handler")


@pytest.fixture(scope="module")
def handler_module() -> ModuleType:
    return _load_handler_module()


@pytest.fixture(scope="module")
def encoder():
    from histoxplain_model.encoders import load_encoder

    return load_encoder(PRESET)


@pytest.fixture(scope="module")
def embedded(encoder):
    from histoxplain_service.backends.embedded import EmbeddedBackend

    return EmbeddedBackend(encoder)


@pytest.fixture(scope="module")
def tiles() -> list[np.ndarray]:
    """Real IHC histology (scikit-image), cut into tiles of different sizes."""
    from skimage import data

    ihc = data.immunohistochemistry()  # (512, 512, 3) uint8
    boxes = [(0, 0, 224, 224), (256, 256, 224, 224), (40, 300, 200, 180), (300, 10, 160, 256), (150, 150, 300, 300)]
    return [np.ascontiguousarray(ihc[y : y + h, x : x + w]) for y, x, h, w in boxes]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_torchserve_config_is_loopback_only_with_token_auth(tmp_path) -> None:
    from histoxplain_service.backends.torchserve.process import DEFAULT_TS_CONFIG, TorchServePorts, _config_text

    ports = TorchServePorts.free()
    lines = dict(
        line.split("=", 1)
        for line in _config_text(DEFAULT_TS_CONFIG, ports).splitlines()
        if "=" in line and not line.startswith("#")
    )
    for key in ("inference_address", "management_address", "metrics_address"):
        assert lines[key].startswith("http://127.0.0.1:"), key
    assert lines["grpc_inference_address"] == lines["grpc_management_address"] == "127.0.0.1"
    assert int(lines["grpc_inference_port"]) == ports.grpc_inference
    assert lines["management_address"].endswith(f":{ports.management}")
    assert lines["disable_token_authorization"] == "false"
    assert lines["decode_input_request"] == "false"
    assert len(set(ports.__dict__.values())) == 5


# -- the handler in-process: one bad request in a batch fails only itself ----------------------


@pytest.fixture(scope="module")
def handler(handler_module, tmp_path_factory, encoder):
    """The real handler class, initialised from a model dir laid out like the .mar's."""
    model_dir = tmp_path_factory.mktemp("model-dir")
    weights_name = stage_weights(PRESET, None, model_dir)
    (model_dir / "setup_config.json").write_text(f'{{"preset": "{PRESET}", "weights": "{weights_name}"}}')
    instance = handler_module.RetrievalHandler()
    context = SimpleNamespace(system_properties={"model_dir": str(model_dir)}, manifest={"model": {}}, metrics=None)
    instance.initialize(context)
    return instance, context


def test_handler_batch_isolates_a_bad_request(handler, tiles, embedded) -> None:
    instance, context = handler
    # Both image forms: encoded files (what a direct TorchServe user sends) and pixel envelopes.
    good_a = {"mode": b"embed", "image.0": encode_request_image(tiles[0], raw=False), "image.1": encode_request_image(tiles[1])}
    bad_image = {"mode": b"embed", "image.0": b"\x89PNG\r\n\x1a\n truncated"}
    bad_mode = {"mode": b"classify"}
    good_b = {"mode": b"embed", "image.0": encode_request_image(tiles[2])}
    gap = {"mode": b"embed", "image.0": encode_request_image(tiles[0]), "image.2": encode_request_image(tiles[1])}
    responses = instance.handle([good_a, bad_image, bad_mode, good_b, gap], context)
    assert len(responses) == 5
    meta, arrays = decode_envelope(responses[0])
    assert meta["batch"] == 5
    expected = embedded.embed(tiles[:3])
    assert np.all(_cosines(arrays["embeddings"], expected[:2]) >= 0.9999)
    with pytest.raises(errors.ImageDecodeError):
        decode_envelope(responses[1])
    with pytest.raises(errors.UnknownNameError, match="classify"):
        decode_envelope(responses[2])
    _, arrays_b = decode_envelope(responses[3])
    assert _cosines(arrays_b["embeddings"], expected[2:3])[0] >= 0.9999
    with pytest.raises(errors.InvalidRequest, match="without gaps"):
        decode_envelope(responses[4])


def test_handler_reads_method_options_and_a_bad_one_fails_alone(handler, tiles, embedded) -> None:
    instance, context = handler
    explain = {
        "mode": b"explain", "method": b"smoothgrad", "query": encode_request_image(tiles[0]),
        "reference.0": encode_request_image(tiles[1]), "side": b"query",
    }
    good = {**explain, "smoothgrad_samples": b"3", "smoothgrad_sigma": b"0.25"}
    too_many = {**explain, "smoothgrad_samples": b"100000"}
    not_a_number = {**explain, "smoothgrad_sigma": b"lots"}
    responses = instance.handle([too_many, good, not_a_number], context)
    with pytest.raises(errors.InvalidRequest, match="from 1 to 256"):
        decode_envelope(responses[0])
    with pytest.raises(errors.InvalidRequest, match="'smoothgrad_sigma' must be a number"):
        decode_envelope(responses[2])
    _, arrays = decode_envelope(responses[1])
    local = embedded.explain(
        ExplainRequest(tiles[0], [tiles[1]], "smoothgrad", side="query", options=SmoothGradOptions(n_samples=3, sigma=0.25))
    )
    assert float(np.max(np.abs(arrays["query_heatmaps"].astype(np.float32) - local.query_heatmaps))) <= HEATMAP_ATOL


def test_handler_uses_given_embeddings_and_a_bad_one_fails_alone(handler, tiles, embedded) -> None:
    instance, context = handler
    vectors = embedded.embed(tiles[:3])
    explain = {
        "mode": b"explain", "method": b"gradcam", "query": encode_request_image(tiles[0]),
        "reference.0": encode_request_image(tiles[1]), "reference.1": encode_request_image(tiles[2]),
    }
    good = {**explain, "query_embedding": encode_float32(vectors[0]), "reference_embeddings": encode_float32(vectors[1:])}
    short = {**explain, "reference_embeddings": encode_float32(vectors[1:2])}  # one row for two references
    not_finite = {**explain, "query_embedding": encode_float32(np.full(vectors.shape[1], np.nan))}
    text = {**explain, "query_embedding": "0.1,0.2"}
    responses = instance.handle([short, good, not_finite, text], context)
    with pytest.raises(errors.InvalidRequest, match="'reference_embeddings' has 5120 bytes; expected 2560"):
        decode_envelope(responses[0])
    with pytest.raises(errors.InvalidRequest, match="NaN"):
        decode_envelope(responses[2])
    with pytest.raises(errors.InvalidRequest, match="is text"):
        decode_envelope(responses[3])
    meta, arrays = decode_envelope(responses[1])
    local = embedded.explain(ExplainRequest(tiles[0], tiles[1:3], "gradcam"))
    np.testing.assert_allclose(arrays["scores"], local.scores, atol=SCORE_ATOL)
    # GradCAM travels as raw CAMs on its layer's grid (the default preset's blocks.4, 14x14),
    # finished by the receiver.
    assert meta["map_size"] == [224, 224]
    for name in ("query_heatmaps", "reference_heatmaps"):
        assert arrays[name].shape == (2, 14, 14) and arrays[name].dtype == np.float32
        finished = finish_cams(arrays[name], (224, 224))
        assert float(np.max(np.abs(finished - getattr(local, name)))) <= CAM_ATOL, name


def test_handler_serves_matched_regions_and_the_projection_target(handler, tiles, embedded) -> None:
    """Correspondences and the target through the handler's input map and envelope, inside
    inference mode: the same pairs and maps as in-process."""
    instance, context = handler
    request = {
        "mode": b"explain", "method": b"gradcam", "target": b"projection", "correspondences": b"3",
        "query": encode_request_image(tiles[0]), "reference.0": encode_request_image(tiles[1]),
        "reference.1": encode_request_image(tiles[2]),
    }
    with torch.inference_mode():
        (response,) = instance.handle([request], context)
    served = decode_explanation(*decode_envelope(response))
    local = embedded.explain(ExplainRequest(tiles[0], tiles[1:3], "gradcam", target="projection", correspondences=3))
    assert served.correspondences is not None and len(served.correspondences) == 2
    for ours, theirs in zip(served.correspondences, local.correspondences):
        assert [(p.query_box, p.reference_box, p.rank) for p in ours] == [(p.query_box, p.reference_box, p.rank) for p in theirs]
        np.testing.assert_allclose([p.share for p in ours], [p.share for p in theirs], atol=1e-6)
    assert float(np.max(np.abs(served.query_heatmaps - local.query_heatmaps))) <= CAM_ATOL


@pytest.mark.parametrize("polarity", ["similar", "dissimilar"])
def test_handler_serves_the_similarity_decomposition(handler, tiles, embedded, polarity) -> None:
    """simmap through the handler: raw maps on the 7x7 grid (like GradCAM's), finished by the
    receiver to the in-process maps, for both sides; inside inference mode, as TorchServe calls it."""
    instance, context = handler
    request = {
        "mode": b"explain", "method": b"simmap", "polarity": polarity.encode(), "query": encode_request_image(tiles[0]),
        "reference.0": encode_request_image(tiles[1]), "reference.1": encode_request_image(tiles[2]),
    }
    with torch.inference_mode():
        (response,) = instance.handle([request], context)
    meta, arrays = decode_envelope(response)
    assert (meta["method"], meta["polarity"], meta["map_size"]) == ("simmap", polarity, [224, 224])
    local = embedded.explain(ExplainRequest(tiles[0], tiles[1:3], "simmap", polarity))
    np.testing.assert_allclose(arrays["scores"], local.scores, atol=SCORE_ATOL)
    for name in ("query_heatmaps", "reference_heatmaps"):
        assert arrays[name].shape == (2, 7, 7) and arrays[name].dtype == np.float32
        assert float(arrays[name].min()) >= 0 and float(arrays[name].max()) > 0
        finished = finish_cams(arrays[name], (224, 224))
        assert float(np.max(np.abs(finished - getattr(local, name)))) <= CAM_ATOL, name


def test_handler_explains_inside_inference_mode(handler, tiles, embedded) -> None:
    """TorchServe may call the handler under inference mode: gradients must still flow."""
    instance, context = handler
    request = {
        "mode": b"explain", "method": b"gradcam", "query": encode_request_image(tiles[0]),
        "reference.0": encode_request_image(tiles[1]), "side": b"query",
    }
    with torch.inference_mode():
        (response,) = instance.handle([request], context)
    meta, arrays = decode_envelope(response)
    assert meta["side"] == "query" and "reference_heatmaps" not in arrays
    assert arrays["query_heatmaps"].shape[0] == 1 and float(arrays["query_heatmaps"].max()) > 0


# -- through a real TorchServe ---------------------------------------------------------------


@pytest.mark.integration
def test_info_matches_the_embedded_backend(torchserve_backend, embedded) -> None:
    served, local = torchserve_backend.info(), embedded.info()
    assert served.backend == "torchserve"
    assert (served.preset, served.architecture, served.embedding_dim, served.input_size, served.methods) == (
        local.preset, local.architecture, local.embedding_dim, local.input_size, local.methods
    )
    assert torchserve_backend.ready()


@pytest.mark.integration
def test_embeddings_match_in_process(torchserve_backend, embedded, tiles) -> None:
    served = torchserve_backend.embed(tiles, timeout=60)
    local = embedded.embed(tiles)
    assert served.dtype == np.float32 and served.shape == local.shape
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    assert np.all(_cosines(served, local) >= 0.9999)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("method", "polarity", "side", "count"),
    [
        ("gradcam", "similar", "both", 3),
        ("gradcampp", "dissimilar", "both", 2),
        ("smoothgrad", "similar", "query", 1),
        ("smoothgrad", "dissimilar", "retrieved", 1),
        ("simmap", "similar", "both", 3),
        ("simmap", "dissimilar", "query", 2),
    ],
)
def test_explanations_match_in_process(torchserve_backend, embedded, tiles, method, polarity, side, count) -> None:
    query, references = tiles[0], tiles[1 : 1 + count]
    request = ExplainRequest(query, references, method, polarity, side)
    served = torchserve_backend.explain(request, timeout=120)
    local = embedded.explain(request)
    assert (served.method, served.polarity) == (local.method, local.polarity)
    np.testing.assert_allclose(served.scores, local.scores, atol=SCORE_ATOL)
    for name in ("query_heatmaps", "reference_heatmaps"):
        served_maps, local_maps = getattr(served, name), getattr(local, name)
        if local_maps is None:
            assert served_maps is None
            continue
        assert served_maps.shape == local_maps.shape and served_maps.dtype == np.float32
        tolerance = HEATMAP_ATOL if method == "smoothgrad" else CAM_ATOL
        assert float(np.max(np.abs(served_maps - local_maps))) <= tolerance, name
        assert float(local_maps.max()) > 0  # not a vacuous comparison of empty maps


@pytest.mark.integration
@pytest.mark.parametrize(("polarity", "side", "count"), [("similar", "both", 2), ("dissimilar", "query", 3)])
def test_rise_matches_in_process(torchserve_backend, embedded, tiles, polarity, side, count) -> None:
    """RISE through the handler (torch, its options on the wire as text) against the in-process
    backend (its masked images through ONNX Runtime): finished maps, float16 on the wire."""
    options = RiseOptions(n_masks=12, grid=4, keep_probability=0.4, fill="mean", seed=3, batch_size=6)
    request = ExplainRequest(tiles[0], tiles[1 : 1 + count], "rise", polarity, side, options=options)
    served = torchserve_backend.explain(request, timeout=120)
    local = embedded.explain(request)
    assert (served.method, served.polarity, served.map_size) == ("rise", polarity, None)
    np.testing.assert_allclose(served.scores, local.scores, atol=SCORE_ATOL)
    for name in ("query_heatmaps", "reference_heatmaps"):
        served_maps, local_maps = getattr(served, name), getattr(local, name)
        if local_maps is None:
            assert served_maps is None
            continue
        assert served_maps.shape == local_maps.shape == (count, 224, 224)
        # ONNX Runtime vs torch moves the masked cosines by ~1e-6, float16 rounds the maps.
        assert float(np.max(np.abs(served_maps - local_maps))) <= 5e-3, name
        assert float(local_maps.max()) > 0


@pytest.mark.integration
@pytest.mark.parametrize("side", ["both", "retrieved"])
def test_stored_embeddings_give_the_in_process_maps(torchserve_backend, embedded, tiles, side) -> None:
    query, references = tiles[0], tiles[1:3]
    vectors = embedded.embed(tiles[:3])
    served = torchserve_backend.explain(
        ExplainRequest(
            query, references, "gradcam", "similar", side, query_embedding=vectors[0], reference_embeddings=vectors[1:]
        ),
        timeout=120,
    )
    local = embedded.explain(ExplainRequest(query, references, "gradcam", "similar", side))
    np.testing.assert_allclose(served.scores, local.scores, atol=SCORE_ATOL)
    for name in ("query_heatmaps", "reference_heatmaps"):
        local_maps = getattr(local, name)
        if local_maps is None:
            assert getattr(served, name) is None
            continue
        assert float(np.max(np.abs(getattr(served, name) - local_maps))) <= HEATMAP_ATOL, name
    with pytest.raises(errors.InvalidRequest, match="query_embedding"):
        torchserve_backend.explain(ExplainRequest(query, references, "gradcam", query_embedding=vectors[0, :10]), timeout=60)
    with pytest.raises(errors.InvalidRequest, match="'query_embedding' has 40 bytes"):
        torchserve_backend.predict(
            {"mode": b"explain", "method": b"gradcam", "query": encode_request_image(query),
             "reference.0": encode_request_image(references[0]), "query_embedding": encode_float32(vectors[0, :10])},
            60,
        )


@pytest.mark.integration
def test_smoothgrad_options_give_the_in_process_maps(torchserve_backend, embedded, tiles) -> None:
    query, references = tiles[0], tiles[1:3]
    # sigma as the gateway passes it on: a float32 value from the wire.
    options = SmoothGradOptions(n_samples=3, sigma=float(np.float32(0.3)))
    request = ExplainRequest(query, references, "smoothgrad", "similar", "query", options)
    served = torchserve_backend.explain(request, timeout=120)
    local = embedded.explain(request)
    default = embedded.explain(ExplainRequest(query, references, "smoothgrad", "similar", "query"))
    assert served.query_heatmaps.shape == local.query_heatmaps.shape == (2, 224, 224)
    assert float(np.max(np.abs(served.query_heatmaps - local.query_heatmaps))) <= HEATMAP_ATOL
    assert float(np.max(np.abs(served.query_heatmaps - default.query_heatmaps))) > 0.05, "options were not applied"
    with pytest.raises(errors.InvalidRequest, match="from 1 to 256"):
        torchserve_backend.predict(
            {"mode": b"explain", "method": b"smoothgrad", "query": encode_request_image(query),
             "reference.0": encode_request_image(references[0]), "smoothgrad_samples": b"100000"},
            60,
        )


def _concurrently(calls: list[Callable[[], object]]) -> list[object]:
    """Run the calls at once (released together by a barrier); exceptions are returned."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], object]) -> object:
        barrier.wait()
        try:
            return call()
        except Exception as error:  # collected for the assertions
            return error

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


@pytest.mark.integration
def test_concurrent_requests_are_batched_and_correct(torchserve, torchserve_backend, embedded, tiles) -> None:
    expected = embedded.embed(tiles)
    requests = [
        (index % len(tiles), {"mode": b"embed", "image.0": encode_request_image(tiles[index % len(tiles)])})
        for index in range(8)
    ]
    results = _concurrently([lambda inputs=inputs: torchserve_backend.predict(inputs, 60) for _, inputs in requests])
    batches = []
    for (tile, _), result in zip(requests, results, strict=True):
        assert not isinstance(result, Exception), result
        meta, arrays = result
        batches.append(meta["batch"])
        assert _cosines(arrays["embeddings"], expected[tile : tile + 1])[0] >= 0.9999
    assert max(batches) > 1, batches
    assert max(batches) <= torchserve.batch_size


@pytest.mark.integration
def test_a_bad_request_fails_alone_in_a_batch(torchserve_backend, embedded, tiles) -> None:
    expected = embedded.embed(tiles[:3])
    good = [lambda i=i: torchserve_backend.embed([tiles[i]], timeout=60) for i in range(3)]
    bad = lambda: torchserve_backend.predict({"mode": b"embed", "image.0": b"not an image"}, 60)  # noqa: E731
    results = _concurrently([good[0], bad, good[1], good[2]])
    assert isinstance(results[1], errors.ImageDecodeError)
    for index, result in zip((0, 1, 2), (results[0], results[2], results[3]), strict=True):
        assert isinstance(result, np.ndarray), result
        assert _cosines(result, expected[index : index + 1])[0] >= 0.9999


@pytest.mark.integration
def test_errors_of_the_model_reach_the_caller_as_domain_errors(torchserve_backend, tiles) -> None:
    # Sent as raw input maps: an ExplainRequest would refuse these names before they leave.
    explain = {"mode": b"explain", "method": b"gradcam", "query": encode_request_image(tiles[0]),
               "reference.0": encode_request_image(tiles[1])}
    with pytest.raises(errors.UnknownNameError, match="gradcam"):
        torchserve_backend.predict({**explain, "method": b"gradcat"}, 60)
    with pytest.raises(errors.UnknownNameError, match="side"):
        torchserve_backend.predict({**explain, "side": b"left"}, 60)
    with pytest.raises(errors.InvalidRequest, match="query"):
        torchserve_backend.predict({"mode": b"explain", "method": b"gradcam", "reference.0": encode_request_image(tiles[1])}, 60)


@pytest.mark.integration
def test_a_missed_deadline_raises_deadline_exceeded(torchserve_backend, tiles) -> None:
    # TorchServe finishes a request whose caller gave up (~1 s here): keep it cheap so the
    # worker is free again for the next test.
    with pytest.raises(errors.DeadlineExceeded, match="deadline"):
        torchserve_backend.explain(ExplainRequest(tiles[0], tiles[1:4], "gradcam"), timeout=0.02)


@pytest.mark.integration
def test_requests_without_the_inference_key_are_rejected(torchserve, tmp_path) -> None:
    from histoxplain_service.backends.torchserve._proto import inference_pb2, inference_pb2_grpc

    request = inference_pb2.PredictionsRequest(model_name=torchserve.model_name, input={"mode": b"info"})
    with grpc.insecure_channel(torchserve.process.grpc_target) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as no_key:
            stub.Predictions(request, timeout=60)
        assert no_key.value.code() == grpc.StatusCode.PERMISSION_DENIED
        management_key = torchserve.process.keys().management
        with pytest.raises(grpc.RpcError) as wrong_key:
            stub.Predictions(request, timeout=60, metadata=(("authorization", f"Bearer {management_key}"),))
        assert wrong_key.value.code() == grpc.StatusCode.PERMISSION_DENIED
        inference_key = torchserve.process.keys().inference
        response = stub.Predictions(request, timeout=60, metadata=(("authorization", f"Bearer {inference_key}"),))
        assert decode_envelope(response.prediction)[0]["mode"] == "info"

    stale = tmp_path / "key_file.json"
    stale.write_text('{"inference": {"key": "not-the-key"}}')
    backend = TorchServeBackend(TorchServeConfig(torchserve.process.grpc_target, torchserve.model_name, stale))
    try:
        with pytest.raises(errors.DependencyUnavailable, match="refused the inference key"):
            backend.info()
        assert not backend.ready()
    finally:
        backend.close()


@pytest.mark.integration
def test_torchserve_down_raises_dependency_unavailable(tiles) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = TorchServeBackend(TorchServeConfig(target=f"127.0.0.1:{port}", model_name="histoxplain"))
    try:
        with pytest.raises(errors.DependencyUnavailable, match="unavailable"):
            backend.embed(tiles[:1], timeout=5)
        assert not backend.ready()
    finally:
        backend.close()


@pytest.mark.integration
def test_backend_follows_regenerated_keys(torchserve, torchserve_backend, tiles) -> None:
    assert torchserve_backend.ready()
    old = torchserve.process.keys()
    torchserve.process.refresh_keys()
    new = torchserve.process.keys()
    assert new.inference != old.inference and new.management != old.management
    assert torchserve_backend.embed(tiles[:1], timeout=60).shape == (1, 1280)
    assert torchserve.process.model_status(torchserve.model_name)[0]["batchSize"] == torchserve.batch_size


def _worker_pids(root: int) -> list[int]:
    """TorchServe's Python worker processes below ``root`` (by their command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"model_service_worker" in command:
            found.append(int(entry.name))
    return [pid for pid in found if _has_ancestor(pid, root)]


def _has_ancestor(pid: int, root: int) -> bool:
    while pid > 1:
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == root:
            return True
    return False


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_killed_mid_call_gives_unavailable_and_the_backend_recovers(
    torchserve_model_store, tmp_path_factory, tiles
) -> None:
    """Its own TorchServe (killing the shared one's worker would disturb other tests)."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.fail("TorchServe needs Java 17: apt-get install openjdk-17-jre-headless (.ci/run does this)")
    process = TorchServeProcess(torchserve_model_store, tmp_path_factory.mktemp("torchserve-kill"))
    process.start()
    try:
        name = process.register_model("histoxplain.mar", "histoxplain")
        backend = TorchServeBackend(TorchServeConfig(process.grpc_target, name, process.key_file))
        try:
            assert backend.ready()
            (worker,) = _worker_pids(process.pid)
            slow = ExplainRequest(tiles[0], tiles[1:4], "smoothgrad", options=SmoothGradOptions(n_samples=64))
            with ThreadPoolExecutor(4) as pool:
                call = pool.submit(backend.explain, slow, 120)
                time.sleep(3.0)  # the worker is busy with the explanation; more calls queue behind it
                queued = [pool.submit(backend.embed, tiles[:2], 120) for _ in range(3)]
                time.sleep(0.5)
                os.kill(worker, signal.SIGKILL)
                killed = time.monotonic()
                with pytest.raises(errors.DependencyUnavailable) as lost:
                    call.result(timeout=120)
                for other in queued:  # served by the restarted worker, or lost with the dead one: nothing else
                    error = other.exception(timeout=180)
                    assert error is None or isinstance(error, errors.DependencyUnavailable), error
            message = str(lost.value)
            assert "retry" in message and "127.0.0.1" not in message and "Exception" not in message
            process.wait_model_ready(name, timeout=180)  # TorchServe restarts the worker
            deadline = time.monotonic() + 60
            while not backend.ready() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert backend.embed(tiles[:1], timeout=60).shape == (1, 1280)
            print(f"TorchServe worker killed mid-call: serving again {time.monotonic() - killed:.1f} s later")
        finally:
            backend.close()
    finally:
        process.stop()
