"""The gateway server in-process on port 0 with a scripted model backend and in-memory Qdrant:
error mapping, deadlines, message limits, health transitions, reflection, graceful drain."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from qdrant_client import QdrantClient

from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2_grpc as pb_grpc
from histoxplain_model import errors
from histoxplain_model.results import ModelInfo
from histoxplain_service.config import GatewaySettings
from histoxplain_service.gateway.server import Gateway
from histoxplain_service.index.qdrant import QdrantEngine
from histoxplain_service.config import Settings

os.environ.setdefault("OMP_NUM_THREADS", "1")

SERVICE = "histoxplain.v1.RetrievalService"


class ScriptedBackend:
    """A model backend whose answers the test controls (no model: these tests are about gRPC)."""

    def __init__(self) -> None:
        self.is_ready = True
        self.info_error: Exception | None = None
        self.info_delay_s = 0.0

    def info(self) -> ModelInfo:
        if self.info_delay_s:
            time.sleep(self.info_delay_s)
        if self.info_error is not None:
            raise self.info_error
        return ModelInfo("tiny", "resnet18", 512, (224, 224), ("gradcam", "gradcampp", "smoothgrad"), "scripted")

    def ready(self) -> bool:
        return self.is_ready

    def embed(self, images: Any, timeout: float | None = None) -> Any:
        raise NotImplementedError

    def explain(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


def run(coroutine_function: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an ``async def test(gateway, backend, channel)`` against a fresh gateway."""

    def test(tmp_path: Path, **settings_changes: Any) -> None:
        async def main() -> None:
            settings = GatewaySettings(
                core=Settings(data_dir=tmp_path),
                port=0,
                backend="embedded",
                health_interval_s=0.05,
                grace_period_s=1.0,
                **getattr(coroutine_function, "settings", {}),
            )
            backend = ScriptedBackend()
            qdrant = QdrantClient(":memory:")
            gateway = Gateway(settings, backend, QdrantEngine(settings.core, qdrant))
            await gateway.start()
            try:
                async with aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                    await coroutine_function(gateway, backend, channel)
            finally:
                await gateway.stop(0)
                qdrant.close()

        asyncio.run(main())

    test.__name__ = coroutine_function.__name__
    return test


