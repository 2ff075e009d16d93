"""Retry policy: exponential backoff with full jitter, on UNAVAILABLE only.

UNAVAILABLE means the request was not served (gateway restarting, model server or Qdrant
down), so repeating it is safe: every RPC of the API is idempotent (indexing the same image id
replaces it). Any other code is final: an INVALID_ARGUMENT stays invalid, and a
DEADLINE_EXCEEDED call may still be running on the server.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

__all__ = ["NO_RETRY", "RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` calls in all (1: no retry); before attempt n+1 the client sleeps a
    uniform random time in [0, min(max_backoff, initial_backoff * multiplier**(n-1))] seconds
    ("full jitter", so that many clients do not retry in lock step). Retries never run past
    the call's timeout."""

    max_attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to sleep after failed attempt ``attempt`` (1-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return (rng or random).uniform(0.0, ceiling)

    def should_retry(self, code: grpc.StatusCode, attempt: int) -> bool:
        """Whether failed attempt ``attempt`` (1-based) with status ``code`` is tried again."""
        return code == grpc.StatusCode.UNAVAILABLE and attempt < self.max_attempts


NO_RETRY = RetryPolicy(max_attempts=1)
