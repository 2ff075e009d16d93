"""What Client and AsyncClient share: settings, per-call timeouts and the retry schedule."""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Iterator
from typing import Any

from histoxplain_client._channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    ConnectionSettings,
    PemSource,
    TokenProvider,
)
from histoxplain_client.retry import RetryPolicy


class _Default(enum.Enum):
    TIMEOUT = "client default"


DEFAULT = _Default.TIMEOUT
Timeout = float | None | _Default


class ClientBase:
    """Constructor and call policy of both clients; subclasses open their kind of channel."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel_options: tuple[tuple[str, int | str], ...] = (),
        token_provider: TokenProvider | None = None,
        client_certificate: PemSource | None = None,
        client_key: PemSource | None = None,
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        self._settings = ConnectionSettings(
            target=target,
            tls=tls,
            root_certificates=root_certificates,
            token=token,
            max_message_bytes=max_message_bytes,
            extra_options=tuple(channel_options),
            client_certificate=client_certificate,
            client_key=client_key,
            token_provider=token_provider,
        )
        self._timeout = timeout
        self._retry = retry if retry is not None else RetryPolicy()
        self._open_channel()

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata of the call about to be made: read per call (and per retry) so that a
        ``token_provider`` can hand out a fresh JWT before the old one expires."""
        return self._settings.metadata()

    def _open_channel(self) -> None:
        raise NotImplementedError

    @property
    def target(self) -> str:
        return self._settings.target

    def _deadline(self, timeout: Timeout) -> float | None:
        """Monotonic deadline of a whole call, retries included (None: no deadline)."""
        seconds = self._timeout if timeout is DEFAULT else timeout
        if seconds is not None and seconds <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {seconds}")
        return None if seconds is None else time.monotonic() + seconds

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        return None if deadline is None else max(deadline - time.monotonic(), 0.0)

    def _retry_delay(self, code: object, attempt: int, deadline: float | None, retryable: bool) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None when the failure is final."""
        if not retryable or not self._retry.should_retry(code, attempt):  # type: ignore[arg-type]
            return None
        delay = self._retry.backoff(attempt)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay


class CapturingIterator(Iterator[Any]):
    """Remembers an exception raised while producing requests: grpc consumes the iterator in
    its own thread and only reports CANCELLED, so the caller re-raises the original error."""

    def __init__(self, requests: Iterator[Any]) -> None:
        self._requests = requests
        self.error: Exception | None = None

    def __next__(self) -> Any:
        try:
            return next(self._requests)
        except StopIteration:
            raise
        except Exception as error:
            self.error = error
            raise
