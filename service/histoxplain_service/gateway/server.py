"""The grpc.aio gateway server: build it, serve it, shut it down gracefully.

:class:`Gateway` owns the server, the worker threads and the health monitor. It registers the
retrieval service, the standard health service and server reflection, and applies the message
size limits and the error-mapping interceptor. :func:`serve` runs a gateway until SIGTERM or
SIGINT, installing the signal handlers explicitly so that draining also works as PID 1 (where
the kernel ignores a SIGTERM that has no handler).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from histoxplain_service.config import GatewaySettings
from histoxplain_service.bootstrap import create_backend, open_gateway_index
from histoxplain_service.gateway.interceptors import ErrorMappingInterceptor
from histoxplain_service.gateway.servicer import RetrievalServicer, add_servicer_to_server, service_name

if TYPE_CHECKING:
    from histoxplain_service.backends import ModelBackend
    from histoxplain_service.index.base import IndexEngine

__all__ = ["Gateway", "HealthMonitor", "Probe", "serve", "grpc_options"]

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: Health service name that is SERVING while the server answers at all, whatever the
#: dependencies do (Kubernetes liveness); "" and the retrieval service follow the dependencies.
LIVENESS_SERVICE = "liveness"


def grpc_options(settings: GatewaySettings) -> list[tuple[str, int]]:
    """Channel arguments of the server: message size limits in both directions."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


@dataclass(frozen=True)
class Probe:
    """One dependency check: ``check()`` returns True when the dependency answered."""

    name: str
    check: Callable[[], bool]


