"""The deadline of the explanation running in this thread, checked between units of work.

Gradient work cannot be interrupted from outside, and a gateway whose caller has gone cannot
stop a worker thread: the work has to stop itself. :func:`explain_retrieval` runs under
``with deadline(request.deadline)``; the explainers call :func:`check_deadline` between their
backward passes and SmoothGrad's noisy chunks, so work whose caller gave up ends within one
unit of work (one backward pass, one chunk) instead of running to the end. The value lives in a
context variable, so concurrent explanations on other threads keep their own.

Deadlines are wall-clock seconds (``time.time()``), so the gateway can hand one to a
TorchServe worker in the same pod. Torch-free.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from histoxplain_model.errors import DeadlineExceeded

__all__ = ["check_deadline", "deadline"]

_DEADLINE: ContextVar[float | None] = ContextVar("histoxplain_deadline", default=None)


@contextmanager
def deadline(at: float | None) -> Iterator[None]:
    """Work in this block stops at :func:`check_deadline` once ``time.time()`` passes ``at``
    (``None``: no deadline)."""
    token = _DEADLINE.set(at)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check_deadline() -> None:
    """Raise :class:`DeadlineExceeded` if this block's deadline has passed."""
    at = _DEADLINE.get()
    if at is not None and time.time() >= at:
        raise DeadlineExceeded("the explanation ran past the request's deadline and was stopped; retry with a longer deadline")
