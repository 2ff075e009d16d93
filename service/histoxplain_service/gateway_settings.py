"""Settings of the gRPC gateway, read from the environment once at start-up.

``GatewaySettings`` holds the core :class:`~histoxplain_service.settings.Settings` (data dir,
Qdrant, pixel limit, model preset) plus what only the gateway needs: where it listens, which
model backend it calls, message and deadline limits. Every variable is listed in
``docs/SERVING.md``; a bad value fails start-up with a message naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from histoxplain_model.errors import InvalidRequest
from histoxplain_service.settings import Settings

__all__ = ["BackendKind", "GatewaySettings", "BACKENDS"]

BackendKind = Literal["torchserve", "embedded"]
BACKENDS: tuple[BackendKind, ...] = ("torchserve", "embedded")

_MIB = 1024 * 1024


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway reads from the environment, validated.

    Attributes:
        core: the settings shared with the CLI (data dir, Qdrant URL, max pixels, preset...).
        host: address the gateway binds (``HISTOXPLAIN_HOST``); loopback unless told otherwise.
        port: port the gateway binds (``HISTOXPLAIN_PORT``); 0 picks a free one (tests).
        backend: ``torchserve`` (TorchServe's gRPC inference API) or ``embedded`` (in-process).
        torchserve_address: ``host:port`` of TorchServe's gRPC inference API.
        torchserve_key_file: TorchServe's ``key_file.json`` (token authorization), if any.
        torchserve_model: the model name registered in TorchServe.
        max_message_bytes: largest request or response message, both directions.
        default_deadline_s: deadline of a call that arrives without one.
        max_deadline_s: upper bound on any call's deadline, whatever the client asks for.
        max_k: largest ``k`` a Search may ask for (the API allows up to 1000; the domain layer
            currently stops at ``retrieval.MAX_K`` = 100).
        max_explain_k: largest number of references one Explain / SearchAndExplain explains
            (the API allows up to 100 for SearchAndExplain; each costs a backward pass).
        worker_threads: threads that run model and index calls off the event loop.
        grace_period_s: how long SIGTERM lets in-flight calls finish before cancelling them.
        health_interval_s: how often health re-checks the model backend and Qdrant.
    """

    core: Settings
    host: str = "127.0.0.1"
    port: int = 50051
    backend: BackendKind = "torchserve"
    torchserve_address: str = "127.0.0.1:7070"
    torchserve_key_file: Path | None = None
    torchserve_model: str = "histoxplain"
    max_message_bytes: int = 64 * _MIB
    default_deadline_s: float = 60.0
    max_deadline_s: float = 300.0
    max_k: int = 100
    max_explain_k: int = 100
    worker_threads: int = 4
    grace_period_s: float = 10.0
    health_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InvalidRequest(
                f"HISTOXPLAIN_BACKEND={self.backend!r} is not known; use one of {', '.join(BACKENDS)}"
            )
        if not 0 <= self.port <= 65535:
            raise InvalidRequest(f"HISTOXPLAIN_PORT={self.port} is not a port number (0-65535)")
        _require_positive("HISTOXPLAIN_MAX_MESSAGE_MB", self.max_message_bytes)
        _require_positive("HISTOXPLAIN_DEFAULT_DEADLINE_S", self.default_deadline_s)
        _require_positive("HISTOXPLAIN_MAX_DEADLINE_S", self.max_deadline_s)
        _require_positive("HISTOXPLAIN_MAX_K", self.max_k)
        _require_positive("HISTOXPLAIN_MAX_EXPLAIN_K", self.max_explain_k)
        _require_positive("HISTOXPLAIN_WORKER_THREADS", self.worker_threads)
        _require_positive("HISTOXPLAIN_HEALTH_INTERVAL_S", self.health_interval_s)
        if self.grace_period_s < 0:
            raise InvalidRequest(f"HISTOXPLAIN_GRACE_PERIOD_S={self.grace_period_s} must be >= 0")
        if self.default_deadline_s > self.max_deadline_s:
            raise InvalidRequest(
                f"HISTOXPLAIN_DEFAULT_DEADLINE_S={self.default_deadline_s} is above "
                f"HISTOXPLAIN_MAX_DEADLINE_S={self.max_deadline_s}; lower it or raise the maximum"
            )

    @property
    def address(self) -> str:
        """``host:port`` the server binds (IPv6 literals bracketed)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    def deadline_for(self, time_remaining: float | None) -> float:
        """The deadline (seconds) one call gets: the client's remaining time, capped.

        Args:
            time_remaining: ``context.time_remaining()``; ``None`` when the client set none.
        """
        if time_remaining is None:
            return self.default_deadline_s
        return max(0.0, min(time_remaining, self.max_deadline_s))

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, core: Settings | None = None
    ) -> GatewaySettings:
        """Read ``HISTOXPLAIN_*`` gateway variables (and the core settings) once.

        Args:
            environ: the environment to read; ``os.environ`` when omitted.
            core: core settings already read; ``Settings.from_env()`` when omitted.
        """
        env = os.environ if environ is None else environ
        if core is None:
            core = Settings.from_env()
        key_file = env.get("HISTOXPLAIN_TORCHSERVE_KEY_FILE", "").strip()
        return cls(
            core=core,
            host=env.get("HISTOXPLAIN_HOST", cls.host).strip() or cls.host,
            port=_int(env, "HISTOXPLAIN_PORT", cls.port),
            backend=env.get("HISTOXPLAIN_BACKEND", cls.backend).strip().lower(),  # type: ignore[arg-type]
            torchserve_address=env.get("HISTOXPLAIN_TORCHSERVE_ADDRESS", cls.torchserve_address).strip(),
            torchserve_key_file=Path(key_file) if key_file else None,
            torchserve_model=env.get("HISTOXPLAIN_TORCHSERVE_MODEL", cls.torchserve_model).strip(),
            max_message_bytes=int(
                _float(env, "HISTOXPLAIN_MAX_MESSAGE_MB", cls.max_message_bytes / _MIB) * _MIB
            ),
            default_deadline_s=_float(env, "HISTOXPLAIN_DEFAULT_DEADLINE_S", cls.default_deadline_s),
            max_deadline_s=_float(env, "HISTOXPLAIN_MAX_DEADLINE_S", cls.max_deadline_s),
            max_k=_int(env, "HISTOXPLAIN_MAX_K", cls.max_k),
            max_explain_k=_int(env, "HISTOXPLAIN_MAX_EXPLAIN_K", cls.max_explain_k),
            worker_threads=_int(env, "HISTOXPLAIN_WORKER_THREADS", cls.worker_threads),
            grace_period_s=_float(env, "HISTOXPLAIN_GRACE_PERIOD_S", cls.grace_period_s),
            health_interval_s=_float(env, "HISTOXPLAIN_HEALTH_INTERVAL_S", cls.health_interval_s),
        )


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest(f"{name}={raw!r} is not an integer") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise InvalidRequest(f"{name}={raw!r} is not a number") from None


def _require_positive(name: str, value: float) -> None:
    if value <= 0:
        raise InvalidRequest(f"{name}={value} must be > 0")
