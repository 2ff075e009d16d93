"""The PACS end to end through the gateway and the command line, with the real components: the
demo's slide stored in a real Orthanc (two studies of two patients, ``pacs_fixtures``), indexed
with the IndexDicom RPC of a real gateway (embedded model, default index engine, free loopback
port), a region searched and explained with ExplainDicomRegion, its Parametric Map, SR and Key
Object Selection stored in the study, found there by QIDO-RS, read back and validated; then the
error cases, the stop on cancel, the logs without UIDs, and ``histoxplain index`` / ``explain``
with ``--dicomweb``.

Slides are indexed at pyramid level 1 (a few dozen tiles each), as in ``test_pacs.py``, which
tests the library underneath.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import histoxplain_client as hc
from histoxplain_client._proto.histoxplain.v1 import pacs_pb2
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2_grpc as pb_grpc
from histoxplain_service.bootstrap import open_index_engine
from histoxplain_service.config import GatewaySettings, Settings
from histoxplain_service.domain.types import Box
from histoxplain_service.index.base import IndexEngine
from histoxplain_service.pacs.dicomweb import DicomWeb
from histoxplain_service.pacs.slides import dicom_image_id
from histoxplain_service.pacs.writeback import WriteBackCounts

from pacs_fixtures import RunningOrthanc, StoredSlide, loopback_orthanc, stored_slides  # noqa: F401 -- fixtures
from test_gateway import GatewayThread, embedded_backend  # noqa: F401 -- embedded_backend is a fixture
from test_pacs import _dciodvfy_errors, pacs  # noqa: F401 -- pacs is a fixture
from test_stopping import _free_port

pytestmark = pytest.mark.integration

INDEX = "slides"
LEVEL = 1


@contextmanager
def _running_gateway(data_dir: Path, backend: Any, **core: Any) -> Iterator[tuple[GatewayThread, IndexEngine]]:
    """A gateway on a free loopback port with ``core`` settings, e.g. its PACS."""
    settings = Settings(data_dir=data_dir, min_tissue=0.25, **core)
    engine = open_index_engine(settings)
    gateway = GatewayThread(
        GatewaySettings(core=settings, port=0, backend="embedded", health_interval_s=0.2, grace_period_s=1.0),
        backend, engine,
    )
    try:
        yield gateway, engine
    finally:
        gateway.stop()
        engine.close()


def _pacs_settings(orthanc: RunningOrthanc, **changes: Any) -> dict[str, Any]:
    connection = orthanc.connection
    return {"dicomweb_url": connection.url, "dicomweb_user": connection.user,
            "dicomweb_password": connection.password, **changes}


@dataclass(frozen=True)
class Served:
    gateway: GatewayThread
    engine: IndexEngine
    client: hc.Client


@pytest.fixture(scope="module")
def orthanc(loopback_orthanc: RunningOrthanc) -> RunningOrthanc:
    """On the host's loopback: the in-process gateway's gRPC threads cannot follow a private
    network namespace (pacs_fixtures.running_orthanc)."""
    return loopback_orthanc


@pytest.fixture(scope="module")
def served(orthanc: RunningOrthanc, embedded_backend: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with _running_gateway(tmp_path_factory.mktemp("gateway"), embedded_backend, **_pacs_settings(orthanc)) as (
        gateway, engine,
    ), hc.Client(gateway.target, timeout=300, retry=hc.NO_RETRY) as client:
        yield Served(gateway, engine, client)


@pytest.fixture(scope="module")
def indexed(served: Served, stored_slides: dict[str, StoredSlide]) -> dict[str, hc.DicomIndexSummary]:
    """Each study indexed whole (no series named) through IndexDicom."""
    return {
        role: served.client.index_dicom(INDEX, slide.study_uid, level=LEVEL, label=role)
        for role, slide in stored_slides.items()
    }


def test_index_dicom_indexes_each_slide_of_the_study_and_again_updates_without_duplicating(
    indexed: dict[str, hc.DicomIndexSummary], served: Served, stored_slides: dict[str, StoredSlide]
) -> None:
    for role, slide in stored_slides.items():
        summary = indexed[role]
        [series] = summary.series
        assert series.series_uid == slide.series_uid and series.status == "indexed"
        assert series.image_id == dicom_image_id(slide.study_uid, slide.series_uid)
        assert series.tiles > 10 and summary.tiles_indexed == series.tiles and summary.series_indexed == 1
        assert summary.index == INDEX and summary.skipped == ()
    before = served.client.describe_index(INDEX)
    assert before.image_count == 2 and before.tile_count == sum(s.series[0].tiles for s in indexed.values())
    query = stored_slides["query"]
    again = served.client.index_dicom(INDEX, query.study_uid, [query.series_uid], level=LEVEL, label="query")
    assert [item.status for item in again.series] == ["unchanged"] and again.tiles_indexed == 0
    relabelled = served.client.index_dicom(INDEX, query.study_uid, [query.series_uid], level=LEVEL, label="other")
    assert [item.status for item in relabelled.series] == ["relabelled"]
    served.client.index_dicom(INDEX, query.study_uid, [query.series_uid], level=LEVEL, label="query")
    after = served.client.describe_index(INDEX)
    assert (after.tile_count, after.image_count) == (before.tile_count, before.image_count)


@pytest.fixture(scope="module")
def query_box(indexed: dict[str, hc.DicomIndexSummary], served: Served, stored_slides: dict[str, StoredSlide]) -> Box:
    """An indexed tissue tile of the query slide, in level-0 pixels (224 px at level 1)."""
    slide = stored_slides["query"]
    records, _ = served.engine.open_index(INDEX).image_tiles(dicom_image_id(slide.study_uid, slide.series_uid))
    return records[len(records) // 2].box


@pytest.fixture(scope="module")
def explained(query_box: Box, served: Served, stored_slides: dict[str, StoredSlide]) -> hc.DicomRegionExplanation:
    slide = stored_slides["query"]
    return served.client.explain_dicom_region(
        INDEX, slide.study_uid, slide.series_uid, region=(query_box.x, query_box.y, query_box.w, query_box.h),
        level=LEVEL, k=3, side="query", heatmap_dtype="float32", store_results=True,
    )


def test_a_region_search_through_the_gateway_returns_the_other_slides_matching_tile(
    explained: hc.DicomRegionExplanation, query_box: Box, stored_slides: dict[str, StoredSlide]
) -> None:
    case = stored_slides["case"]  # the same pixels in another patient's study; the query's own slide is left out
    [reference] = explained.references
    hit = reference.hit
    assert hit is not None and hit.image_id == dicom_image_id(case.study_uid, case.series_uid)
    assert hit.dicom is not None
    assert (hit.dicom.study_uid, hit.dicom.series_uid) == (case.study_uid, case.series_uid)
    assert hit.dicom.frame_of_reference_uid == case.frame_of_reference_uid and hit.level == LEVEL
    assert hit.box == hc.Box(query_box.x, query_box.y, query_box.w, query_box.h)
    assert reference.similarity > 0.99 and reference.reference_heatmap is None
    assert explained.query_heatmaps is not None and explained.query_heatmaps.shape == (1, 224, 224)
    assert explained.region == hc.Box(query_box.x, query_box.y, query_box.w, query_box.h)
    assert explained.level == LEVEL and explained.referenced_cases == 1 and explained.method == "gradcam"


def test_the_stored_results_are_in_the_study_valid_and_read_back_the_same(
    explained: hc.DicomRegionExplanation, pacs: DicomWeb, stored_slides: dict[str, StoredSlide], tmp_path: Path
) -> None:
    query = stored_slides["query"]
    assert {item.state for item in explained.stored} == {"stored"}
    # QIDO-RS: the study now holds the slide and one new series per object
    found = _series_in(pacs, query.study_uid)
    assert set(found) == {query.series_uid, *(item.series_uid for item in explained.stored)}
    _check_stored(explained, pacs, stored_slides, tmp_path)


def _series_in(pacs: DicomWeb, study_uid: str) -> dict[str, str]:
    """The study's series (QIDO-RS): Series Instance UID -> modality."""
    return {
        item["0020000E"]["Value"][0]: item["00080060"]["Value"][0]
        for item in pacs.client.search_for_series(study_uid, fields=["00080060"])
    }


