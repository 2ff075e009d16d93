"""Orthanc Python-plugin script: index every new slide of a stable study through histoxplain's gateway.

Loaded by Orthanc's Python plugin (``orthanc-python``, which runs the system's ``python3``, not a
virtual environment), with this in Orthanc's configuration::

    "Plugins": ["/usr/share/orthanc/plugins/libOrthancPython.so", ...],
    "PythonScript": "/path/to/orthanc_trigger.py",
    "UserMetadata": {"HistoxplainIndexed": 4501},
    "Histoxplain": {
        "Gateway": "gateway.example:50051",     # or $HISTOXPLAIN_TRIGGER_GATEWAY
        "Index": "slides",                      # or $HISTOXPLAIN_TRIGGER_INDEX
        "Level": 0,                             # the pyramid level to index
        "TokenFile": "/run/secrets/token",      # optional bearer token (read before each call)
        "RootCertificates": "/run/ca.pem",      # optional: TLS with this CA ("Tls": true: system CAs)
        "SitePackages": ["/opt/histoxplain"]    # where histoxplain-client (the SDK) is installed
    }

Orthanc expands ``${VARIABLE}`` in its configuration files, so every value can also come from
the environment. :class:`~histoxplain_service.pacs.orthanc.OrthancConfig` writes all of this
when given these :class:`TriggerOptions`.

What it does
    On Orthanc's stable-study event the study's Orthanc id is put on a bounded queue (the callback
    returns at once: Orthanc's callbacks must never block). One worker thread takes studies off
    the queue, looks at each series not yet marked with the ``HistoxplainIndexed`` metadata entry,
    marks the series that are not slides (no VL Whole Slide Microscopy image) ``not-a-slide``, and
    hands the study's new slide series to the gateway's ``IndexDicom`` RPC; when the gateway has
    indexed them they are marked ``indexed`` (``skipped`` for those it reports skipped: no tissue,
    no such pyramid level). Results written back into the study (Parametric
    Maps, SR, KOS) make the study stable again: their series and the indexed ones are marked, so
    nothing is indexed twice. A gateway that is unavailable (UNAVAILABLE, DEADLINE_EXCEEDED,
    RESOURCE_EXHAUSTED) is retried with exponential backoff up to ``MaxAttempts``; any other
    refusal is logged and the series stay unmarked, so the next stable event tries again.

    ``GET /histoxplain/trigger`` (Orthanc's REST API, with its authentication) answers counters
    for monitoring: studies queued, dropped (queue full) and done; series indexed, skipped, not
    slides and already marked; calls, retries and failures; and the queue's length. Log lines and counters
    name no UID and no patient data. When Orthanc stops, a call in flight is cancelled.

The script is deliberately thin and generic (orthanc-python is AGPL): it only calls the SDK.
"""

from __future__ import annotations

import json
import os
import queue
import site
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

try:
    import orthanc  # the Python plugin's module: it exists only inside Orthanc
except ImportError:  # imported by tests and tools for TriggerOptions and backoff_s
    orthanc = None

METADATA = "HistoxplainIndexed"
INDEXED = "indexed"
NOT_A_SLIDE = "not-a-slide"
SKIPPED = "skipped"  # a slide the gateway did not index (no tissue, no such level): not offered again
WSI_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.77.1.6"
STATS_URI = "/histoxplain/trigger"
MAX_SERIES_PER_CALL = 64  # IndexDicomRequest.series_instance_uids holds at most 64
_RETRYABLE = ("Unavailable", "DeadlineExceeded", "ResourceExhausted")


