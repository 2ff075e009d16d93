"""The PACS path against a real Orthanc: slides stored by STOW-RS, indexed over DICOMweb, regions
searched and explained, and the results written back as DICOM, read back and validated.

The model is the default preset (its packaged ImageNet weights) in-process; slides are indexed at
pyramid level 1 (1110 x 1484 px of the demo's slide, a few dozen tiles) to keep the module short.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from histoxplain_model.errors import DependencyUnavailable, InvalidRequest, NotFound, PermissionDenied
from histoxplain_service.config import Settings
from histoxplain_service.domain.retrieval import Retrieval
from histoxplain_service.domain.types import Box, SearchHit
from histoxplain_service.bootstrap import open_index_engine
from histoxplain_service.pacs.connection import PacsConnection
from histoxplain_service.pacs.dicomweb import DicomWeb
from histoxplain_service.pacs.explain import Region, RegionExplanation, explain_region
from histoxplain_service.pacs.indexing import index_dicom
from histoxplain_service.pacs.slides import dicom_image_id
from histoxplain_service.pacs.writeback import BackgroundWriter, WriteBackCounts

from pacs_fixtures import (  # noqa: F401 -- fixtures
    RunningOrthanc, StoredSlide, orthanc, pacs, running_orthanc, stored_slides,
)

pytestmark = pytest.mark.integration

INDEX = "pacs"
LEVEL = 1


@pytest.fixture(scope="module")
def backend() -> Iterator[Any]:
    from histoxplain_model.encoders import load_encoder

    from histoxplain_service.backends.embedded import EmbeddedBackend

    model = EmbeddedBackend(load_encoder("efficientnet-lite0-imagenet"))
    yield model
    model.close()


@pytest.fixture(scope="module")
def retrieval(backend: Any, pacs: DicomWeb, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Retrieval]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("pacs-data"), min_tissue=0.25)
    engine = open_index_engine(settings)  # the default engine
    yield Retrieval(settings, backend, engine, dicom_tiles=pacs.read_tile)
    engine.close()


@pytest.fixture(scope="module")
def indexed(retrieval: Retrieval, pacs: DicomWeb, stored_slides: dict[str, StoredSlide]) -> dict[str, Any]:
    summaries = {
        role: index_dicom(retrieval, INDEX, pacs, slide.study_uid, level=LEVEL, label=role)
        for role, slide in stored_slides.items()
    }
    return summaries


def test_slides_are_indexed_over_dicomweb_with_their_uids_and_no_pixel_copies(
    indexed: dict[str, Any], retrieval: Retrieval, stored_slides: dict[str, StoredSlide]
) -> None:
    slide = stored_slides["query"]
    summary = indexed["query"]
    assert [image.status for image in summary.images] == ["indexed"] and summary.skipped == ()
    image = summary.images[0]
    assert image.image_id == dicom_image_id(slide.study_uid, slide.series_uid)
    records, vectors = retrieval.index(INDEX).image_tiles(image.image_id)
    assert len(records) == image.tiles > 10 and vectors.shape == (image.tiles, 1280)
    for record in records:
        assert record.level == LEVEL and record.dicom is not None
        assert (record.dicom.study_uid, record.dicom.series_uid) == (slide.study_uid, slide.series_uid)
        assert record.dicom.frame_of_reference_uid == slide.frame_of_reference_uid
        assert record.mpp == pytest.approx(0.998)
        assert record.box.w == record.box.h == 448  # 224 px at level 1, in level-0 pixels
    tiles_dir = retrieval.settings.tiles_dir(INDEX)
    assert not tiles_dir.exists() or not any(tiles_dir.iterdir())


def test_indexing_a_series_again_updates_it_and_never_duplicates(
    indexed: dict[str, Any], retrieval: Retrieval, pacs: DicomWeb, stored_slides: dict[str, StoredSlide]
) -> None:
    before = retrieval.describe(INDEX)
    slide = stored_slides["query"]
    again = index_dicom(retrieval, INDEX, pacs, slide.study_uid, [slide.series_uid], level=LEVEL, label="query")
    assert [image.status for image in again.images] == ["unchanged"]
    relabelled = index_dicom(retrieval, INDEX, pacs, slide.study_uid, [slide.series_uid], level=LEVEL, label="other")
    assert [image.status for image in relabelled.images] == ["relabelled"]
    index_dicom(retrieval, INDEX, pacs, slide.study_uid, [slide.series_uid], level=LEVEL, label="query")
    after = retrieval.describe(INDEX)
    assert (after.n_points, after.n_images) == (before.n_points, before.n_images) and after.n_images == 2


def test_a_hit_re_read_from_the_pacs_is_the_tile_that_was_embedded(
    indexed: dict[str, Any], retrieval: Retrieval, pacs: DicomWeb, stored_slides: dict[str, StoredSlide]
) -> None:
    slide = stored_slides["case"]
    records, vectors = retrieval.index(INDEX).image_tiles(dicom_image_id(slide.study_uid, slide.series_uid))
    hits = [SearchHit.from_record(record, 1.0) for record in records[:3]]
    tiles = [pacs.read_tile(hit) for hit in hits]
    assert all(tile.shape == (224, 224, 3) and tile.dtype == np.uint8 for tile in tiles)
    again = retrieval.backend.embed(tiles)
    np.testing.assert_allclose(again, vectors[:3], atol=1e-5)


# -- region search, explanation and the objects written back ----------------------------------------


@pytest.fixture(scope="module")
def query_box(indexed: dict[str, Any], retrieval: Retrieval, stored_slides: dict[str, StoredSlide]) -> Box:
    """An indexed tissue tile of the query slide (level-0 pixels): one 224 px tile at level 1."""
    slide = stored_slides["query"]
    records, _ = retrieval.index(INDEX).image_tiles(dicom_image_id(slide.study_uid, slide.series_uid))
    return records[len(records) // 2].box


@pytest.fixture(scope="module")
def explained(
    query_box: Box, retrieval: Retrieval, pacs: DicomWeb, stored_slides: dict[str, StoredSlide]
) -> RegionExplanation:
    slide = stored_slides["query"]
    region = Region(query_box.x, query_box.y, query_box.w, query_box.h)
    return explain_region(retrieval, INDEX, pacs, slide.study_uid, slide.series_uid, region, level=LEVEL, k=3, store=True)


def test_a_region_search_finds_the_other_slide_and_its_matching_tile(
    explained: RegionExplanation, query_box: Box, stored_slides: dict[str, StoredSlide]
) -> None:
    case = stored_slides["case"]  # the same pixels, another patient's study
    assert [hit.image_id for hit in explained.cases] == [dicom_image_id(case.study_uid, case.series_uid)]
    best = explained.explanation.hits[0]
    assert best.hit is not None and best.hit.dicom is not None
    assert (best.hit.dicom.study_uid, best.hit.dicom.series_uid) == (case.study_uid, case.series_uid)
    assert best.hit.box == query_box and best.similarity > 0.99
    assert explained.image.shape == (224, 224, 3) and explained.heatmap.shape == (224, 224)
    assert explained.heatmap.dtype == np.float32 and 0 <= explained.heatmap.min() <= explained.heatmap.max() <= 1
    assert explained.referenced == 1


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_the_results_are_in_new_series_of_the_query_study_valid_and_read_back_the_same(
    explained: RegionExplanation, pacs: DicomWeb, stored_slides: dict[str, StoredSlide], tmp_path: Path
) -> None:
    import highdicom as hd

    query, case = stored_slides["query"], stored_slides["case"]
    stored = {item.kind: item for item in explained.stored}
    assert set(stored) == {"map", "report", "selection"}
    assert len({item.series_uid for item in explained.stored} | {query.series_uid}) == 4
    read = {}
    for kind, item in stored.items():
        dataset = pacs.client.retrieve_instance(query.study_uid, item.series_uid, item.instance_uid)
        path = tmp_path / f"{kind}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        assert _dciodvfy_errors(path) == [], kind
        raw = path.read_bytes()
        assert case.patient_id.encode() not in raw and b"PatientB" not in raw  # the other patient: UIDs only
        assert dataset.StudyInstanceUID == query.study_uid and dataset.PatientID == query.patient_id
        read[kind] = dataset

    heatmap = hd.pm.ParametricMap.from_dataset(read["map"])
    assert heatmap.DimensionOrganizationType == "TILED_SPARSE" and heatmap.FrameOfReferenceUID == query.frame_of_reference_uid
    np.testing.assert_array_equal(heatmap.get_total_pixel_matrix().astype(np.float32), explained.heatmap)

    report = hd.sr.Comprehensive3DSR.from_dataset(read["report"])
    groups = report.content.get_planar_roi_measurement_groups()
    assert len(groups) == 1
    measurement = groups[0].get_measurements()[0]
    assert measurement.value == pytest.approx(explained.explanation.hits[0].similarity)
    assert measurement.method.value == "GRADCAM"
    [image] = measurement.referenced_images
    assert image.referenced_sop_instance_uid == explained.explanation.hits[0].hit.dicom.instance_uid
    assert groups[0].roi.frame_of_reference_uid == query.frame_of_reference_uid
    assert groups[0].roi.value.shape == (5, 3)

    selection = hd.ko.KeyObjectSelectionDocument.from_dataset(read["selection"])
    [reference] = selection.content.get_references()
    uid = reference.referenced_sop_instance_uid
    assert selection.resolve_reference(uid) == (case.study_uid, case.series_uid, uid)


def test_cross_patient_references_can_be_turned_off(
    query_box: Box, retrieval: Retrieval, pacs: DicomWeb, stored_slides: dict[str, StoredSlide]
) -> None:
    slide = stored_slides["query"]
    region = Region(query_box.x, query_box.y, query_box.w, query_box.h)
    result = explain_region(
        retrieval, INDEX, pacs, slide.study_uid, slide.series_uid, region, level=LEVEL, k=3, store=True,
        cross_patient=False,
    )
    assert len(result.cases) == 1 and result.referenced == 0  # the only case is another patient's
    assert [item.kind for item in result.stored] == ["map"]  # no report or selection of nothing


def test_a_region_in_slide_millimetres_is_the_same_region(
    explained: RegionExplanation, query_box: Box, retrieval: Retrieval, pacs: DicomWeb,
    stored_slides: dict[str, StoredSlide],
) -> None:
    import highdicom as hd

    slide = stored_slides["query"]
    to_mm = hd.spatial.PixelToReferenceTransformer.for_image(
        pacs.slide(slide.study_uid, slide.series_uid).dataset(0), for_total_pixel_matrix=True
    )
    # the centres of the box's first and last pixels; the slide's axes may run against the image's
    centres = to_mm(np.array([[query_box.x, query_box.y], [query_box.x + query_box.w - 1, query_box.y + query_box.h - 1]]))
    low, high = centres.min(axis=0), centres.max(axis=0)
    region = Region(low[0], low[1], high[0] - low[0], high[1] - low[1], unit="mm")
    result = explain_region(retrieval, INDEX, pacs, slide.study_uid, slide.series_uid, region, level=LEVEL, k=1)
    assert result.box == query_box and result.stored == ()


def test_a_study_indexed_again_leaves_out_the_results_written_into_it(
    explained: RegionExplanation, retrieval: Retrieval, pacs: DicomWeb, stored_slides: dict[str, StoredSlide]
) -> None:
    slide = stored_slides["query"]
    assert pacs.slide_series(slide.study_uid) == [slide.series_uid]
    summary = index_dicom(retrieval, INDEX, pacs, slide.study_uid, level=LEVEL, label="query")
    assert [image.status for image in summary.images] == ["unchanged"]


# -- errors -------------------------------------------------------------------------------------------


def test_orthanc_is_reachable_only_inside_its_private_network(orthanc: RunningOrthanc) -> None:
    # .ci/run runs as root: the isolation it documents is checked there, never assumed.
    assert orthanc.private_network, "no private network namespace here: run as root with unshare (as .ci/run does)"
    assert os.readlink(f"/proc/{orthanc.process.pid}/ns/net") != os.readlink(f"/proc/{os.getppid()}/ns/net")
    # a process in the network this test started in (its parent's) finds no Orthanc on loopback
    probe = f"import socket; socket.create_connection(('127.0.0.1', {orthanc.process.config.http_port}), timeout=2)"
    outside = subprocess.run(
        ["nsenter", f"--net=/proc/{os.getppid()}/ns/net", sys.executable, "-c", probe],
        capture_output=True, text=True, check=False,
    )
    assert outside.returncode != 0 and "ConnectionRefusedError" in outside.stderr
    inside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert inside.returncode == 0, inside.stderr


def test_a_pacs_that_goes_down_under_a_background_store_leaves_a_logged_counted_failure_and_no_partial_set(
    query_box: Box, retrieval: Retrieval, indexed: Any, stored_slides: dict[str, StoredSlide], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import pydicom

    query = stored_slides["query"]
    region = Region(query_box.x, query_box.y, query_box.w, query_box.h)
    with running_orthanc(tmp_path / "orthanc") as second:  # a PACS of its own, holding the same slides
        other = DicomWeb(second.connection)
        for slide in stored_slides.values():
            other.store([pydicom.dcmread(path) for path in slide.files], slide.study_uid)
        writer = BackgroundWriter(attempts=3, backoff_s=0.2)
        gate = threading.Event()

        def held() -> list[bytes]:  # keeps the writer busy, so the region's set waits in the queue
            gate.wait(60)
            raise RuntimeError("held, never built")

        writer.reserve().submit(held, other, query.study_uid)
        result = explain_region(
            retrieval, INDEX, other, query.study_uid, query.series_uid, region, level=LEVEL, k=3, store=True,
            writer=writer,
        )
        assert [(item.kind, item.state) for item in result.stored] == [
            ("map", "queued"), ("report", "queued"), ("selection", "queued")
        ]
        assert result.objects == () and writer.counts().waiting == 2
        second.process.stop()  # the PACS goes down with the set queued
        with caplog.at_level(logging.INFO, logger="histoxplain_service.pacs.writeback"):
            gate.set()
            assert writer.wait_idle(60)
        assert writer.close(1.0) == WriteBackCounts(waiting=0, stored=0, failed=2)  # the held one and the set
        assert "3 objects not stored after 3 attempts (DependencyUnavailable)" in caplog.text
        assert caplog.text.count("the PACS is unavailable, attempt") == 2
        uids = [query.study_uid, *(item.instance_uid for item in result.stored), *(i.series_uid for i in result.stored)]
        assert not any(uid in caplog.text for uid in uids)
        second.process.start()  # up again: none of the set is in the study
        with second.process.network():
            back = DicomWeb(second.connection)
            found = {item["0020000E"]["Value"][0] for item in back.client.search_for_series(query.study_uid)}
            back.close()
        other.close()
    assert found == {query.series_uid}


def test_a_pacs_that_is_down_is_unavailable_and_names_the_url_setting(
    orthanc: RunningOrthanc, retrieval: Retrieval, stored_slides: dict[str, StoredSlide]
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = DicomWeb(PacsConnection(f"http://127.0.0.1:{port}/dicom-web", "histoxplain", "x", timeout_s=5))
    try:
        with pytest.raises(DependencyUnavailable, match="HISTOXPLAIN_DICOMWEB_URL") as raised:
            index_dicom(retrieval, INDEX, down, stored_slides["query"].study_uid, level=LEVEL)
    finally:
        down.close()
    assert str(port) not in str(raised.value) and stored_slides["query"].study_uid not in str(raised.value)


def test_wrong_credentials_are_refused_and_name_the_credential_settings(
    orthanc: RunningOrthanc, retrieval: Retrieval, stored_slides: dict[str, StoredSlide]
) -> None:
    password = "not-the-password-" + "x" * 8
    wrong = DicomWeb(PacsConnection(orthanc.connection.url, orthanc.connection.user, password))
    try:
        with pytest.raises(PermissionDenied, match="HISTOXPLAIN_DICOMWEB_USER") as raised:
            index_dicom(retrieval, INDEX, wrong, stored_slides["query"].study_uid, level=LEVEL)
    finally:
        wrong.close()
    assert password not in str(raised.value) and "401" in str(raised.value)
    assert password not in repr(wrong.connection)


def test_unknown_uids_are_not_found_and_named_by_argument_only(
    pacs: DicomWeb, retrieval: Retrieval, stored_slides: dict[str, StoredSlide]
) -> None:
    unknown = "1.2.3.4.5.6.7.8.9"
    slide = stored_slides["query"]
    with pytest.raises(NotFound, match="study is not in the PACS"):
        index_dicom(retrieval, INDEX, pacs, unknown)
    with pytest.raises(NotFound, match=r"series_uids\[1\] is not in the study") as raised:
        index_dicom(retrieval, INDEX, pacs, slide.study_uid, [slide.series_uid, unknown])
    assert unknown not in str(raised.value)
    with pytest.raises(NotFound):
        explain_region(retrieval, INDEX, pacs, slide.study_uid, unknown, Region(0, 0, 224, 224))


@pytest.mark.parametrize(
    "region",
    [Region(2220, 100, 448, 448), Region(-100, 0, 100, 100), Region(0, 0, 0, 100), Region(9000, 9000, 1, 1),
     Region(-80.0, -80.0, 1.0, 1.0, unit="mm"), Region(0, 0, float("nan"), 10)],
    ids=["right-of-the-slide", "left-of-the-slide", "empty", "far-outside", "mm-outside", "nan"],
)
def test_a_region_off_the_slide_is_refused_before_anything_is_read(
    region: Region, retrieval: Retrieval, pacs: DicomWeb, stored_slides: dict[str, StoredSlide]
) -> None:
    slide = stored_slides["query"]
    with pytest.raises(InvalidRequest, match="region"):
        explain_region(retrieval, INDEX, pacs, slide.study_uid, slide.series_uid, region, level=LEVEL)


def test_a_region_partly_off_the_slide_is_cut_to_it(
    retrieval: Retrieval, pacs: DicomWeb, stored_slides: dict[str, StoredSlide]
) -> None:
    slide = stored_slides["query"]  # 2220 x 2967 px at level 0
    result = explain_region(
        retrieval, INDEX, pacs, slide.study_uid, slide.series_uid, Region(2000, -100, 448, 548), level=LEVEL, k=1
    )
    assert result.box == Box(2000, 0, 220, 448) and result.image.shape == (224, 110, 3)


def test_a_series_that_is_not_a_slide_is_refused(
    explained: RegionExplanation, retrieval: Retrieval, pacs: DicomWeb, stored_slides: dict[str, StoredSlide]
) -> None:
    slide = stored_slides["query"]
    report = next(item for item in explained.stored if item.kind == "report")
    with pytest.raises(InvalidRequest, match="not a whole-slide image series"):
        index_dicom(retrieval, INDEX, pacs, slide.study_uid, [report.series_uid], level=LEVEL)
    with pytest.raises(InvalidRequest, match="not a whole-slide image series"):
        explain_region(retrieval, INDEX, pacs, slide.study_uid, report.series_uid, Region(0, 0, 224, 224))
