"""Index the new slides of any PACS by polling QIDO-RS, for PACS without an indexing trigger.

Orthanc runs :mod:`.orthanc_trigger` on its stable-study event; other PACS (dcm4chee, a cloud
DICOM store, ...) are watched instead: :func:`poll_once` asks QIDO-RS for the studies that hold
VL Whole Slide Microscopy images (``ModalitiesInStudy=SM``), lists each study's ``SM`` series,
and hands the series not yet in the state to an :data:`Indexer` (the gateway's ``IndexDicom``, or
the library in this process). The first poll looks at every study (or those dated from
``since``); once a poll has gone through the whole list, the state remembers the day before it,
and later polls ask only for studies dated from then on (``StudyDate`` range matching). A study
stored later with an older date is missed: start again with an earlier ``since`` (``--since``). The command is
``histoxplain pacs-watch`` (:mod:`histoxplain_service.app.pacs_watch`).

Bounded
    One poll examines at most ``max_studies`` studies (a cursor in the state moves through longer
    lists over several polls) and hands over at most ``max_series`` series; the rest waits for
    the next poll.

Durable
    :class:`WatchState` lives in a JSON file written atomically (a temporary file, fsync, rename;
    mode 0600: it holds UIDs) after every series handed over, so a watcher stopped at any moment
    neither loses nor repeats finished work. A series the indexer refuses for good (not a slide,
    gone from the PACS) is remembered as refused and not offered again; one that failed because
    something was unavailable is offered again at the next poll.

Log lines count series and studies; they never name a UID or a patient.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from histoxplain_model.errors import Cancelled, DeadlineExceeded, DependencyUnavailable, InvalidRequest, NotFound
from histoxplain_service.pacs.connection import pacs_errors
from histoxplain_service.pacs.dicomweb import DicomWeb

__all__ = ["Indexer", "PollResult", "WatchState", "poll_once", "watch"]

log = logging.getLogger(__name__)

#: Index these slide series of a study. Raises InvalidRequest / NotFound to refuse them for good,
#: DependencyUnavailable, Cancelled or DeadlineExceeded to have them offered again.
Indexer = Callable[[str, Sequence[str]], None]

_STUDY = "0020000D"
_SERIES = "0020000E"
_STATE_VERSION = 1


@dataclass
class WatchState:
    """What the watcher has done, kept in ``path``.

    Attributes:
        done: study UID -> its series UIDs indexed or refused for good.
        since: the study date (``YYYYMMDD``) the next poll starts from, or ``None``: all dates.
        cursor: the QIDO-RS offset the next poll starts at (lists longer than one poll).
    """

    path: Path
    done: dict[str, list[str]] = field(default_factory=dict)
    since: str | None = None
    cursor: int = 0

    @classmethod
    def load(cls, path: Path, since: str | None = None) -> WatchState:
        """The state in ``path`` (a new one if there is none); ``since`` (``YYYYMMDD``) replaces
        the remembered day, e.g. to look again at older studies.

        Raises:
            InvalidRequest: the file is not a state file of this version.
        """
        path = Path(path)
        if not path.exists():
            return cls(path, since=since)
        try:
            content = json.loads(path.read_text())
            if content.get("version") != _STATE_VERSION:
                raise ValueError("version")
            done = {str(study): [str(uid) for uid in series] for study, series in content["done"].items()}
            return cls(path, done, since or content.get("since"), int(content.get("cursor", 0)))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InvalidRequest(
                "the watch state file is not a pacs-watch state file; give another --state or remove it"
            ) from None

    def save(self) -> None:
        """Write the state atomically: a reader, or a crash, sees the old file or the new one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        content = {"version": _STATE_VERSION, "since": self.since, "cursor": self.cursor, "done": self.done}
        descriptor, temporary = tempfile.mkstemp(prefix=".pacs-watch-", dir=self.path.parent)
        try:
            with os.fdopen(descriptor, "w") as handle:
                json.dump(content, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def mark(self, study_uid: str, series_uids: Sequence[str]) -> None:
        known = self.done.setdefault(study_uid, [])
        known.extend(uid for uid in series_uids if uid not in known)


@dataclass(frozen=True)
class PollResult:
    """What one poll did (counts only).

    Attributes:
        studies: studies examined.  series_indexed: series handed over and indexed.
        series_refused: series refused for good.  series_waiting: new series left for a later
        poll (over ``max_series``, or something was unavailable).  complete: the poll reached the
        end of the PACS's list.
    """

    studies: int
    series_indexed: int
    series_refused: int
    series_waiting: int
    complete: bool


def _values(item: dict[str, Any], tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


def _slide_studies(pacs: DicomWeb, since: str | None, offset: int, limit: int) -> list[str]:
    filters = {"ModalitiesInStudy": "SM"}
    if since:
        filters["StudyDate"] = f"{since}-"
    with pacs_errors("listing the studies that hold slides"):
        found = pacs.client.search_for_studies(search_filters=filters, fields=[_STUDY], offset=offset, limit=limit)
    return [uid for uid in (_values(item, _STUDY) for item in found) if uid]


def _slide_series(pacs: DicomWeb, study_uid: str) -> list[str]:
    with pacs_errors("listing the slide series of a study"):
        found = pacs.client.search_for_series(study_instance_uid=study_uid, search_filters={"Modality": "SM"},
                                              fields=[_SERIES])
    return [uid for uid in dict.fromkeys(_values(item, _SERIES) for item in found) if uid]


def poll_once(
    pacs: DicomWeb, state: WatchState, indexer: Indexer, *, max_studies: int = 200, max_series: int = 16,
    stop: threading.Event | None = None,
) -> PollResult:
    """Hand the new slide series of the PACS to ``indexer``, within the bounds; save the state.

    Raises:
        DependencyUnavailable / PermissionDenied: the PACS could not be listed (nothing is lost:
            the state holds what was done).
    """
    if max_studies < 1 or max_series < 1:
        raise InvalidRequest("max_studies and max_series must be 1 or more")
    studies = _slide_studies(pacs, state.since, state.cursor, max_studies)
    indexed = refused = waiting = examined = 0
    interrupted = False
    for study_uid in studies:
        if interrupted or (stop is not None and stop.is_set()):
            break
        examined += 1
        done = set(state.done.get(study_uid, ()))
        new = [uid for uid in _slide_series(pacs, study_uid) if uid not in done]
        for position, series_uid in enumerate(new):
            # One series per call: a series refused for good (not a slide) must not take others with it.
            interrupted = interrupted or (stop is not None and stop.is_set())
            if interrupted or indexed + refused >= max_series:
                waiting += len(new) - position
                break
            try:
                indexer(study_uid, [series_uid])
            except (InvalidRequest, NotFound) as error:
                log.warning("a slide series was refused (%s); it is not offered again", type(error).__name__)
                refused += 1
            except (DependencyUnavailable, Cancelled, DeadlineExceeded) as error:
                log.warning("indexing a series stopped (%s); it is offered again at the next poll", type(error).__name__)
                interrupted = True
                waiting += len(new) - position
                break
            else:
                indexed += 1
            state.mark(study_uid, [series_uid])
            state.save()
    finished_page = examined == len(studies) and waiting == 0
    complete = finished_page and len(studies) < max_studies
    if finished_page:  # else the next poll looks at the same page again
        state.cursor = 0 if complete else state.cursor + len(studies)
    if complete:  # from now on only studies dated from yesterday on (a day of overlap)
        state.since = (date.today() - timedelta(days=1)).strftime("%Y%m%d")
    state.save()
    result = PollResult(examined, indexed, refused, waiting, complete)
    log.info("poll: %d studies examined, %d series indexed, %d refused, %d waiting",
             result.studies, result.series_indexed, result.series_refused, result.series_waiting)
    return result


def watch(
    pacs: DicomWeb, state: WatchState, indexer: Indexer, stop: threading.Event, *, interval_s: float = 60.0,
    max_studies: int = 200, max_series: int = 16, on_poll: Callable[[PollResult], None] | None = None,
) -> None:
    """Poll every ``interval_s`` seconds until ``stop`` is set (checked between series and
    while waiting); a PACS that is down is logged and polled again at the next interval."""
    while not stop.is_set():
        try:
            result = poll_once(pacs, state, indexer, max_studies=max_studies, max_series=max_series, stop=stop)
        except DependencyUnavailable as error:
            log.warning("the PACS could not be polled (%s); trying again in %.0f s", error, interval_s)
        else:
            if on_poll is not None:
                on_poll(result)
        stop.wait(interval_s)
