"""Work stops with its caller (issue 10, requirement 5): a real gateway, the real embedded model.

* an IndexImages stream whose deadline expires mid-stream: the gateway stops within one batch,
  keeps whole images only, and reports in trailing metadata exactly what the index holds; the
  same stream sent again completes it without duplicates;
* a SmoothGrad explanation whose client cancels, or whose deadline expires: its worker thread
  is free again within one chunk (it would otherwise compute for tens of seconds);
* a gateway process SIGKILLed mid-IndexImages: the index it leaves opens, and the same stream
  sent to a new gateway completes it without duplicates;
* SIGTERM to a gateway process with the most expensive admitted call in flight: the process
  exits within its grace period + 5 s.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import histoxplain_client as hc
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2_grpc as pb_grpc
from histoxplain_client._proto.histoxplain.v1 import types_pb2
from histoxplain_model.limits import MAX_N_SAMPLES
from histoxplain_service.gateway.servicer import COMMITTED_IMAGES_KEY
from test_gateway import INPUT, SERVING, GatewayThread, _png, _settings, embedded_backend, tiles  # noqa: F401

from histoxplain_service.bootstrap import open_index_engine

#: Tiles per embedding batch in these gateways: the unit after which indexing can stop.
BATCH = 8
#: Images of the indexing stream, four tiles each (about 20 s of indexing on one idle CPU thread).
STREAM_IMAGES = 150
#: How long a worker thread may go on after its call ended: one unit of work and then some.
STOP_BOUND_S = 4.0


def _tissue_images(count: int) -> list[bytes]:
    """``count`` distinct 448x448 PNGs (four tiles each) of the scikit-image IHC colon image."""
    from skimage import data

    ihc = data.immunohistochemistry()
    rng = np.random.default_rng(7)
    images = []
    for _ in range(count):
        y, x = rng.integers(0, ihc.shape[0] - 2 * INPUT, size=2)
        crop = ihc[y : y + 2 * INPUT, x : x + 2 * INPUT]
        images.append(_png(np.ascontiguousarray(np.rot90(crop, int(rng.integers(4))))))
    return images


@pytest.fixture()
def gateway(embedded_backend: Any, tmp_path: Path) -> Iterator[GatewayThread]:
    settings = _settings(tmp_path, max_explain_cost=1_000_000)
    settings = dataclasses.replace(settings, core=dataclasses.replace(settings.core, batch_size=BATCH))
    engine = open_index_engine(settings.core)
    running = GatewayThread(settings, embedded_backend, engine)
    try:
        running.wait_health(SERVING)
        yield running
    finally:
        running.stop()
        engine.close()


def _index_stream(index: str, images: list[bytes]) -> Iterator[pb.IndexImagesRequest]:
    yield pb.IndexImagesRequest(config=pb.IndexImagesConfig(index=index))
    for position, data in enumerate(images):
        yield pb.IndexImagesRequest(image=types_pb2.ImageRecord(content=data, image_id=f"img-{position:03d}"))


def _wait_idle(gateway: GatewayThread, since: float) -> float:
    """Seconds from ``since`` until no call's work is running on the gateway (bounded)."""
    servicer = gateway.gateway.servicer
    while servicer.work_in_flight:
        assert time.monotonic() - since < 60, "the gateway's work did not stop"
        time.sleep(0.05)
    return time.monotonic() - since