def _check_stored(
    explained: hc.DicomRegionExplanation, pacs: DicomWeb, stored_slides: dict[str, StoredSlide], tmp_path: Path
) -> None:
    """The Parametric Map, SR and KOS of ``explained`` are in the query's study, pass dciodvfy,
    copy nothing of the other patient, and read back with the values of the explanation."""
    import highdicom as hd

    query, case = stored_slides["query"], stored_slides["case"]
    stored = {item.kind: item for item in explained.stored}
    assert set(stored) == {"parametric_map", "structured_report", "key_object_selection"}
    found = _series_in(pacs, query.study_uid)
    assert found[query.series_uid] == "SM"
    assert (found[stored["structured_report"].series_uid], found[stored["key_object_selection"].series_uid]) == ("SR", "KO")
    read = {}
    for kind, item in stored.items():
        dataset = pacs.client.retrieve_instance(query.study_uid, item.series_uid, item.instance_uid)
        assert (dataset.SOPClassUID, dataset.SOPInstanceUID) == (item.sop_class_uid, item.instance_uid)
        path = tmp_path / f"{kind}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        assert _dciodvfy_errors(path) == [], kind
        raw = path.read_bytes()
        assert case.patient_id.encode() not in raw and b"PatientB" not in raw  # the other patient: UIDs only
        read[kind] = dataset

    heatmap = hd.pm.ParametricMap.from_dataset(read["parametric_map"])
    assert heatmap.FrameOfReferenceUID == query.frame_of_reference_uid
    # the region is one model input (224 px at level 1): the map is the mean of the query's maps
    np.testing.assert_allclose(
        heatmap.get_total_pixel_matrix().astype(np.float32), explained.query_heatmaps.mean(axis=0), atol=1e-6
    )
    [group] = hd.sr.Comprehensive3DSR.from_dataset(read["structured_report"]).content.get_planar_roi_measurement_groups()
    measurement = group.get_measurements()[0]
    assert measurement.value == pytest.approx(explained.references[0].similarity, abs=1e-6)
    assert [image.referenced_sop_instance_uid for image in measurement.referenced_images] == [
        explained.references[0].hit.dicom.instance_uid
    ]
    selection = hd.ko.KeyObjectSelectionDocument.from_dataset(read["key_object_selection"])
    [reference] = selection.content.get_references()
    uid = reference.referenced_sop_instance_uid
    assert selection.resolve_reference(uid) == (case.study_uid, case.series_uid, uid)