def with_settings(**changes: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        function.settings = changes  # type: ignore[attr-defined]
        return function

    return decorate


@run
async def test_get_model_info_round_trip(gateway: Gateway, backend: ScriptedBackend, channel: aio.Channel) -> None:
    response = await pb_grpc.RetrievalServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert response.model.preset == "tiny"
    assert (response.model.input_height, response.model.input_width, response.model.embedding_dim) == (224, 224, 512)
    assert len(response.model.methods) == 3
    assert response.server_version


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidRequest("bad input: fix it"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ImageDecodeError("not an image: send PNG"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.UnknownNameError.for_name("method", "x", ["gradcam"]), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("no index 'x'; see ListIndexes"), grpc.StatusCode.NOT_FOUND),
        (errors.FailedPrecondition("built with another encoder"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.DependencyUnavailable("TorchServe is down; retry"), grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded("too slow; raise the deadline"), grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_every_error_class_reaches_the_client_as_its_status(
    tmp_path: Path, error: errors.HistoxplainError, code: grpc.StatusCode
) -> None:
    @run
    async def check(gateway: Gateway, backend: ScriptedBackend, channel: aio.Channel) -> None:
        backend.info_error = error
        with pytest.raises(aio.AioRpcError) as caught:
            await pb_grpc.RetrievalServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert caught.value.code() == code
        assert caught.value.details() == str(error)

    check(tmp_path)


def test_unexpected_error_is_internal_with_a_generic_message_and_a_logged_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    @run
    async def check(gateway: Gateway, backend: ScriptedBackend, channel: aio.Channel) -> None:
        backend.info_error = KeyError("secret-internal-detail")
        with pytest.raises(aio.AioRpcError) as caught:
            await pb_grpc.RetrievalServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "secret-internal-detail" not in caught.value.details()
        assert "incident" in caught.value.details()

    with caplog.at_level(logging.ERROR, logger="histoxplain_service.gateway.interceptors"):
        check(tmp_path)
    logged = [record for record in caplog.records if record.exc_info]
    assert logged and "secret-internal-detail" in str(logged[0].exc_info[1])


@run
async def test_missed_client_deadline_is_deadline_exceeded(
    gateway: Gateway, backend: ScriptedBackend, channel: aio.Channel
) -> None:
    backend.info_delay_s = 1.0
    with pytest.raises(aio.AioRpcError) as caught:
        await pb_grpc.RetrievalServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=0.2)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@run
@with_settings(default_deadline_s=0.2, max_deadline_s=0.2)
async def test_server_caps_a_long_client_deadline(
    gateway: Gateway, backend: ScriptedBackend, channel: aio.Channel
) -> None:
    backend.info_delay_s = 1.0
    with pytest.raises(aio.AioRpcError) as caught:
        await pb_grpc.RetrievalServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "HISTOXPLAIN_MAX_DEADLINE_S" in caught.value.details()


@run
@with_settings(max_message_bytes=4096)
async def test_oversized_request_is_refused(gateway: Gateway, backend: ScriptedBackend, channel: aio.Channel) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await pb_grpc.RetrievalServiceStub(channel).Search(pb.SearchRequest(index="x", image=b"\0" * 10_000, k=1), timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details()


@run
async def test_unknown_rpc_is_unimplemented(gateway: Gateway, backend: ScriptedBackend, channel: aio.Channel) -> None:
    call = channel.unary_unary(f"/{SERVICE}/Teleport")
    with pytest.raises(aio.AioRpcError) as caught:
        await call(b"", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def _status(channel: aio.Channel, service: str) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return response.status


async def _wait_status(channel: aio.Channel, service: str, wanted: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (status := await _status(channel, service)) != wanted:
        if time.monotonic() > deadline:
            raise AssertionError(f"health of {service!r} stayed {status}, wanted {wanted}")
        await asyncio.sleep(0.02)


@run
async def test_health_follows_the_model_backend(gateway: Gateway, backend: ScriptedBackend, channel: aio.Channel) -> None:
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    await _wait_status(channel, "", serving)
    await _wait_status(channel, SERVICE, serving)
    backend.is_ready = False
    await _wait_status(channel, "", not_serving)
    await _wait_status(channel, SERVICE, not_serving)
    assert await _status(channel, "liveness") == serving
    backend.is_ready = True
    await _wait_status(channel, SERVICE, serving)


@run
async def test_health_is_not_serving_while_qdrant_is_gone(
    gateway: Gateway, backend: ScriptedBackend, channel: aio.Channel
) -> None:
    await _wait_status(channel, SERVICE, health_pb2.HealthCheckResponse.SERVING)
    gateway.index_engine.close()  # the in-memory client refuses calls once closed
    await _wait_status(channel, SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)


@run
async def test_reflection_lists_the_services(gateway: Gateway, backend: ScriptedBackend, channel: aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests(), timeout=5):
        names = {service.name for service in response.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names
        break


DRAIN_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from qdrant_client import QdrantClient
    from histoxplain_model.results import ModelInfo
    from histoxplain_service.config import GatewaySettings
    from histoxplain_service.gateway.server import serve
    from histoxplain_service.index.qdrant import QdrantEngine
    from histoxplain_service.config import Settings

    class SlowBackend:
        def info(self):
            time.sleep(1.5)
            return ModelInfo("slow", "resnet18", 8, (32, 32), ("gradcam",), "scripted")
        def ready(self):
            return True
        def close(self):
            print("backend closed", flush=True)

    settings = GatewaySettings(core=Settings(data_dir=sys.argv[1]), port=0, backend="embedded",
                               grace_period_s=5.0, health_interval_s=0.1)
    def ready(gateway):
        print(f"pid={os.getpid()} port={gateway.port}", flush=True)
    asyncio.run(serve(settings, backend=SlowBackend(), index_engine=QdrantEngine(settings.core, QdrantClient(":memory:")),
                      ready=ready))
    print("exited cleanly", flush=True)
    """
)


def _pid_namespace_prefix() -> list[str]:
    """``unshare`` makes the gateway PID 1 of a new PID namespace (as in a container), if allowed."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return ["unshare", "--pid", "--fork", "--mount-proc"] if probe.returncode == 0 else []


def test_sigterm_drains_in_flight_calls_then_stops(tmp_path: Path) -> None:
    script = tmp_path / "drain.py"
    script.write_text(DRAIN_SCRIPT)
    prefix = _pid_namespace_prefix()
    out_path = tmp_path / "gateway.out"
    with out_path.open("w") as out:
        process = subprocess.Popen([*prefix, sys.executable, str(script), str(tmp_path)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "port=" not in out_path.read_text():
            assert process.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.05)
        first_line = out_path.read_text().split("\n")[0]
        gateway_pid, port = (int(part.split("=")[1]) for part in first_line.split())
        if prefix:
            assert gateway_pid == 1, "expected the gateway to run as PID 1 of its namespace"
        result: dict[str, Any] = {}

        def call() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                result["response"] = pb_grpc.RetrievalServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.5)  # the call is now in flight (the backend takes 1.5 s)
        # With unshare, signal the namespace's PID 1 through the unshare child (SIGTERM is forwarded
        # only if we address the real process): find it as the child of the unshare process.
        target = _gateway_host_pid(process.pid) if prefix else process.pid
        os.kill(target, signal.SIGTERM)
        caller.join(10)
        assert result["response"].model.preset == "slow"  # drained, not cut off
        assert process.wait(20) == 0, out_path.read_text()
        output = out_path.read_text()
        assert "exited cleanly" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _gateway_host_pid(unshare_pid: int) -> int:
    children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
    assert children, "unshare has no child"
    return int(children[0])


@run
@with_settings(worker_threads=1)
async def test_health_stays_serving_while_every_worker_is_busy(
    gateway: Gateway, backend: ScriptedBackend, channel: aio.Channel
) -> None:
    await _wait_status(channel, SERVICE, health_pb2.HealthCheckResponse.SERVING)
    backend.info_delay_s = 0.5
    stub = pb_grpc.RetrievalServiceStub(channel)
    calls = [asyncio.ensure_future(stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)) for _ in range(3)]
    await asyncio.sleep(0.2)
    for _ in range(10):  # ~1 s with the only worker thread busy
        assert await _status(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING
        await asyncio.sleep(0.1)
    await asyncio.gather(*calls)