def test_index_images_stopped_by_its_deadline_keeps_and_reports_whole_images(gateway: GatewayThread) -> None:
    images = _tissue_images(STREAM_IMAGES)
    sent = [hc.IndexImage(data, image_id=f"img-{position:03d}") for position, data in enumerate(images)]
    with hc.Client(gateway.target, retry=hc.NO_RETRY) as client, pytest.raises(hc.DeadlineExceeded) as stopped:
        # The gateway stops a tenth of the deadline early (at most 1 s) so its report arrives:
        # 10 s leaves a batch of BATCH tiles 1 s even on a loaded machine.
        client.index_images("stream", sent, timeout=10.0)
    ended = time.monotonic()
    committed, committed_tiles = stopped.value.committed_images, stopped.value.committed_tiles
    assert committed is not None and committed_tiles is not None, "the gateway did not report what it committed"
    assert 0 < committed < STREAM_IMAGES  # it stopped mid-stream, after some work
    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        idle = _wait_idle(gateway, ended)
        print(f"IndexImages deadline: {committed}/{STREAM_IMAGES} images committed, work ended {idle:.2f} s after the call")
        assert idle < STOP_BOUND_S

        def held() -> tuple[int, int]:
            info = stub.DescribeIndex(pb.DescribeIndexRequest(index="stream"), timeout=30).index
            return info.image_count, info.tile_count

        # What the index holds is what was reported: whole images only, and nothing more later.
        assert held() == (committed, committed_tiles) == (committed, 4 * committed)
        time.sleep(1.0)
        assert held() == (committed, 4 * committed)

        # The same stream again: committed images come back unchanged, the rest is indexed once.
        response = stub.IndexImages(_index_stream("stream", images), timeout=300)
        assert response.images_received == STREAM_IMAGES
        assert response.images_indexed == STREAM_IMAGES - committed
        assert held() == (STREAM_IMAGES, 4 * STREAM_IMAGES)


def test_a_malformed_message_mid_stream_keeps_only_whole_images(gateway: GatewayThread) -> None:
    images = _tissue_images(6)

    def stream() -> Iterator[pb.IndexImagesRequest]:
        yield from _index_stream("bad-stream", images)
        yield pb.IndexImagesRequest(config=pb.IndexImagesConfig(index="bad-stream"))

    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.IndexImages(stream(), timeout=120)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        committed = int(dict(refused.value.trailing_metadata())[COMMITTED_IMAGES_KEY])
        described = stub.DescribeIndex(pb.DescribeIndexRequest(index="bad-stream"), timeout=30)
        assert (described.index.image_count, described.index.tile_count) == (committed, 4 * committed)


@pytest.fixture()
def explained_gateway(gateway: GatewayThread, tiles: dict[str, bytes]) -> tuple[GatewayThread, bytes]:
    with hc.Client(gateway.target, timeout=120, retry=hc.NO_RETRY) as client:
        client.index_images("refs", [hc.IndexImage(data, image_id=name) for name, data in tiles.items()])
    return gateway, next(iter(tiles.values()))


def _expensive(client: hc.Client, query: bytes, timeout: float) -> None:
    """SmoothGrad at the sample limit on both sides of 6 hits: minutes of work on one CPU thread."""
    client.search_and_explain(
        "refs", query, k=6, method="smoothgrad", side="both", smoothgrad_samples=MAX_N_SAMPLES, timeout=timeout
    )


def test_a_cancelled_smoothgrad_call_frees_its_worker(explained_gateway: tuple[GatewayThread, bytes]) -> None:
    gateway, query = explained_gateway
    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        options = types_pb2.ExplainOptions(
            method=types_pb2.EXPLANATION_METHOD_SMOOTHGRAD, side=types_pb2.EXPLANATION_SIDE_BOTH, smoothgrad_samples=MAX_N_SAMPLES
        )
        call = stub.SearchAndExplain.future(
            pb.SearchAndExplainRequest(index="refs", image=query, k=6, options=options), timeout=300
        )
        time.sleep(2.0)
        assert gateway.gateway.servicer.work_in_flight == 1  # it is computing
        call.cancel()
        idle = _wait_idle(gateway, time.monotonic())
        print(f"SmoothGrad cancelled by its client: work ended {idle:.2f} s after the cancel")
        assert idle < STOP_BOUND_S


