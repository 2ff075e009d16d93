"""Background write-back of region results into the PACS: the response first, the objects after.

A region explanation that stores its results synchronously waits for the Parametric Map, SR and
KOS to be built and for the PACS to take them (STOW-RS). With :class:`BackgroundWriter` the
caller gets the objects' UIDs at once (generated before anything is built, marked *queued*),
and one thread per process builds and stores them, the way PACS AI-results pipelines write
back (MONAI Deploy Informatics Gateway, Kaapana: job -> results -> STOW-RS, decoupled from the
request).

Bounded
    At most ``capacity`` results (:data:`~histoxplain_model.limits.MAX_BACKGROUND_STORES`) wait
    or are being written. A request takes its place (:class:`Place`) with :meth:`BackgroundWriter.reserve`
    *before* its work starts, so a full writer refuses it at once with RESOURCE_EXHAUSTED (a
    PACS that cannot keep up slows no one's explanation and loses none: the caller retries, or
    stores synchronously), and a place taken is never lost to a later request.

Retries, all or nothing
    A set is stored in one STOW-RS request (:meth:`~histoxplain_service.pacs.dicomweb.DicomWeb.store`);
    when the PACS is unavailable (UNAVAILABLE: down, failing, or refusing some objects) the same
    bytes, with the same UIDs, are sent again after a growing pause (``backoff_s``, doubled each
    time, ``attempts`` in all). Sending an instance again replaces it, so a retry never
    duplicates one. Refused credentials, or a set that cannot be built, are not retried.

Shutdown
    :meth:`BackgroundWriter.close` refuses new results and waits for the queue to drain, at most
    ``timeout`` seconds (the gateway's grace period); what is left then (a result waiting, a
    pause between retries) is given up and counted as failed. A STOW-RS request under way is
    not interrupted (its HTTP timeout bounds it).

Threads
    The writer's thread is started by the first :meth:`BackgroundWriter.reserve`, from the
    calling thread (so it shares that thread's network namespace, as Orthanc's private one in
    the tests). Building the objects is pure Python (highdicom, pydicom) and holds the GIL: begun
    at once, it would slow the response that queued them (the interpreter hands the GIL between
    threads every 5 ms), so the writer starts a set ``start_delay_s`` after it was queued (50 ms:
    the response is serialised and sent by then; the objects land that much later).

Counted and logged
    :meth:`BackgroundWriter.counts` says how many results are waiting, were stored and failed;
    each outcome is logged with the number of objects, the attempts and the error's class only:
    never a UID, a study, a patient or the PACS's message.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from histoxplain_model.errors import DependencyUnavailable, ResourceExhausted
from histoxplain_model.limits import MAX_BACKGROUND_STORES

if TYPE_CHECKING:
    from histoxplain_service.pacs.dicomweb import DicomWeb

__all__ = ["BackgroundWriter", "Place", "WriteBackCounts"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteBackCounts:
    """``waiting``: results queued or being written; ``stored`` / ``failed``: sets written / given up."""

    waiting: int
    stored: int
    failed: int


@dataclass
class _Job:
    build: Callable[[], list[bytes]]
    pacs: DicomWeb
    study_uid: str
    queued: float  # time.monotonic() when it was queued


class Place:
    """A place in a :class:`BackgroundWriter`'s queue, taken by :meth:`BackgroundWriter.reserve`:
    :meth:`submit` a result set into it, or :meth:`release` it."""

    def __init__(self, writer: BackgroundWriter) -> None:
        self._writer: BackgroundWriter | None = writer

    def submit(self, build: Callable[[], list[bytes]], pacs: DicomWeb, study_uid: str) -> None:
        """Queue a set: ``build`` (run on the writer's thread) gives the encoded objects
        (:func:`~histoxplain_service.pacs.dicomweb.encode`), stored in ``study_uid`` in one request."""
        writer, self._writer = self._writer, None
        if writer is None:
            raise ValueError("this place was already used or released")
        writer._jobs.put(_Job(build, pacs, study_uid, time.monotonic()))  # noqa: SLF001 -- the place's own writer

    def release(self) -> None:
        """Give the place back (no-op once used or released)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer._free()  # noqa: SLF001 -- the place's own writer


class BackgroundWriter:
    """Stores result sets in the PACS on one thread of its own (see the module docstring)."""

    def __init__(
        self, capacity: int = MAX_BACKGROUND_STORES, attempts: int = 4, backoff_s: float = 0.5,
        start_delay_s: float = 0.05,
    ) -> None:
        if capacity < 1 or attempts < 1 or backoff_s < 0 or start_delay_s < 0:
            raise ValueError(
                "a background writer needs capacity >= 1, attempts >= 1, backoff_s >= 0 and start_delay_s >= 0"
            )
        self.capacity, self.attempts, self.backoff_s = capacity, attempts, backoff_s
        self.start_delay_s = start_delay_s
        self._jobs: queue.Queue[_Job | None] = queue.Queue()  # bounded by the places
        self._lock = threading.Lock()
        self._taken = 0
        self._stored = 0
        self._failed = 0
        self._closing = False
        self._give_up = threading.Event()  # shutdown past its grace: no more pauses or attempts
        self._thread: threading.Thread | None = None

    def reserve(self) -> Place:
        """A place for one result set.

        Raises:
            ResourceExhausted: ``capacity`` sets are waiting, or the writer is closing.
        """
        with self._lock:
            if self._closing:
                raise ResourceExhausted(
                    "the server is shutting down and stores no more results in the background; retry on another "
                    "instance, or store synchronously"
                )
            if self._taken >= self.capacity:
                raise ResourceExhausted(
                    f"the background PACS write-back holds its limit of {self.capacity} results; retry later, or "
                    "store synchronously (store_mode SYNCHRONOUS)"
                )
            self._taken += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pacs-writeback", daemon=True)
                self._thread.start()
        return Place(self)

    def counts(self) -> WriteBackCounts:
        with self._lock:
            return WriteBackCounts(self._taken, self._stored, self._failed)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is waiting (at most ``timeout`` s); True if so."""
        end = time.monotonic() + timeout
        while self.counts().waiting:
            if time.monotonic() >= end:
                return False
            time.sleep(0.002)
        return True

    def close(self, timeout: float) -> WriteBackCounts:
        """Refuse new sets, store what is queued within ``timeout`` seconds, give up the rest
        (counted as failed). Returns the final counts."""
        with self._lock:
            self._closing = True
            thread = self._thread
        if thread is not None:
            self._jobs.put(None)
            thread.join(max(0.0, timeout))
            if thread.is_alive():
                self._give_up.set()
                thread.join(1.0)  # a pause ends at once; a STOW-RS under way ends by its HTTP timeout
        left = 0
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                left += 1
                self._finish(stored=False)
        if left:
            log.warning("background store: %d result sets not stored, the server stopped before their turn", left)
        return self.counts()

    def _free(self) -> None:
        with self._lock:
            self._taken -= 1

    def _finish(self, stored: bool) -> None:
        with self._lock:
            self._taken -= 1
            if stored:
                self._stored += 1
            else:
                self._failed += 1

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            # let the response that queued it leave first (module docstring, "Threads"); close()
            # past its grace ends the wait at once
            self._give_up.wait(max(0.0, job.queued + self.start_delay_s - time.monotonic()))
            if self._give_up.is_set():
                self._jobs.put(job)  # left for close() to count
                return
            self._finish(stored=self._write(job))

    def _write(self, job: _Job) -> bool:
        try:
            parts = job.build()
        except Exception as error:  # noqa: BLE001 -- any failure is this set's, counted and logged
            log.error("background store failed: the result objects could not be built (%s)", type(error).__name__)
            return False
        pause = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                job.pacs.store(parts, job.study_uid)
            except DependencyUnavailable as error:
                if attempt == self.attempts or self._give_up.wait(pause):
                    log.error(
                        "background store failed: %d objects not stored after %d attempts (%s)",
                        len(parts), attempt, type(error).__name__,
                    )
                    return False
                log.warning("background store: the PACS is unavailable, attempt %d of %d; retrying", attempt, self.attempts)
                pause *= 2
            except Exception as error:  # noqa: BLE001 -- refused credentials and the like: not retried
                log.error("background store failed: %d objects not stored (%s)", len(parts), type(error).__name__)
                return False
            else:
                log.info("background store: %d objects stored (attempt %d)", len(parts), attempt)
                return True
        return False
