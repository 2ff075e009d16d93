"""Connection settings shared by Client and AsyncClient: credentials, channel options, metadata."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE = "histoxplain.v1.RetrievalService"

PemSource = bytes | str | os.PathLike
#: Returns the bearer token to send; called before every call (and every retry).
TokenProvider = Callable[[], str]


def _pem(source: PemSource | None) -> bytes | None:
    """PEM bytes as given, or read from a path (str or PathLike)."""
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def _check_token(token: object) -> str:
    if not isinstance(token, str) or not token or "\n" in token:
        raise ValueError("the token must be a non-empty single-line string")
    return token


@dataclass(frozen=True)
class ConnectionSettings:
    """How to reach the gateway. ``root_certificates`` (PEM bytes or a file path) turns TLS on;
    ``tls=True`` alone uses the system's trusted roots. ``client_certificate`` and
    ``client_key`` (PEM bytes or paths, both or neither) present a client certificate (mutual
    TLS). ``token`` is sent on every call as ``authorization: Bearer <token>``; for tokens that
    expire (JWTs) pass ``token_provider`` instead, a callable asked for the token before every
    call. Use TLS when the gateway is not on loopback: a bearer token is a password."""

    target: str = DEFAULT_TARGET
    tls: bool = False
    root_certificates: PemSource | None = None
    token: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    extra_options: tuple[tuple[str, int | str], ...] = ()
    client_certificate: PemSource | None = None
    client_key: PemSource | None = None
    token_provider: TokenProvider | None = None

    def __post_init__(self) -> None:
        if self.max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be > 0, got {self.max_message_bytes}")
        if self.token is not None:
            _check_token(self.token)
        if self.token is not None and self.token_provider is not None:
            raise ValueError("pass token (a fixed token) or token_provider (a callable), not both")
        if self.token_provider is not None and not callable(self.token_provider):
            raise TypeError("token_provider must be a callable that returns the token")
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("client_certificate and client_key go together (mutual TLS): pass both or neither")

    @property
    def secure(self) -> bool:
        return self.tls or self.root_certificates is not None or self.client_certificate is not None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates),
            private_key=_pem(self.client_key),
            certificate_chain=_pem(self.client_certificate),
        )

    def options(self) -> list[tuple[str, int | str]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            *self.extra_options,
        ]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of one call: the bearer token, asked for now when it comes from a provider."""
        token = _check_token(self.token_provider()) if self.token_provider is not None else self.token
        return (("authorization", f"Bearer {token}"),) if token else ()


def open_channel(settings: ConnectionSettings) -> grpc.Channel:
    """A synchronous channel for ``settings`` (TLS when configured)."""
    if settings.secure:
        return grpc.secure_channel(settings.target, settings.credentials(), settings.options())
    return grpc.insecure_channel(settings.target, settings.options())