def test_a_region_in_slide_millimetres_and_tile_ranking(
    query_box: Box, served: Served, pacs: DicomWeb, stored_slides: dict[str, StoredSlide]
) -> None:
    import highdicom as hd

    slide = stored_slides["query"]
    to_mm = hd.spatial.PixelToReferenceTransformer.for_image(
        pacs.slide(slide.study_uid, slide.series_uid).dataset(0), for_total_pixel_matrix=True
    )
    centres = to_mm(np.array([[query_box.x, query_box.y], [query_box.x + query_box.w - 1, query_box.y + query_box.h - 1]]))
    low, high = centres.min(axis=0), centres.max(axis=0)
    result = served.client.explain_dicom_region(
        INDEX, slide.study_uid, slide.series_uid, region_mm=(low[0], low[1], high[0] - low[0], high[1] - low[1]),
        level=LEVEL, k=3, ranking="tile", side="query", target="projection", correspondences=2, verify=True,
    )
    assert result.region == hc.Box(query_box.x, query_box.y, query_box.w, query_box.h) and result.stored == ()
    for reference in result.references:  # the target, region pairs and faithfulness reach the region's explanation
        assert 1 <= len(reference.correspondences) <= 2
        assert reference.faithfulness is not None and reference.faithfulness.query is not None
        assert reference.faithfulness.reference is None
    case = dicom_image_id(stored_slides["case"].study_uid, stored_slides["case"].series_uid)
    hits = result.hits
    assert len(hits) == 3 and {hit.image_id for hit in hits} == {case} and len({hit.point_id for hit in hits}) == 3
    assert hits[0].box == result.region and list(result.scores) == sorted(result.scores, reverse=True)


