"""The deadline and the stop signal of the work running in this thread, checked between units.

Gradient work cannot be interrupted from outside, and a gateway whose caller has gone cannot
stop a worker thread: the work has to stop itself. Work runs under ``with deadline(at, stop)``;
the explainers, SmoothGrad's noisy chunks and the indexing loop call :func:`check_deadline`
between their units of work (one backward pass, one chunk, one embedding batch), so work whose
caller gave up, cancelled, or whose server is shutting down ends within one unit instead of
running to the end. The values live in context variables, so concurrent work on other threads
keeps its own.

Deadlines are wall-clock seconds (``time.time()``), so the gateway can hand one to a
TorchServe worker in the same pod; the stop signal (a :class:`threading.Event` the gateway sets
when the call is cancelled) stays in the process. Torch-free.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from histoxplain_model.errors import Cancelled, DeadlineExceeded

__all__ = ["check_deadline", "deadline", "stop_requested", "time_left"]

_DEADLINE: ContextVar[float | None] = ContextVar("histoxplain_deadline", default=None)
_STOP: ContextVar[threading.Event | None] = ContextVar("histoxplain_stop", default=None)


@contextmanager
def deadline(at: float | None, stop: threading.Event | None = None) -> Iterator[None]:
    """Work in this block stops at :func:`check_deadline` once ``time.time()`` passes ``at``
    or once ``stop`` is set. A block never extends its enclosing one: the earlier deadline
    holds, ``None`` keeps the enclosing deadline and stop signal."""
    enclosing = _DEADLINE.get()
    if enclosing is not None:
        at = enclosing if at is None else min(at, enclosing)
    token = _DEADLINE.set(at)
    stop_token = _STOP.set(stop) if stop is not None else None
    try:
        yield
    finally:
        if stop_token is not None:
            _STOP.reset(stop_token)
        _DEADLINE.reset(token)


def stop_requested() -> bool:
    """True once this block's caller has cancelled the work."""
    stop = _STOP.get()
    return stop is not None and stop.is_set()


def time_left() -> float | None:
    """Seconds left before this block's deadline (at least 0); ``None`` without a deadline."""
    at = _DEADLINE.get()
    return None if at is None else max(0.0, at - time.time())


def check_deadline() -> None:
    """Raise :class:`Cancelled` if this block's caller cancelled it, :class:`DeadlineExceeded`
    if its deadline has passed."""
    if stop_requested():
        raise Cancelled("the request was cancelled (by its caller, or the server is shutting down); its work stopped")
    at = _DEADLINE.get()
    if at is not None and time.time() >= at:
        raise DeadlineExceeded("the work ran past the request's deadline and was stopped; retry with a longer deadline")