def test_an_expired_smoothgrad_call_frees_its_worker(explained_gateway: tuple[GatewayThread, bytes]) -> None:
    gateway, query = explained_gateway
    with hc.Client(gateway.target, retry=hc.NO_RETRY) as client, pytest.raises(hc.DeadlineExceeded):
        _expensive(client, query, timeout=2.0)
    idle = _wait_idle(gateway, time.monotonic())
    print(f"SmoothGrad past its deadline: work ended {idle:.2f} s after the call")
    assert idle < STOP_BOUND_S


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _gateway_process(data_dir: Path, port: int, **env: str) -> subprocess.Popen[bytes]:
    """``python -m histoxplain_service.gateway.server`` with the embedded backend on ``port``."""
    environment = {
        **os.environ,
        "HISTOXPLAIN_BACKEND": "embedded",
        "HISTOXPLAIN_PORT": str(port),
        "HISTOXPLAIN_DATA": str(data_dir),
        "HISTOXPLAIN_MIN_TISSUE": "0",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "histoxplain_service.gateway.server"], env=environment,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def test_a_gateway_killed_mid_stream_leaves_an_index_that_a_rerun_completes(tmp_path: Path) -> None:
    images = _tissue_images(200)  # about 10 s of indexing with the gateway's ONNX embedder
    port = _free_port()
    target = f"127.0.0.1:{port}"
    process = _gateway_process(tmp_path, port, HISTOXPLAIN_BATCH_SIZE=str(BATCH))
    try:
        with hc.Client(target, timeout=120, retry=hc.NO_RETRY) as client:
            client.wait_until_ready(timeout=120)
            with grpc.insecure_channel(target) as channel:
                call = pb_grpc.RetrievalServiceStub(channel).IndexImages.future(
                    _index_stream("killed", images), timeout=300
                )
                time.sleep(3.0)  # some images in, some batches written
                process.kill()
                process.wait()
                with pytest.raises(grpc.RpcError) as lost:
                    call.result()
                assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    process = _gateway_process(tmp_path, port, HISTOXPLAIN_BATCH_SIZE=str(BATCH))
    try:
        with hc.Client(target, timeout=300, retry=hc.NO_RETRY) as client:
            client.wait_until_ready(timeout=120)
            before = client.describe_index("killed")
            assert 0 < before.tile_count < 4 * len(images), "the kill should land mid-stream"
            with grpc.insecure_channel(target) as channel:
                response = pb_grpc.RetrievalServiceStub(channel).IndexImages(_index_stream("killed", images), timeout=300)
            after = client.describe_index("killed")
            print(f"gateway SIGKILLed mid-stream: {before.tile_count} tiles survived; the re-run indexed "
                  f"{response.images_indexed} images and the index holds {after.image_count} images, {after.tile_count} tiles")
            assert (after.image_count, after.tile_count) == (len(images), 4 * len(images))  # none duplicated
            assert response.images_indexed < len(images)  # whole images from before were kept
    finally:
        process.terminate()
        process.wait(60)


def test_sigterm_with_the_most_expensive_call_in_flight_exits_within_grace(
    tiles: dict[str, bytes], tmp_path: Path
) -> None:
    grace_s = 2.0
    port = _free_port()
    # Admit the most expensive call there is.
    process = _gateway_process(
        tmp_path, port, HISTOXPLAIN_GRACE_PERIOD_S=str(grace_s), HISTOXPLAIN_MAX_EXPLAIN_COST="1000000"
    )
    try:
        target = f"127.0.0.1:{port}"
        with hc.Client(target, timeout=120, retry=hc.NO_RETRY) as client:
            client.wait_until_ready(timeout=120)
            client.index_images("refs", [hc.IndexImage(data, image_id=name) for name, data in tiles.items()])
            outcome: list[BaseException] = []

            def call() -> None:
                try:
                    _expensive(client, next(iter(tiles.values())), timeout=300)
                except hc.ApiError as error:
                    outcome.append(error)

            caller = threading.Thread(target=call)
            caller.start()
            time.sleep(3.0)  # well into the explanation
            assert process.poll() is None
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=grace_s + 30)
            took = time.monotonic() - sent
            caller.join(30)
        assert process.returncode == 0, process.stderr.read().decode(errors="replace")[-2000:]
        print(f"SIGTERM with SmoothGrad n={MAX_N_SAMPLES} k=6 side=both in flight: exit {took:.1f} s (grace {grace_s} s)")
        assert took <= grace_s + 5, f"exit took {took:.1f} s with a grace period of {grace_s} s"
        assert outcome and isinstance(outcome[0], (hc.Unavailable, hc.Cancelled)), outcome
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
