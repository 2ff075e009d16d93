"""The IndexImages inbox (gateway/streams.py): bounded in images and bytes, and its consumer stops
on a failed stream, a cancelled call and a passed deadline."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from histoxplain_model.deadlines import deadline
from histoxplain_model.errors import Cancelled, DeadlineExceeded
from histoxplain_service.gateway.streams import Inbox


def _consume(inbox: Inbox[int], taken: list[int], release: threading.Event, error: list[BaseException]) -> None:
    """Take one item, wait for ``release``, then take the rest."""
    try:
        items = inbox.drain()
        taken.append(next(items))
        release.wait(10)
        taken.extend(items)
    except BaseException as exc:  # noqa: BLE001 -- handed to the test
        error.append(exc)


async def _put_all(inbox: Inbox[int], sizes: list[int]) -> list[float]:
    """Put item i with ``sizes[i]`` bytes; the times each put returned."""
    done = []
    for item, size in enumerate(sizes):
        await inbox.put(item, size)
        done.append(time.monotonic())
    inbox.close()
    return done


def _run_with_consumer(inbox_args: tuple[int, int], sizes: list[int], hold_s: float) -> tuple[list[int], list[float], float]:
    async def main() -> tuple[list[int], list[float], float]:
        inbox: Inbox[int] = Inbox(asyncio.get_running_loop(), *inbox_args)
        taken: list[int] = []
        release, error = threading.Event(), []
        consumer = threading.Thread(target=_consume, args=(inbox, taken, release, error))
        consumer.start()
        timer = asyncio.get_running_loop().call_later(hold_s, release.set)
        released_at = time.monotonic() + hold_s
        done = await _put_all(inbox, sizes)
        timer.cancel()
        release.set()
        await asyncio.to_thread(consumer.join, 10)
        assert not error, error
        return taken, done, released_at

    return asyncio.run(main())


def test_put_waits_while_the_inbox_holds_its_image_limit() -> None:
    # The consumer takes item 0 and holds; items 1 and 2 fill max_items=2; item 3 must wait.
    taken, done, released_at = _run_with_consumer((2, 10_000), [10, 10, 10, 10], hold_s=0.5)
    assert taken == [0, 1, 2, 3]
    assert done[2] < released_at - 0.2  # fitted
    assert done[3] >= released_at - 0.05  # waited for the consumer


def test_put_waits_while_the_inbox_holds_its_byte_limit_but_always_admits_one() -> None:
    # Item 1 (600 bytes) fits the empty inbox even though max_bytes is 500; item 2 must wait.
    taken, done, released_at = _run_with_consumer((10, 500), [10, 600, 10], hold_s=0.5)
    assert taken == [0, 1, 2]
    assert done[1] < released_at - 0.2
    assert done[2] >= released_at - 0.05


def _drain_in_thread(inbox: Inbox[int], *, at: float | None = None, stop: threading.Event | None = None) -> list[BaseException]:
    error: list[BaseException] = []

    def consume() -> None:
        with deadline(at, stop):
            try:
                list(inbox.drain())
            except BaseException as exc:  # noqa: BLE001 -- handed to the test
                error.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "the consumer did not stop"
    return error


@pytest.fixture()
def inbox() -> Iterator[Inbox[int]]:
    loop = asyncio.new_event_loop()
    try:
        yield Inbox(loop, 4, 1000)
    finally:
        loop.close()


def test_an_abandoned_stream_stops_its_consumer_with_cancelled(inbox: Inbox[int]) -> None:
    inbox.abandon()
    (error,) = _drain_in_thread(inbox)
    assert isinstance(error, Cancelled)


def test_a_waiting_consumer_stops_at_its_deadline(inbox: Inbox[int]) -> None:
    (error,) = _drain_in_thread(inbox, at=time.time() + 0.3)
    assert isinstance(error, DeadlineExceeded)


def test_a_waiting_consumer_stops_when_its_call_is_cancelled(inbox: Inbox[int]) -> None:
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    (error,) = _drain_in_thread(inbox, stop=stop)
    assert isinstance(error, Cancelled)


def test_a_closed_inbox_ends_the_iteration(inbox: Inbox[int]) -> None:
    inbox.close()
    assert _drain_in_thread(inbox) == []
