"""The gateway's health: ``grpc.health.v1`` kept in line with the model backend and the index.

:class:`HealthMonitor` probes the dependencies off the event loop and publishes SERVING or
NOT_SERVING for ``""`` and the retrieval service; the ``liveness`` name stays SERVING while the
process answers at all. :func:`health_server` is the optional plaintext port that serves only
this service, for probes (the kubelet's) that cannot speak TLS.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

if TYPE_CHECKING:
    from histoxplain_service.backends import ModelBackend
    from histoxplain_service.index.base import IndexEngine

__all__ = ["HealthMonitor", "LIVENESS_SERVICE", "Probe", "backend_probe", "health_server", "index_probe"]

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: Health service name that is SERVING while the server answers at all, whatever the
#: dependencies do (Kubernetes liveness); "" and the retrieval service follow the dependencies.
LIVENESS_SERVICE = "liveness"


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


def health_server(servicer: health.aio.HealthServicer) -> aio.Server:
    """A server with nothing but the health service: plaintext and credential-free is safe
    there (it tells SERVING or NOT_SERVING, nothing else), and kubelet gRPC probes need it."""
    server = aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4096)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return server
