"""Connection settings shared by Client and AsyncClient: credentials, channel options, metadata."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE = "histoxplain.v1.RetrievalService"


@dataclass(frozen=True)
class ConnectionSettings:
    """How to reach the gateway. ``root_certificates`` (PEM bytes or a file path) turns TLS on;
    ``tls=True`` alone uses the system's trusted roots. ``token`` is sent on every call as
    ``authorization: Bearer <token>`` (use TLS when the gateway is not on loopback)."""

    target: str = DEFAULT_TARGET
    tls: bool = False
    root_certificates: bytes | str | os.PathLike | None = None
    token: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    extra_options: tuple[tuple[str, int | str], ...] = ()

    def __post_init__(self) -> None:
        if self.max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be > 0, got {self.max_message_bytes}")
        if self.token is not None and (not self.token or "\n" in self.token):
            raise ValueError("token must be a non-empty single-line string")

    @property
    def secure(self) -> bool:
        return self.tls or self.root_certificates is not None

    def credentials(self) -> grpc.ChannelCredentials:
        roots = self.root_certificates
        if roots is not None and not isinstance(roots, bytes):
            roots = Path(roots).read_bytes()
        return grpc.ssl_channel_credentials(root_certificates=roots)

    def options(self) -> list[tuple[str, int | str]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            *self.extra_options,
        ]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def open_channel(settings: ConnectionSettings) -> grpc.Channel:
    """A synchronous channel for ``settings`` (TLS when configured)."""
    if settings.secure:
        return grpc.secure_channel(settings.target, settings.credentials(), settings.options())
    return grpc.insecure_channel(settings.target, settings.options())