@dataclass(frozen=True)
class TriggerOptions:
    """The ``Histoxplain`` section of Orthanc's configuration (keys as in the module docstring).

    Attributes:
        gateway: the gateway's ``host:port``.
        index: the index the slides go into.
        level: the pyramid level indexed.
        token_file: a file holding the bearer token, or ``None``.
        tls: use TLS (implied by ``root_certificates``).
        root_certificates: PEM file of the CA that signed the gateway's certificate, or ``None``.
        site_packages: folders added with ``site.addsitedir`` before the SDK is imported.
        metadata: the user metadata entry that marks series (declared in ``UserMetadata``).
        queue_size: studies waiting at most; more are dropped (with a warning) until it drains.
        max_attempts: calls per study while the gateway is unavailable.
        initial_backoff_s, max_backoff_s: the wait before the second call, and the cap.
        timeout_s: the deadline of one ``IndexDicom`` call.
    """

    gateway: str
    index: str
    level: int = 0
    token_file: str | None = None
    tls: bool = False
    root_certificates: str | None = None
    site_packages: tuple[str, ...] = field(default_factory=tuple)
    metadata: str = METADATA
    queue_size: int = 1000
    max_attempts: int = 8
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    timeout_s: float = 3600.0

    @classmethod
    def from_configuration(cls, configuration: dict[str, Any], environ: dict[str, str]) -> TriggerOptions:
        """Read Orthanc's whole configuration (``orthanc.GetConfiguration()``, parsed).

        Raises:
            ValueError: the gateway or the index is missing, or a number is out of range.
        """
        section = configuration.get("Histoxplain") or {}
        gateway = section.get("Gateway") or environ.get("HISTOXPLAIN_TRIGGER_GATEWAY")
        index = section.get("Index") or environ.get("HISTOXPLAIN_TRIGGER_INDEX")
        if not gateway or not index:
            raise ValueError("set Histoxplain.Gateway and Histoxplain.Index in Orthanc's configuration")
        options = cls(
            gateway=str(gateway),
            index=str(index),
            level=int(section.get("Level", 0)),
            token_file=section.get("TokenFile") or environ.get("HISTOXPLAIN_TRIGGER_TOKEN_FILE") or None,
            tls=bool(section.get("Tls", False)),
            root_certificates=section.get("RootCertificates") or None,
            site_packages=tuple(str(path) for path in section.get("SitePackages", ())),
            metadata=str(section.get("Metadata", METADATA)),
            queue_size=int(section.get("QueueSize", 1000)),
            max_attempts=int(section.get("MaxAttempts", 8)),
            initial_backoff_s=float(section.get("InitialBackoffSeconds", 1.0)),
            max_backoff_s=float(section.get("MaxBackoffSeconds", 60.0)),
            timeout_s=float(section.get("TimeoutSeconds", 3600.0)),
        )
        if options.level < 0 or options.queue_size < 1 or options.max_attempts < 1:
            raise ValueError("Histoxplain.Level must be >= 0, QueueSize and MaxAttempts >= 1")
        if not 0 < options.initial_backoff_s <= options.max_backoff_s or options.timeout_s <= 0:
            raise ValueError("Histoxplain: 0 < InitialBackoffSeconds <= MaxBackoffSeconds, TimeoutSeconds > 0")
        if options.metadata not in (configuration.get("UserMetadata") or {}):
            raise ValueError(f"declare the metadata entry {options.metadata} in Orthanc's UserMetadata")
        return options

    def as_section(self) -> dict[str, Any]:
        """The ``Histoxplain`` section of Orthanc's configuration that :meth:`from_configuration` reads."""
        section: dict[str, Any] = {
            "Gateway": self.gateway, "Index": self.index, "Level": self.level, "Tls": self.tls,
            "SitePackages": list(self.site_packages), "Metadata": self.metadata, "QueueSize": self.queue_size,
            "MaxAttempts": self.max_attempts, "InitialBackoffSeconds": self.initial_backoff_s,
            "MaxBackoffSeconds": self.max_backoff_s, "TimeoutSeconds": self.timeout_s,
        }
        if self.token_file:
            section["TokenFile"] = self.token_file
        if self.root_certificates:
            section["RootCertificates"] = self.root_certificates
        return section