def _wait_for_instances(pacs: DicomWeb, study_uid: str, uids: set[str], timeout: float = 60.0) -> float:
    """Poll QIDO-RS until the study holds every instance of ``uids``; the seconds it took."""
    started = time.monotonic()
    while True:
        found = {item["00080018"]["Value"][0] for item in pacs.client.search_for_instances(study_uid)}
        if uids <= found:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"{len(uids - found)} of {len(uids)} objects not stored in time"
        time.sleep(0.1)


def test_results_stored_in_the_background_come_queued_then_appear_in_the_study_valid_and_the_same(
    query_box: Box, served: Served, pacs: DicomWeb, stored_slides: dict[str, StoredSlide], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    slide = stored_slides["query"]
    with caplog.at_level(logging.INFO):
        explained = served.client.explain_dicom_region(
            INDEX, slide.study_uid, slide.series_uid, region=(query_box.x, query_box.y, query_box.w, query_box.h),
            level=LEVEL, k=3, side="query", heatmap_dtype="float32", store_results=True, store_background=True,
        )
        assert {item.state for item in explained.stored} == {"queued"}
        assert {item.sop_class_uid for item in explained.stored} == {
            "1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.59"
        }
        _wait_for_instances(pacs, slide.study_uid, {item.instance_uid for item in explained.stored})
        assert served.gateway.gateway.servicer._pacs.writer.wait_idle(10)  # noqa: SLF001 -- its count follows the store
    _check_stored(explained, pacs, stored_slides, tmp_path)
    assert "background store: 3 objects stored (attempt 1)" in caplog.text
    assert not any(uid in caplog.text for uid in [*_uids(stored_slides), *(i.instance_uid for i in explained.stored)])


def test_shutdown_drains_the_background_store(
    orthanc: RunningOrthanc, embedded_backend: Any, stored_slides: dict[str, StoredSlide], pacs: DicomWeb,
    tmp_path: Path,
) -> None:
    slide = stored_slides["query"]
    with _running_gateway(tmp_path, embedded_backend, **_pacs_settings(orthanc)) as (gateway, engine):
        with hc.Client(gateway.target, timeout=300, retry=hc.NO_RETRY) as client:
            for role, stored in stored_slides.items():
                client.index_dicom(INDEX, stored.study_uid, level=LEVEL, label=role)
            records, _ = engine.open_index(INDEX).image_tiles(dicom_image_id(slide.study_uid, slide.series_uid))
            box = records[0].box
            explained = client.explain_dicom_region(
                INDEX, slide.study_uid, slide.series_uid, region=(box.x, box.y, box.w, box.h), level=LEVEL, k=1,
                side="query", store_results=True, store_background=True,
            )
        writer = gateway.gateway.servicer._pacs.writer  # noqa: SLF001 -- the gateway's own
    # stopped at once (leaving the block): the set still being built or stored, the grace period (1 s) drains it
    assert writer.counts() == WriteBackCounts(waiting=0, stored=1, failed=0)
    assert {item.state for item in explained.stored} == {"queued"}
    _wait_for_instances(pacs, slide.study_uid, {item.instance_uid for item in explained.stored}, timeout=1.0)


# -- errors -------------------------------------------------------------------------------------------


def _uids(stored_slides: dict[str, StoredSlide]) -> list[str]:
    return [uid for slide in stored_slides.values() for uid in (slide.study_uid, slide.series_uid)]


def test_unknown_uids_are_not_found_and_bad_ones_invalid_named_by_field_only(
    indexed: Any, served: Served, stored_slides: dict[str, StoredSlide]
) -> None:
    client, slide = served.client, stored_slides["query"]
    unknown = "1.2.826.0.1.3680043.8.498.1"
    with pytest.raises(hc.NotFound, match="study") as study:
        client.index_dicom(INDEX, unknown, level=LEVEL)
    with pytest.raises(hc.NotFound, match="series") as series:
        client.explain_dicom_region(INDEX, slide.study_uid, unknown, region=(0, 0, 224, 224), level=LEVEL, k=1)
    with pytest.raises(hc.InvalidArgument, match=r"series_instance_uids\[1\] is not a DICOM UID") as malformed:
        client.index_dicom(INDEX, slide.study_uid, [slide.series_uid, "../../studies"], level=LEVEL)
    for caught in (study, series, malformed):
        assert not any(uid in caught.value.details for uid in [*_uids(stored_slides), unknown])


def test_a_slide_without_the_level_is_skipped_with_its_reason(
    indexed: Any, served: Served, stored_slides: dict[str, StoredSlide]
) -> None:
    slide = stored_slides["query"]
    summary = served.client.index_dicom(INDEX, slide.study_uid, level=20)
    assert summary.series == () and summary.tiles_indexed == 0
    [skipped] = summary.skipped
    assert skipped.series_uid == slide.series_uid and skipped.reason == "unreadable_image" and "level" in skipped.message
    assert not any(uid in skipped.message for uid in _uids(stored_slides))


def test_a_region_outside_the_slide_is_invalid(
    indexed: Any, served: Served, stored_slides: dict[str, StoredSlide]
) -> None:
    slide = stored_slides["query"]
    with pytest.raises(hc.InvalidArgument, match="outside the slide"):
        served.client.explain_dicom_region(
            INDEX, slide.study_uid, slide.series_uid, region=(10**7, 10**7, 224, 224), level=LEVEL, k=1
        )


def test_a_series_that_is_not_a_slide_is_invalid(
    explained: hc.DicomRegionExplanation, served: Served, stored_slides: dict[str, StoredSlide]
) -> None:
    slide = stored_slides["query"]
    report = next(item for item in explained.stored if item.kind == "structured_report")  # now in the study
    with pytest.raises(hc.InvalidArgument, match="not a whole-slide image series"):
        served.client.index_dicom(INDEX, slide.study_uid, [report.series_uid], level=LEVEL)
    with pytest.raises(hc.InvalidArgument, match="not a whole-slide image series"):
        served.client.explain_dicom_region(
            INDEX, slide.study_uid, report.series_uid, region=(0, 0, 224, 224), level=LEVEL, k=1
        )
    # the study indexed whole leaves the objects written into it out
    assert [item.status for item in served.client.index_dicom(INDEX, slide.study_uid, level=LEVEL, label="query").series] == [
        "unchanged"
    ]


@pytest.mark.parametrize(
    ("case", "error", "setting"),
    [
        ("down", hc.Unavailable, "HISTOXPLAIN_DICOMWEB_URL"),
        ("wrong-password", hc.PermissionDenied, "HISTOXPLAIN_DICOMWEB_USER"),
        # Orthanc checks HTTP Basic only: a bearer token is refused like a wrong password
        ("refused-token", hc.PermissionDenied, "HISTOXPLAIN_DICOMWEB_TOKEN_FILE"),
        ("no-pacs", hc.FailedPrecondition, "HISTOXPLAIN_DICOMWEB_URL"),
    ],
)
def test_a_gateway_whose_pacs_fails_answers_with_the_setting_to_check(
    case: str, error: type[hc.ApiError], setting: str, orthanc: RunningOrthanc, embedded_backend: Any,
    stored_slides: dict[str, StoredSlide], tmp_path: Path,
) -> None:
    token = tmp_path / "token"
    token.write_text("not-the-password\n")
    pacs = {
        "down": _pacs_settings(orthanc, dicomweb_url=f"http://127.0.0.1:{_free_port()}/dicom-web"),
        "wrong-password": _pacs_settings(orthanc, dicomweb_password="not-the-password"),
        "refused-token": _pacs_settings(orthanc, dicomweb_user=None, dicomweb_password=None, dicomweb_token_file=token),
        "no-pacs": {},
    }[case]
    slide = stored_slides["query"]
    with _running_gateway(tmp_path, embedded_backend, **pacs) as (gateway, _), hc.Client(
        gateway.target, timeout=60, retry=hc.NO_RETRY
    ) as client:
        with pytest.raises(error, match=setting) as indexing:
            client.index_dicom(INDEX, slide.study_uid, level=LEVEL)
        client.index_images("files", [hc.IndexImage(np.full((224, 224, 3), 128, np.uint8), image_id="grey")],
                            min_tissue_fraction=0.0)
        with pytest.raises(error, match=setting) as explaining:
            client.explain_dicom_region("files", slide.study_uid, slide.series_uid, region=(0, 0, 224, 224), k=1)
    for caught in (indexing, explaining):
        assert "not-the-password" not in caught.value.details
        assert not any(uid in caught.value.details for uid in _uids(stored_slides))


def test_a_rotated_password_file_is_read_again_after_a_refusal(
    orthanc: RunningOrthanc, embedded_backend: Any, stored_slides: dict[str, StoredSlide], tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("not-the-password\n")
    pacs = _pacs_settings(orthanc, dicomweb_password=None, dicomweb_password_file=secret)
    slide = stored_slides["query"]
    with _running_gateway(tmp_path / "data", embedded_backend, **pacs) as (gateway, _), hc.Client(
        gateway.target, timeout=120, retry=hc.NO_RETRY
    ) as client:
        with pytest.raises(hc.PermissionDenied, match="HISTOXPLAIN_DICOMWEB_PASSWORD_FILE"):
            client.index_dicom("rotated", slide.study_uid, level=2)
        secret.write_text(f"{orthanc.connection.password}\n")  # the Secret is updated; no restart
        summary = client.index_dicom("rotated", slide.study_uid, level=2)
    assert [item.status for item in summary.series] == ["indexed"]


# -- stopping and logs --------------------------------------------------------------------------------


def test_cancelling_index_dicom_stops_its_work_and_commits_no_half_slide(
    served: Served, stored_slides: dict[str, StoredSlide]
) -> None:
    """64 px tiles of level 0 are some thousand tiles (minutes of work): cancelled after a few
    seconds, the gateway's worker is free again within one embedding batch and the series,
    unfinished, is not in the index."""
    slide = stored_slides["case"]
    channel = grpc.insecure_channel(served.gateway.target)
    request = pacs_pb2.IndexDicomRequest(index="cancelled", study_instance_uid=slide.study_uid, level=0)
    request.tiling.tile_size = request.tiling.stride = 64
    call = pb_grpc.RetrievalServiceStub(channel).IndexDicom.future(request, timeout=600)
    servicer = served.gateway.gateway.servicer
    deadline = time.monotonic() + 30
    while servicer.work_in_flight == 0:
        assert time.monotonic() < deadline and not call.done()
        time.sleep(0.05)
    time.sleep(3.0)  # indexing is under way
    assert not call.done()
    call.cancel()
    cancelled_at = time.monotonic()
    while servicer.work_in_flight:
        assert time.monotonic() - cancelled_at < 10, "the indexing went on after its caller cancelled"
        time.sleep(0.05)
    assert call.cancelled()
    channel.close()
    infos = {info.name: info for info in served.client.list_indexes()}
    assert "cancelled" not in infos or infos["cancelled"].image_count == 0


def _audit_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "histoxplain.audit"]


def test_the_gateway_logs_no_uid(
    explained: Any, served: Served, stored_slides: dict[str, StoredSlide], caplog: pytest.LogCaptureFixture
) -> None:
    slide = stored_slides["query"]
    with caplog.at_level(logging.DEBUG):
        served.client.index_dicom(INDEX, slide.study_uid, [slide.series_uid], level=LEVEL, label="query")
        whole = served.client.explain_dicom_region(  # the whole slide at level 2 (cut to it)
            INDEX, slide.study_uid, slide.series_uid, region=(0, 0, 10**6, 10**6), level=2, k=1, side="query",
            store_results=True, store_overlay=True,
        )
        with pytest.raises(hc.NotFound):
            served.client.index_dicom(INDEX, slide.study_uid, ["1.2.826.0.1.3680043.8.498.2"], level=LEVEL)
        deadline = time.monotonic() + 10  # the gateway writes a call's audit line after its answer has left
        while len(_audit_lines(caplog)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [item.kind for item in whole.stored] == [
        "parametric_map", "secondary_capture", "structured_report", "key_object_selection"
    ]
    audit = _audit_lines(caplog)
    assert any('"rpc": "IndexDicom"' in line and '"status": "OK"' in line for line in audit)
    assert any('"rpc": "ExplainDicomRegion"' in line and '"count": 1' in line for line in audit)
    assert any('"rpc": "IndexDicom"' in line and '"status": "NOT_FOUND"' in line for line in audit)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert not any(uid in text for uid in [*_uids(stored_slides), "1.2.826.0.1.3680043.8.498.2"])


# -- the command line ---------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "histoxplain_service.app.cli", *args], env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )


def test_the_command_line_indexes_and_explains_a_dicom_region(
    orthanc: RunningOrthanc, query_box: Box, stored_slides: dict[str, StoredSlide], pacs: DicomWeb, tmp_path: Path
) -> None:
    connection = orthanc.connection
    secret = tmp_path / "password"
    secret.write_text(f"{connection.password}\n")
    env = {**os.environ, "HISTOXPLAIN_DATA": str(tmp_path / "data"), "HISTOXPLAIN_DICOMWEB_USER": connection.user or "",
           "HISTOXPLAIN_DICOMWEB_PASSWORD_FILE": str(secret), "HISTOXPLAIN_DICOMWEB_URL": "", "OMP_NUM_THREADS": "1"}
    query, case = stored_slides["query"], stored_slides["case"]
    for slide in (query, case):
        indexing = _cli("index", "--dicomweb", connection.url, "--study", slide.study_uid, "--series", slide.series_uid,
                        "--index", "cli", "--level", str(LEVEL), "--no-progress", env=env)
        assert indexing.returncode == 0, indexing.stderr
        assert "1 slide series indexed" in indexing.stdout
    out = tmp_path / "report"
    region = ",".join(str(v) for v in (query_box.x, query_box.y, query_box.w, query_box.h))
    explaining = _cli("explain", "--dicomweb", connection.url, "--study", query.study_uid, "--series", query.series_uid,
                      "--region", region, "--level", str(LEVEL), "--index", "cli", "-k", "2", "--method", "gradcam",
                      "--side", "query", "--store", "--out", str(out), env=env)
    assert explaining.returncode == 0, explaining.stderr
    assert "1 similar case(s); the stored objects reference 1" in explaining.stdout
    assert explaining.stdout.count("  stored ") == 3 and (out / "index.html").is_file()
    background = _cli("explain", "--dicomweb", connection.url, "--study", query.study_uid, "--series", query.series_uid,
                      "--region", region, "--level", str(LEVEL), "--index", "cli", "-k", "2", "--method", "gradcam",
                      "--side", "query", "--store-background", "--out", str(tmp_path / "again"), env=env)
    assert background.returncode == 0, background.stderr
    queued = [line.split()[-1] for line in background.stdout.splitlines() if line.startswith("  queued ")]
    assert len(queued) == 3  # the command waited for the writer before it ended: they are in the study
    _wait_for_instances(pacs, query.study_uid, set(queued), timeout=1.0)

    secret.write_text("not-the-password\n")
    refused = _cli("index", "--dicomweb", connection.url, "--study", query.study_uid, "--index", "cli",
                   "--level", str(LEVEL), "--no-progress", env=env)
    assert refused.returncode == 8 and "HISTOXPLAIN_DICOMWEB_PASSWORD_FILE" in refused.stderr
    assert "not-the-password" not in refused.stderr + refused.stdout
