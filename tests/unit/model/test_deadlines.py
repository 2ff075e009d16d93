"""histoxplain_model.deadlines: the deadline and stop signal that work checks between its units."""

from __future__ import annotations

import threading
import time

import pytest

from histoxplain_model.deadlines import check_deadline, deadline, stop_requested, time_left
from histoxplain_model.errors import Cancelled, DeadlineExceeded


def test_no_block_means_no_deadline_and_no_stop() -> None:
    check_deadline()
    assert time_left() is None and not stop_requested()


def test_a_passed_deadline_stops_the_work() -> None:
    with deadline(time.time() - 1), pytest.raises(DeadlineExceeded):
        check_deadline()


def test_a_set_stop_signal_stops_the_work_before_its_deadline() -> None:
    stop = threading.Event()
    with deadline(time.time() + 60, stop):
        check_deadline()
        stop.set()
        assert stop_requested()
        with pytest.raises(Cancelled):
            check_deadline()


def test_an_inner_block_never_extends_the_outer_deadline_and_keeps_its_stop_signal() -> None:
    stop = threading.Event()
    with deadline(time.time() + 1, stop):
        with deadline(time.time() + 100):
            remaining = time_left()
            assert remaining is not None and remaining <= 1
            stop.set()
            assert stop_requested()
        with deadline(None):
            assert time_left() is not None
    assert time_left() is None and not stop_requested()


def test_each_thread_keeps_its_own_deadline() -> None:
    seen: list[float | None] = []
    with deadline(time.time() + 5):
        thread = threading.Thread(target=lambda: seen.append(time_left()))
        thread.start()
        thread.join()
    assert seen == [None]