def backoff_s(options: TriggerOptions, attempt: int) -> float:
    """The wait after failed call number ``attempt`` (1, 2, ...): doubling from the initial backoff, capped."""
    return min(options.max_backoff_s, options.initial_backoff_s * 2 ** (attempt - 1))


class Trigger:
    """The queue, the worker thread and the counters; one per Orthanc."""

    def __init__(self, options: TriggerOptions) -> None:
        self.options = options
        self._queue: queue.Queue[str | None] = queue.Queue(options.queue_size)
        self._waiting: set[str] = set()  # studies on the queue: a study made stable twice is queued once
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="histoxplain-trigger", daemon=True)
        self._client: Any = None  # the SDK client of the call in flight, closed to cancel it on stop
        self.counters = dict.fromkeys(
            ("studies_queued", "studies_dropped", "studies_done", "series_indexed", "series_skipped",
             "series_not_slides", "series_already_marked", "calls", "retries", "failures"), 0)

    # -- Orthanc's threads: never block ---------------------------------------------------------

    def start(self) -> None:
        self._worker.start()

    def on_stable_study(self, study_id: str) -> None:
        with self._lock:
            if study_id in self._waiting:
                return
            try:
                self._queue.put_nowait(study_id)
            except queue.Full:
                self.counters["studies_dropped"] += 1
                orthanc.LogWarning("histoxplain trigger: queue full; a stable study was dropped")
                return
            self._waiting.add(study_id)
            self.counters["studies_queued"] += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self.counters, "queue": self._queue.qsize()}

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the worker when Orthanc stops: a call in flight is cancelled (the gateway keeps
        the series it finished; the study's series stay unmarked and are handed over again)."""
        self._stop.set()
        with self._lock:
            if self._client is not None:
                self._client.close()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the worker sees the stop event after its current study
        self._worker.join(timeout_s)

    # -- the worker ------------------------------------------------------------------------------

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.counters[name] += amount

    def _run(self) -> None:
        while not self._stop.is_set():
            study_id = self._queue.get()
            if study_id is None:
                return
            with self._lock:
                self._waiting.discard(study_id)
            try:
                self._index_study(study_id)
            except Exception as error:  # noqa: BLE001 -- one study's failure must not end the worker
                self._count("failures")
                orthanc.LogError(f"histoxplain trigger: a study failed ({type(error).__name__})")
            finally:
                self._count("studies_done")

    def _get(self, uri: str) -> Any:
        return json.loads(orthanc.RestApiGet(uri))

    def _mark(self, series_id: str, value: str) -> None:
        orthanc.RestApiPut(f"/series/{series_id}/metadata/{self.options.metadata}", value)

    def _new_slide_series(self, study: dict[str, Any]) -> list[tuple[str, str]]:
        """(Orthanc id, Series Instance UID) of the study's unmarked slide series; marks the others."""
        found = []
        for series_id in study.get("Series", []):
            if self.options.metadata in self._get(f"/series/{series_id}/metadata"):
                self._count("series_already_marked")
                continue
            series = self._get(f"/series/{series_id}")
            instances = series.get("Instances") or []
            sop_class = orthanc.RestApiGet(f"/instances/{instances[0]}/metadata/SopClassUid") if instances else b""
            if (sop_class.decode() if isinstance(sop_class, bytes) else sop_class).strip() != WSI_SOP_CLASS_UID:
                self._mark(series_id, NOT_A_SLIDE)
                self._count("series_not_slides")
                continue
            found.append((series_id, series["MainDicomTags"]["SeriesInstanceUID"]))
        return found

    def _index_study(self, study_id: str) -> None:
        study = self._get(f"/studies/{study_id}")
        series = self._new_slide_series(study)
        if not series:
            return
        study_uid = study["MainDicomTags"]["StudyInstanceUID"]
        for start in range(0, len(series), MAX_SERIES_PER_CALL):
            chunk = series[start : start + MAX_SERIES_PER_CALL]
            summary = self._hand_over(study_uid, [uid for _, uid in chunk])
            if summary is None:
                return
            skipped = {item.series_uid for item in summary.skipped}
            for series_id, series_uid in chunk:
                self._mark(series_id, SKIPPED if series_uid in skipped else INDEXED)
            self._count("series_indexed", len(chunk) - len(skipped))
            self._count("series_skipped", len(skipped))
            orthanc.LogInfo(f"histoxplain trigger: {len(chunk) - len(skipped)} slide series indexed, {len(skipped)} skipped")

    def _hand_over(self, study_uid: str, series_uids: list[str]) -> Any:
        """Call ``IndexDicom`` until it succeeds (its summary), fails for good, or the attempts
        run out (``None``)."""
        import histoxplain_client as hc

        for attempt in range(1, self.options.max_attempts + 1):
            self._count("calls")
            client = hc.Client(self.options.gateway, retry=hc.NO_RETRY, **self._credentials())
            with self._lock:
                cancelled = self._stop.is_set()
                self._client = None if cancelled else client
            try:
                if cancelled:
                    return None
                return client.index_dicom(
                    self.options.index, study_uid, series_uids, level=self.options.level, timeout=self.options.timeout_s
                )
            except hc.ApiError as error:
                if self._stop.is_set():  # cancelled by stop()
                    return None
                if type(error).__name__ not in _RETRYABLE:
                    self._count("failures")
                    orthanc.LogError(f"histoxplain trigger: the gateway refused a study ({type(error).__name__}: {error})")
                    return None
                wait = backoff_s(self.options, attempt)
                orthanc.LogWarning(
                    f"histoxplain trigger: the gateway is unavailable ({type(error).__name__}); "
                    f"call {attempt} of {self.options.max_attempts}, next in {wait:g} s"
                )
            finally:
                with self._lock:
                    self._client = None
                client.close()
            if attempt < self.options.max_attempts:
                self._count("retries")
                if self._stop.wait(wait):
                    return None
        self._count("failures")
        orthanc.LogError("histoxplain trigger: the gateway stayed unavailable; the study waits for its next stable event")
        return None

    def _credentials(self) -> dict[str, Any]:
        """Client keyword arguments; the token file is read before every call (a rotated secret works)."""
        options: dict[str, Any] = {}
        if self.options.token_file:
            with open(self.options.token_file, encoding="utf-8") as handle:
                options["token"] = handle.read().strip()
        if self.options.root_certificates:
            options["root_certificates"] = self.options.root_certificates
        elif self.options.tls:
            options["tls"] = True
        return options


def _use_site_packages(folders: tuple[str, ...]) -> None:
    """Put ``folders`` (and what their ``.pth`` files add) first on ``sys.path``: the system's own
    packages (Debian's python3-protobuf 3.21) must not shadow the versions the SDK needs."""
    before = list(sys.path)
    for folder in folders:
        site.addsitedir(folder)
    added = [path for path in sys.path if path not in before]
    sys.path[:] = added + before


def _install() -> None:
    options = TriggerOptions.from_configuration(json.loads(orthanc.GetConfiguration()), dict(os.environ))
    _use_site_packages(options.site_packages)
    import histoxplain_client  # noqa: F401 -- fail at start-up, not at the first study

    trigger = Trigger(options)

    def on_change(change_type: int, level: int, resource_id: str) -> None:
        if change_type == orthanc.ChangeType.STABLE_STUDY:
            trigger.on_stable_study(resource_id)
        elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            trigger.stop()

    def on_stats(output: Any, uri: str, **request: Any) -> None:
        if request.get("method") != "GET":
            output.SendMethodNotAllowed("GET")
            return
        output.AnswerBuffer(json.dumps(trigger.stats()), "application/json")

    trigger.start()
    orthanc.RegisterOnChangeCallback(on_change)
    orthanc.RegisterRestCallback(STATS_URI, on_stats)
    orthanc.LogWarning(f"histoxplain trigger: stable studies are indexed into {options.index} at level {options.level}")


if orthanc is not None:
    _install()