class HealthMonitor:
    """Keeps the ``grpc.health.v1`` status in line with the dependencies.

    Starts NOT_SERVING; every ``interval_s`` it runs each probe in a worker thread (bounded by
    ``probe_timeout_s``) and reports SERVING only while all of them answer, so the status
    flips back when TorchServe or the index engine (a Qdrant server) goes away.
    """

    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        probes: Sequence[Probe],
        service_names: Sequence[str],
        interval_s: float,
        probe_timeout_s: float = 5.0,
        executor: Executor | None = None,
    ) -> None:
        self._servicer = servicer
        self._probes = tuple(probes)
        self._service_names = ("", *service_names)
        self._interval_s = interval_s
        self._probe_timeout_s = probe_timeout_s
        self._executor = executor
        self._serving: bool | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def serving(self) -> bool:
        return bool(self._serving)

    async def start(self) -> None:
        """Report NOT_SERVING, then probe in the background until :meth:`stop`."""
        await self._servicer.set(LIVENESS_SERVICE, SERVING)
        await self._publish(False)
        self._task = asyncio.create_task(self._run(), name="histoxplain-health")

    async def check_now(self) -> bool:
        """Probe every dependency once and publish the result; True when all answered."""
        results = await asyncio.gather(*(self._probe(probe) for probe in self._probes))
        healthy = all(results)
        if not self._stopped:
            await self._publish(healthy)
        return healthy

    async def stop(self) -> None:
        """Stop probing and report NOT_SERVING for good (graceful shutdown)."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._serving = False
        await self._servicer.enter_graceful_shutdown()

    async def _run(self) -> None:
        while not self._stopped:
            await self.check_now()
            await asyncio.sleep(self._interval_s)

    async def _probe(self, probe: Probe) -> bool:
        loop = asyncio.get_running_loop()
        try:
            answered = await asyncio.wait_for(
                loop.run_in_executor(self._executor, probe.check), self._probe_timeout_s
            )
        except TimeoutError:
            logger.warning("health: %s did not answer within %.1f s", probe.name, self._probe_timeout_s)
            return False
        except Exception as error:  # noqa: BLE001 -- any failure means "not healthy"; logged
            logger.warning("health: %s check failed: %s", probe.name, error)
            return False
        if not answered:
            logger.info("health: %s is not ready", probe.name)
        return bool(answered)

    async def _publish(self, healthy: bool) -> None:
        if healthy == self._serving:
            return
        self._serving = healthy
        logger.info("health: %s", "SERVING" if healthy else "NOT_SERVING")
        for name in self._service_names:
            await self._servicer.set(name, SERVING if healthy else NOT_SERVING)


def index_probe(index_engine: IndexEngine) -> Probe:
    """The index engine answers (a Qdrant server is reachable, a local folder is open)."""
    return Probe(f"index engine ({type(index_engine).__name__})", index_engine.ready)


def backend_probe(backend: ModelBackend) -> Probe:
    return Probe(f"model backend ({type(backend).__name__})", backend.ready)


class Gateway:
    """One gateway server: retrieval service + health + reflection on ``settings.address``.

    Args:
        settings: the gateway settings (address, limits, deadlines, threads).
        backend: the model backend (TorchServe or embedded); the gateway does not close it.
        index_engine: where the indexes live (e.g. Qdrant); the gateway does not close it.

    Use ``await gateway.start()`` (returns once the port is bound; :attr:`port` is the bound
    port, useful with port 0), then ``await gateway.stop()``.
    """

    def __init__(self, settings: GatewaySettings, backend: ModelBackend, index_engine: IndexEngine) -> None:
        self.settings = settings
        self.backend = backend
        self.index_engine = index_engine
        self.executor = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="histoxplain-worker")
        # Probes get threads of their own: behind a queue of long explanations they would time
        # out and turn a busy but healthy gateway NOT_SERVING.
        self.health_executor = ThreadPoolExecutor(2, thread_name_prefix="histoxplain-health")
        self.server = aio.server(
            interceptors=[ErrorMappingInterceptor()],
            options=grpc_options(settings),
            maximum_concurrent_rpcs=None,
        )
        self.servicer = RetrievalServicer(settings, backend, index_engine, self.executor)
        add_servicer_to_server(self.servicer, self.server)
        self.health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, self.server)
        reflection.enable_server_reflection(
            (service_name(), health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.health = HealthMonitor(
            self.health_servicer,
            (backend_probe(backend), index_probe(index_engine)),
            (service_name(),),
            interval_s=settings.health_interval_s,
            probe_timeout_s=min(5.0, settings.health_interval_s * 2),
            executor=self.health_executor,
        )
        self.port: int = 0

    async def start(self) -> None:
        """Bind, start serving, and start the health monitor (NOT_SERVING until ready)."""
        self.port = self.server.add_insecure_port(self.settings.address)
        if self.port == 0:
            raise OSError(f"could not bind {self.settings.address}; set HISTOXPLAIN_PORT to a free port")
        await self.server.start()
        await self.health.start()
        logger.info(
            "gateway listening on %s:%d (backend %s)", self.settings.host, self.port, self.settings.backend
        )

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight calls finish for
        ``grace_s`` (default ``settings.grace_period_s``), then cancel what is left."""
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        logger.info("gateway draining (grace %.1f s)", grace)
        await self.health.stop()
        await self.server.stop(grace)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.health_executor.shutdown(wait=False, cancel_futures=True)
        logger.info("gateway stopped")

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def install_stop_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``. Explicit handlers: as PID 1 in a container the kernel
    drops signals that have no handler, so the default SIGTERM action would never run."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, signum, stop)


def _on_signal(signum: int, stop: asyncio.Event) -> None:
    logger.info("received %s; shutting down", signal.Signals(signum).name)
    stop.set()


async def serve(
    settings: GatewaySettings,
    backend: ModelBackend | None = None,
    index_engine: IndexEngine | None = None,
    ready: Callable[[Gateway], None] | None = None,
) -> None:
    """Run a gateway until SIGTERM/SIGINT, then drain and stop.

    Creates the backend (``settings.backend``) and the index engine (``settings.core``) when
    not given, and closes what it created.
    """
    owned_backend = backend is None
    owned_index = index_engine is None
    backend = create_backend(settings) if backend is None else backend
    try:
        index_engine = open_gateway_index(settings) if index_engine is None else index_engine
        try:
            gateway = Gateway(settings, backend, index_engine)
            stop = asyncio.Event()
            install_stop_signals(asyncio.get_running_loop(), stop)
            await gateway.start()
            if ready is not None:
                ready(gateway)
            await stop.wait()
            await gateway.stop()
        finally:
            if owned_index:
                index_engine.close()
    finally:
        if owned_backend:
            backend.close()


def main() -> None:
    """``python -m histoxplain_service.gateway.server``: the gateway alone (TorchServe runs elsewhere)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = GatewaySettings.from_env()
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
