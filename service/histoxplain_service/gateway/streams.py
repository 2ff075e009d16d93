"""A bounded hand-over from a request stream (event loop) to the work consuming it (a worker thread).

IndexImages indexes images while they arrive: the event loop reads the client's stream and
:meth:`Inbox.put` s each image; the indexing thread iterates :meth:`Inbox.drain`. At most
``max_items`` images and ``max_bytes`` bytes wait in between (one image is always admitted, so a
message at the size limit still passes); beyond that :meth:`Inbox.put` waits, the gateway stops
reading, and gRPC's flow control makes the client wait too. A stream's memory on the gateway is
therefore bounded by the buffer plus the image being indexed, whatever its length.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

from histoxplain_model.deadlines import check_deadline
from histoxplain_model.errors import Cancelled

__all__ = ["Inbox"]

T = TypeVar("T")

#: How often a waiting consumer looks at its caller's stop signal and deadline.
_POLL_S = 0.1


class Inbox(Generic[T]):
    """Items from the event loop to one consuming thread, bounded in count and bytes.

    Args:
        loop: the event loop that calls :meth:`put` and :meth:`close`.
        max_items: items that may wait at once (at least 1).
        max_bytes: bytes that may wait at once; one item is admitted whatever its size.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_items: int, max_bytes: int) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError("max_items and max_bytes must be >= 1")
        self._loop = loop
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._lock = threading.Condition()
        self._items: deque[tuple[T, int]] = deque()
        self._bytes = 0
        self._closed = False
        self._abandoned = False
        self._space = asyncio.Event()
        self._space.set()

    async def put(self, item: T, size: int) -> None:
        """Hand over ``item`` (``size`` bytes), waiting while the inbox is full."""
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError("put on a closed inbox")
                fits = len(self._items) < self._max_items and self._bytes + size <= self._max_bytes
                if fits or not self._items:
                    self._items.append((item, size))
                    self._bytes += size
                    self._lock.notify()
                    return
                self._space.clear()
            await self._space.wait()

    def close(self) -> None:
        """The stream ended: the consumer gets what is left, then its iteration ends."""
        with self._lock:
            self._closed = True
            self._lock.notify()

    def abandon(self) -> None:
        """The stream failed (a malformed message): the consumer stops with :class:`Cancelled`
        at its next item, so what it had not finished is rolled back."""
        with self._lock:
            self._closed = True
            self._abandoned = True
            self._items.clear()
            self._bytes = 0
            self._lock.notify()

    def drain(self) -> Iterator[T]:
        """The items in order, for the consuming thread; while waiting, it stops on its caller's
        cancellation or deadline (``histoxplain_model.deadlines``)."""
        while True:
            with self._lock:
                while not self._items and not self._closed:
                    self._lock.wait(_POLL_S)
                    check_deadline()
                if self._abandoned:
                    raise Cancelled("the request stream failed; nothing after the last finished image was kept")
                if not self._items:
                    return
                item, size = self._items.popleft()
                self._bytes -= size
            try:
                self._loop.call_soon_threadsafe(self._space.set)
            except RuntimeError:  # the loop has closed: nobody is waiting to put
                pass
            yield item
