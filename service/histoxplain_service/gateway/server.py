"""The grpc.aio gateway server: build it, serve it, shut it down gracefully.

:class:`Gateway` owns the server, the worker threads and the health monitor. It registers the
retrieval service, the standard health service and (unless switched off) server reflection,
and applies the message size limits, the authentication interceptor (when authentication is
configured) and the error-mapping one. The port is TLS (optionally mutual) when certificates
are configured; a non-loopback address without TLS and authentication is refused
(:mod:`histoxplain_service.gateway.security`). :func:`serve` runs a gateway until SIGTERM or
SIGINT, installing the signal handlers explicitly so that draining also works as PID 1 (where
the kernel ignores a SIGTERM that has no handler).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from grpc import aio
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from histoxplain_model.errors import InvalidRequest
from histoxplain_service.bootstrap import create_backend, open_gateway_index
from histoxplain_service.config import GatewaySettings
from histoxplain_service.gateway.auth import build_authenticator
from histoxplain_service.gateway.audit import AuditInterceptor
from histoxplain_service.gateway.health import HealthMonitor, backend_probe, health_server, index_probe
from histoxplain_service.gateway.interceptors import AuthInterceptor, ErrorMappingInterceptor
from histoxplain_service.gateway.security import check_exposure, reflection_enabled
from histoxplain_service.gateway.servicer import RetrievalServicer, add_servicer_to_server, service_name
from histoxplain_service.gateway.tls import server_credentials

if TYPE_CHECKING:
    from histoxplain_service.backends import ModelBackend
    from histoxplain_service.index.base import IndexEngine

__all__ = ["Gateway", "grpc_options", "serve"]

logger = logging.getLogger(__name__)


def grpc_options(settings: GatewaySettings) -> list[tuple[str, int]]:
    """Channel arguments of the server: message size limits in both directions."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


class Gateway:
    """One gateway server: retrieval service + health (+ reflection) on ``settings.address``.

    Args:
        settings: the gateway settings (address, limits, deadlines, threads, TLS, auth).
        backend: the model backend (TorchServe or embedded); the gateway does not close it.
        index_engine: where the indexes live (e.g. Qdrant); the gateway does not close it.

    Raises:
        InvalidRequest: unusable TLS or authentication settings or files, or a non-loopback
            address without TLS and authentication (the message names the settings to fix).

    Use ``await gateway.start()`` (returns once the port is bound; :attr:`port` is the bound
    port, useful with port 0; :attr:`health_port` the health-only one), then
    ``await gateway.stop()``.
    """

    def __init__(self, settings: GatewaySettings, backend: ModelBackend, index_engine: IndexEngine) -> None:
        self.settings = settings
        self.backend = backend
        self.index_engine = index_engine
        # Credentials first: a gateway that would be exposed must fail before it holds anything.
        self.credentials = server_credentials(settings)
        self.authenticator = build_authenticator(settings)
        check_exposure(settings, tls=self.credentials is not None, authentication=self.authenticator is not None)
        self.executor = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="histoxplain-worker")
        # Probes get threads of their own: behind a queue of long explanations they would time
        # out and turn a busy but healthy gateway NOT_SERVING.
        self.health_executor = ThreadPoolExecutor(2, thread_name_prefix="histoxplain-health")
        # The first interceptor is the outermost: every call is audited, refused calls never
        # reach the error mapping.
        auth = [AuthInterceptor(self.authenticator)] if self.authenticator is not None else []
        self.server = aio.server(
            interceptors=[AuditInterceptor(authenticated=bool(auth)), *auth, ErrorMappingInterceptor()],
            options=grpc_options(settings),
            maximum_concurrent_rpcs=None,
        )
        self.servicer = RetrievalServicer(settings, backend, index_engine, self.executor)
        add_servicer_to_server(self.servicer, self.server)
        self.health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, self.server)
        if reflection_enabled(settings):
            reflection.enable_server_reflection(
                (service_name(), health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
            )
        self.health_only = health_server(self.health_servicer) if settings.health_port is not None else None
        self.health = HealthMonitor(
            self.health_servicer,
            (backend_probe(backend), index_probe(index_engine)),
            (service_name(),),
            interval_s=settings.health_interval_s,
            probe_timeout_s=min(5.0, settings.health_interval_s * 2),
            executor=self.health_executor,
        )
        self.port: int = 0
        self.health_port: int | None = None

    async def start(self) -> None:
        """Bind, start serving, and start the health monitor (NOT_SERVING until ready)."""
        address = self.settings.address
        if self.credentials is not None:
            self.port = self.server.add_secure_port(address, self.credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {address}; set HISTOXPLAIN_PORT to a free port")
        if self.health_only is not None:
            health_address = address.rpartition(":")[0] + f":{self.settings.health_port}"
            self.health_port = self.health_only.add_insecure_port(health_address)
            if self.health_port == 0:
                raise OSError(f"could not bind {health_address}; set HISTOXPLAIN_HEALTH_PORT to a free port")
            await self.health_only.start()
        await self.server.start()
        await self.health.start()
        logger.info(
            "gateway listening on %s:%d (backend %s, %s, %s%s)", self.settings.host, self.port,
            self.settings.backend, "TLS" if self.credentials is not None else "plaintext",
            "authentication on" if self.authenticator is not None else "authentication OFF",
            f", health only on :{self.health_port}" if self.health_port is not None else "",
        )

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight calls finish for
        ``grace_s`` (default ``settings.grace_period_s``), then cancel what is left."""
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        logger.info("gateway draining (grace %.1f s)", grace)
        drain_until = time.monotonic() + grace
        await self.health.stop()
        await self.server.stop(grace)
        # The calls are cancelled now; their work stops at its next check (one backward pass,
        # chunk or batch), so the worker threads the interpreter joins at exit end promptly.
        self.servicer.cancel_all()
        # results queued for the PACS write-back get what is left of the grace period
        await asyncio.to_thread(self.servicer.close, max(0.0, drain_until - time.monotonic()))
        if self.health_only is not None:  # last: probes see NOT_SERVING during the drain
            await self.health_only.stop(0)
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
    try:
        asyncio.run(serve(GatewaySettings.from_env()))
    except InvalidRequest as error:  # a setting to fix: its message, without a traceback
        logger.error("gateway not started: %s", error)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
