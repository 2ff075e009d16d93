"""Indexing triggered by the PACS, with the real components: Orthanc (Debian) with the
``orthanc_trigger`` Python-plugin script, a real gateway (embedded model, default index engine) on
a loopback port fixed in advance, and the demo slide stored by STOW-RS.

The gateway starts only after the slides are stored, so the trigger first finds it unavailable
and retries; once it is up the slides are indexed without anyone asking. Results written back
re-fire Orthanc's stable-study event and are not indexed. The QIDO-RS poller
(``histoxplain pacs-watch``) indexes each new series once and only once, within its bounds, and
stops on SIGTERM. Slides are indexed at pyramid level 1 to keep the module short.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

import histoxplain_client as hc
from histoxplain_model.errors import Cancelled
from histoxplain_service.app.pacs_watch import gateway_indexer, local_indexer
from histoxplain_service.bootstrap import open_index_engine
from histoxplain_service.config import GatewaySettings, Settings
from histoxplain_service.domain.retrieval import Retrieval
from histoxplain_service.pacs.dicomize import dicomize
from histoxplain_service.pacs.dicomweb import DicomWeb
from histoxplain_service.pacs.orthanc import OrthancConfig
from histoxplain_service.pacs.orthanc_trigger import INDEXED, METADATA, NOT_A_SLIDE, SKIPPED, STATS_URI, TriggerOptions
from histoxplain_service.pacs.results import RegionOnLevel, heatmap_overlay
from histoxplain_service.pacs.watch import WatchState, poll_once

from pacs_fixtures import RunningOrthanc, StoredSlide, pacs, running_orthanc, stored_slides  # noqa: F401 -- fixtures
from test_gateway import SERVING, GatewayThread, embedded_backend  # noqa: F401 -- fixture

pytestmark = pytest.mark.integration

LEVEL = 1
TRIGGER_INDEX = "triggered"
WATCH_INDEX = "watched"
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def gateway_port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, gateway_port: int) -> Iterator[RunningOrthanc]:
    """Orthanc with the trigger pointed at ``gateway_port``, where nothing listens yet."""
    work = tmp_path_factory.mktemp("orthanc-trigger")
    trigger = TriggerOptions(
        f"127.0.0.1:{gateway_port}", TRIGGER_INDEX, level=LEVEL, max_attempts=100, initial_backoff_s=0.5,
        max_backoff_s=2.0,
    )
    config = OrthancConfig(storage=work / "storage", stable_age_s=1, trigger=trigger)
    # on the host's loopback: the in-process gateway's gRPC threads cannot follow a private network
    # namespace (pacs_fixtures.running_orthanc)
    with running_orthanc(work, config, private_network=False) as running:
        yield running


class LazyGateway:
    """The module's gateway, started by the first test that needs it (after the trigger has
    found it missing), stopped after the module."""

    def __init__(self, orthanc: RunningOrthanc, backend: Any, data_dir: Path, port: int) -> None:
        core = Settings(
            data_dir=data_dir, min_tissue=0.25, dicomweb_url=orthanc.connection.url,
            dicomweb_user=orthanc.connection.user, dicomweb_password=orthanc.connection.password,
        )
        self.settings = GatewaySettings(core=core, port=port, backend="embedded", health_interval_s=0.2,
                                        grace_period_s=1.0, max_deadline_s=600.0)
        self.backend = backend
        self.thread: GatewayThread | None = None
        self.engine: Any = None

    def start(self) -> hc.Client:
        if self.thread is None:
            self.engine = open_index_engine(self.settings.core)
            self.thread = GatewayThread(self.settings, self.backend, self.engine)
            self.thread.wait_health(SERVING)
        return hc.Client(self.thread.target, timeout=600, retry=hc.NO_RETRY)

    def stop(self) -> None:
        if self.thread is not None:
            self.thread.stop()
            self.engine.close()


@pytest.fixture(scope="module")
def gateway(
    orthanc: RunningOrthanc, embedded_backend: Any, tmp_path_factory: pytest.TempPathFactory, gateway_port: int
) -> Iterator[LazyGateway]:
    lazy = LazyGateway(orthanc, embedded_backend, tmp_path_factory.mktemp("gateway-pacs"), gateway_port)
    yield lazy
    lazy.stop()


def _stats(orthanc: RunningOrthanc) -> dict[str, int]:
    with orthanc.connection.session() as session:
        response = session.get(orthanc.process.url + STATS_URI)
        response.raise_for_status()
        return response.json()


def _wait_stats(orthanc: RunningOrthanc, done: Callable[[dict[str, int]], bool], timeout_s: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while not done(stats := _stats(orthanc)):
        assert time.monotonic() < deadline, f"the trigger did not get there within {timeout_s:.0f} s: {stats}"
        time.sleep(0.25)
    return stats


def _series_mark(orthanc: RunningOrthanc, series_uid: str) -> str | None:
    with orthanc.connection.session() as session:
        found = session.post(orthanc.process.url + "/tools/lookup", data=series_uid).json()
        (series_id,) = [item["ID"] for item in found if item["Type"] == "Series"]
        response = session.get(f"{orthanc.process.url}/series/{series_id}/metadata/{METADATA}")
    return response.text if response.ok else None


def test_a_stored_slide_is_indexed_without_anyone_asking_once_the_gateway_is_up(
    orthanc: RunningOrthanc, stored_slides: dict[str, StoredSlide], gateway: LazyGateway
) -> None:
    retrying = _wait_stats(orthanc, lambda s: s["retries"] >= 2, 60)
    assert retrying["series_indexed"] == 0 and retrying["failures"] == 0
    with gateway.start() as client:
        indexed = _wait_stats(orthanc, lambda s: s["series_indexed"] == 2 and s["queue"] == 0, 600)
        info = client.describe_index(TRIGGER_INDEX)
    assert indexed["failures"] == 0
    assert info.image_count == 2 and info.tile_count > 0
    for slide in stored_slides.values():
        assert _series_mark(orthanc, slide.series_uid) == INDEXED
    trigger_lines = [line for line in orthanc.process.log_file.read_text().splitlines() if "histoxplain trigger" in line]
    assert any("unavailable" in line for line in trigger_lines)
    for slide in stored_slides.values():  # no UID or patient in what the trigger logs
        for secret in (slide.study_uid, slide.series_uid, slide.patient_id):
            assert not any(secret in line for line in trigger_lines)


def test_results_written_back_refire_the_event_but_nothing_is_indexed_again(
    orthanc: RunningOrthanc, stored_slides: dict[str, StoredSlide], gateway: LazyGateway
) -> None:
    query = stored_slides["query"]
    with gateway.start() as client:
        _wait_stats(orthanc, lambda s: s["series_indexed"] == 2 and s["queue"] == 0, 600)
        before = _stats(orthanc)
        result = client.explain_dicom_region(
            TRIGGER_INDEX, query.study_uid, query.series_uid, region=(512, 512, 448, 448), level=LEVEL, k=2,
            store_results=True,
        )
        stored = result.stored
        after = _wait_stats(  # the event fired again and the study was handled to the end
            orthanc, lambda s: s["studies_done"] > before["studies_done"] and s["queue"] == 0, 60
        )
        info = client.describe_index(TRIGGER_INDEX)
    assert len(stored) == 3
    assert after["series_not_slides"] == before["series_not_slides"] + 3
    assert (after["series_indexed"], after["calls"]) == (before["series_indexed"], before["calls"])
    assert after["series_already_marked"] > before["series_already_marked"]
    assert info.image_count == 2
    for item in stored:
        assert _series_mark(orthanc, item.series_uid) == NOT_A_SLIDE


def test_the_poller_indexes_each_new_series_once_within_its_bounds(
    orthanc: RunningOrthanc, stored_slides: dict[str, StoredSlide], gateway: LazyGateway, pacs: DicomWeb,
    tmp_path: Path,
) -> None:
    state_file = tmp_path / "watch.json"
    with gateway.start() as client:
        indexer = gateway_indexer(client, WATCH_INDEX, LEVEL)
        first = poll_once(pacs, WatchState.load(state_file), indexer, max_series=1)
        second = poll_once(pacs, WatchState.load(state_file), indexer, max_series=1)
        third = poll_once(pacs, WatchState.load(state_file), indexer, max_series=1)
        assert (first.series_indexed, first.series_waiting, first.complete) == (1, 1, False)
        assert (second.series_indexed, second.series_waiting, second.complete) == (1, 0, True)
        assert (third.series_indexed, third.series_waiting, third.complete) == (0, 0, True)
        assert client.describe_index(WATCH_INDEX).image_count == 2

        # A new slide series and, in the same study, an SM series that is not a slide (a scanner's
        # snapshot as a Secondary Capture): the slide is indexed, the other refused once.
        case = stored_slides["case"]
        written = dicomize(_he_slide(), tmp_path / "dicom", patient_id=case.patient_id, study_uid=case.study_uid)
        datasets = [pydicom.dcmread(path) for path in written.files]
        snapshot = heatmap_overlay(
            RegionOnLevel(datasets[0], 0, 0, 8, 8), np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32), "gradcam", "",
        )
        snapshot.Modality = "SM"
        pacs.store([*datasets, snapshot], case.study_uid)
        with hc.Client(f"127.0.0.1:{_free_port()}", timeout=10, retry=hc.NO_RETRY) as down:  # no gateway there
            offline = poll_once(pacs, WatchState.load(state_file), gateway_indexer(down, WATCH_INDEX, LEVEL))
        assert (offline.series_indexed, offline.series_refused, offline.series_waiting, offline.complete) == (0, 0, 2, False)
        state = WatchState.load(state_file)
        assert state.since is not None  # remembered after the first complete poll
        fourth = poll_once(pacs, state, indexer)
        fifth = poll_once(pacs, WatchState.load(state_file), indexer)
        info = client.describe_index(WATCH_INDEX)
    assert (fourth.series_indexed, fourth.series_refused) == (1, 1)
    assert (fifth.series_indexed, fifth.series_refused, fifth.series_waiting) == (0, 0, 0)
    assert info.image_count == 3
    done = WatchState.load(state_file).done
    assert {written.series_uid, str(snapshot.SeriesInstanceUID)} <= set(done[case.study_uid])
    assert len(sum(done.values(), [])) == 4


def _he_slide() -> Path:
    from histoxplain_service.app.samples import he_slide_path

    return he_slide_path()


def test_pacs_watch_polls_and_stops_promptly_on_sigterm(
    orthanc: RunningOrthanc, stored_slides: dict[str, StoredSlide], gateway: LazyGateway, tmp_path: Path
) -> None:
    gateway.start().close()
    password = tmp_path / "password"
    password.write_text(orthanc.connection.password or "")
    env = {
        **os.environ, "HISTOXPLAIN_DICOMWEB_URL": orthanc.connection.url,
        "HISTOXPLAIN_DICOMWEB_USER": orthanc.connection.user or "", "HISTOXPLAIN_DICOMWEB_PASSWORD_FILE": str(password),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("HISTOXPLAIN_DICOMWEB_PASSWORD", None)
    command = [
        sys.executable, "-m", "histoxplain_service.app.cli", "pacs-watch", "--index", "sigterm", "--level", str(LEVEL),
        "--state", str(tmp_path / "state.json"), "--server", gateway.thread.target, "--interval", "3600",
    ]
    with subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            ready, _, _ = select.select([process.stdout], [], [], 300)
            assert ready, "no poll within 300 s"
            first_line = process.stdout.readline()  # printed after the first poll
            assert first_line.startswith("poll: ") and "series indexed" in first_line, process.stderr.read()
            process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert process.wait(30) == 0
            assert time.monotonic() - started < 10
        finally:
            if process.poll() is None:
                process.kill()
    assert WatchState.load(tmp_path / "state.json").done  # what it indexed is remembered


def test_the_pollers_in_process_indexer_stops_on_the_stop_signal_and_then_indexes(
    stored_slides: dict[str, StoredSlide], pacs: DicomWeb, embedded_backend: Any, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", min_tissue=0.25)
    engine = open_index_engine(settings)
    try:
        retrieval = Retrieval(settings, embedded_backend, engine, dicom_tiles=pacs.read_tile)
        stop = threading.Event()
        indexer = local_indexer(retrieval, pacs, "local", LEVEL, stop)
        query = stored_slides["query"]
        stop.set()  # e.g. SIGTERM: the run stops at its first unit of work and commits nothing
        with pytest.raises(Cancelled):
            indexer(query.study_uid, [query.series_uid])
        assert [info.n_images for info in engine.list_indexes() if info.name == "local"] in ([], [0])
        stop.clear()
        indexer(query.study_uid, [query.series_uid])  # what poll_once calls for each new series
        assert retrieval.index("local").describe().n_images == 1
    finally:
        engine.close()


def test_a_slide_the_gateway_skips_is_marked_skipped_and_not_offered_again(
    orthanc: RunningOrthanc, stored_slides: dict[str, StoredSlide], gateway: LazyGateway, pacs: DicomWeb,
    tmp_path: Path,
) -> None:
    """A slide without tissue (a blank 1024 px scan) is refused by IndexDicom as ``no_tissue``: the
    trigger marks it ``skipped``; when its study becomes stable again (another slide stored in it)
    only the new slide is handed over. Last in the module: the poller tests count the PACS's series."""
    import tifffile

    blank = tmp_path / "blank.tif"
    tifffile.imwrite(
        blank, np.full((1024, 1024, 3), 245, np.uint8), tile=(256, 256), photometric="rgb",
        resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER",  # 0.5 µm/px
    )
    with gateway.start() as client:
        before = _wait_stats(  # the module's slides indexed and every study handled to the end
            orthanc, lambda s: s["series_indexed"] >= 2 and s["queue"] == 0 and s["studies_done"] == s["studies_queued"], 600
        )
        images_before = client.describe_index(TRIGGER_INDEX).image_count
        written = dicomize(blank, tmp_path / "blank", patient_id="HXP-BLANK", patient_name="Blank^Slide")
        pacs.store([pydicom.dcmread(path) for path in written.files], written.study_uid)
        skipped = _wait_stats(
            orthanc, lambda s: s["series_skipped"] == before["series_skipped"] + 1 and s["queue"] == 0, 300
        )
        assert _series_mark(orthanc, written.series_uid) == SKIPPED
        assert skipped["series_indexed"] == before["series_indexed"] and skipped["failures"] == 0

        # the study becomes stable again with a real slide in it: the blank one is not offered again
        tissue = dicomize(_he_slide(), tmp_path / "tissue", patient_id="HXP-BLANK", study_uid=written.study_uid)
        pacs.store([pydicom.dcmread(path) for path in tissue.files], written.study_uid)
        again = _wait_stats(
            orthanc, lambda s: s["series_indexed"] == before["series_indexed"] + 1 and s["queue"] == 0, 600
        )
        info = client.describe_index(TRIGGER_INDEX)
    assert again["series_skipped"] == skipped["series_skipped"]  # the blank slide was not handed over again
    assert again["calls"] == skipped["calls"] + 1 and again["series_already_marked"] > skipped["series_already_marked"]
    assert _series_mark(orthanc, tissue.series_uid) == INDEXED
    assert info.image_count == images_before + 1
