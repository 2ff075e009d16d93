"""The background PACS writer's bounds, retries, failures and shutdown, against a PACS that is
down (a loopback port nothing listens on: the real HTTP client gets a refused connection).
Stores that succeed, and a PACS going down under a queued set, are tested with a real Orthanc
in tests/integration/test_pacs.py and test_pacs_gateway.py."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest

from histoxplain_model.errors import ResourceExhausted
from histoxplain_model.limits import MAX_BACKGROUND_STORES
from histoxplain_service.pacs.connection import PacsConnection
from histoxplain_service.pacs.dicomweb import DicomWeb
from histoxplain_service.pacs.writeback import BackgroundWriter, WriteBackCounts

STUDY = "1.2.826.0.1.3680043.8.498.77"  # a study UID: must never reach a log


@pytest.fixture
def down() -> Iterator[DicomWeb]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pacs = DicomWeb(PacsConnection(f"http://127.0.0.1:{port}/dicom-web", "histoxplain", "x", timeout_s=2))
    yield pacs
    pacs.close()


def test_a_full_writer_refuses_before_any_work_and_a_released_place_is_free_again() -> None:
    writer = BackgroundWriter(capacity=2)
    first, second = writer.reserve(), writer.reserve()
    with pytest.raises(ResourceExhausted, match="limit of 2 results"):
        writer.reserve()
    assert writer.counts() == WriteBackCounts(waiting=2, stored=0, failed=0)
    first.release()
    first.release()  # twice: still one place
    third = writer.reserve()
    assert writer.counts().waiting == 2
    second.release()
    third.release()
    assert writer.close(1.0) == WriteBackCounts(0, 0, 0)
    with pytest.raises(ResourceExhausted, match="shutting down"):
        writer.reserve()
    assert BackgroundWriter().capacity == MAX_BACKGROUND_STORES


def test_an_unavailable_pacs_is_retried_then_counted_and_logged_without_the_study(
    down: DicomWeb, caplog: pytest.LogCaptureFixture
) -> None:
    writer = BackgroundWriter(attempts=3, backoff_s=0.01)
    built = []

    def build() -> list[bytes]:
        built.append(1)
        return [b"not sent: the PACS is down"]

    with caplog.at_level(logging.INFO, logger="histoxplain_service.pacs"):
        writer.reserve().submit(build, down, STUDY)
        assert writer.wait_idle(30)
    assert writer.counts() == WriteBackCounts(waiting=0, stored=0, failed=1)
    assert built == [1]  # built once, sent three times
    assert "1 objects not stored after 3 attempts (DependencyUnavailable)" in caplog.text
    assert caplog.text.count("attempt 1 of 3; retrying") == 1 and STUDY not in caplog.text
    writer.close(1.0)


def test_a_set_that_cannot_be_built_is_not_retried(down: DicomWeb, caplog: pytest.LogCaptureFixture) -> None:
    writer = BackgroundWriter(attempts=3, backoff_s=0.01)

    def build() -> list[bytes]:
        raise ValueError(f"no frame of reference in {STUDY}")

    with caplog.at_level(logging.INFO, logger="histoxplain_service.pacs"):
        writer.reserve().submit(build, down, STUDY)
        assert writer.wait_idle(30)
    assert writer.counts() == WriteBackCounts(0, 0, 1)
    assert "could not be built (ValueError)" in caplog.text and STUDY not in caplog.text
    writer.close(1.0)


def test_shutdown_gives_up_a_set_still_retrying_at_the_end_of_its_grace(down: DicomWeb) -> None:
    writer = BackgroundWriter(attempts=100, backoff_s=30.0)
    writer.reserve().submit(lambda: [b"x"], down, STUDY)
    time.sleep(0.2)  # its first attempt failed: it waits 30 s before the next
    started = time.monotonic()
    assert writer.close(0.5) == WriteBackCounts(0, 0, 1)
    assert time.monotonic() - started < 5


def test_a_set_is_built_only_after_the_start_delay_so_the_response_leaves_first(down: DicomWeb) -> None:
    writer = BackgroundWriter(attempts=1, start_delay_s=0.3)
    built: list[float] = []

    def build() -> list[bytes]:
        built.append(time.monotonic())
        raise ValueError("nothing to store")  # counted as failed: the timing is what is checked

    queued = time.monotonic()
    writer.reserve().submit(build, down, STUDY)
    assert writer.wait_idle(10.0)
    assert len(built) == 1 and built[0] - queued >= 0.3
    started = time.monotonic()
    waiting = BackgroundWriter(start_delay_s=30.0)
    waiting.reserve().submit(build, down, STUDY)
    assert waiting.close(0.1) == WriteBackCounts(0, 0, 1)  # a close past its grace ends the delay at once
    assert time.monotonic() - started < 5 and len(built) == 1
    assert writer.close(1.0).failed == 1
