"""The PACS package without a PACS: settings and credentials, error mapping, and the DICOM objects
built for the demo slide converted to DICOM (tests/integration/test_pacs.py runs the real Orthanc)."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from histoxplain_model.errors import (
    DependencyUnavailable,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from histoxplain_service.config import Settings
from histoxplain_service.pacs.connection import PacsConnection, pacs_errors
from histoxplain_service.pacs.results import (
    SOP_CLASSES,
    RegionOnLevel,
    SimilarCase,
    heatmap_map,
    heatmap_overlay,
    region_polygon,
    similar_cases_report,
    similar_cases_selection,
)
from histoxplain_service.pacs.slides import dicom_image_id, dicom_source

URL = "http://127.0.0.1:8042/dicom-web"


def test_credentials_come_from_the_password_file_and_stay_out_of_repr(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret-value\n")
    settings = Settings.from_env(
        {"HISTOXPLAIN_DICOMWEB_URL": URL + "/", "HISTOXPLAIN_DICOMWEB_USER": "hx",
         "HISTOXPLAIN_DICOMWEB_PASSWORD_FILE": str(secret)}
    )
    connection = PacsConnection.from_settings(settings)
    assert (connection.url, connection.user, connection.password) == (URL, "hx", "s3cret-value")
    assert "s3cret" not in repr(connection) and "s3cret" not in repr(settings)
    assert connection.session().auth == ("hx", "s3cret-value")


def test_a_bearer_token_is_sent_from_its_file_and_a_refreshed_one_from_the_next_request(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first-token-value\n")
    connection = PacsConnection.from_settings(
        Settings.from_env({"HISTOXPLAIN_DICOMWEB_URL": URL, "HISTOXPLAIN_DICOMWEB_TOKEN_FILE": str(token_file)})
    )
    session = connection.session()

    def authorization() -> str:
        return session.prepare_request(requests.Request("GET", URL + "/studies")).headers["Authorization"]

    assert authorization() == "Bearer first-token-value"
    assert "first-token" not in repr(connection) and "first-token" not in repr(session.auth)
    token_file.write_text("second-token-value-longer\n")  # a refresher rewrote it (the size changes)
    assert authorization() == "Bearer second-token-value-longer"
    token_file.write_text("")  # a refresher that failed half-way: no header with an empty token
    with pytest.raises(DependencyUnavailable, match="HISTOXPLAIN_DICOMWEB_TOKEN_FILE"):
        authorization()


@pytest.mark.parametrize(
    ("environ", "error", "names"),
    [
        ({}, FailedPrecondition, "HISTOXPLAIN_DICOMWEB_URL"),
        ({"HISTOXPLAIN_DICOMWEB_URL": URL, "HISTOXPLAIN_DICOMWEB_TOKEN_FILE": "/nonexistent/token"},
         DependencyUnavailable, "HISTOXPLAIN_DICOMWEB_TOKEN_FILE"),
        ({"HISTOXPLAIN_DICOMWEB_URL": "http://pacs.example/dicom-web", "HISTOXPLAIN_DICOMWEB_TOKEN_FILE": "/x"},
         InvalidRequest, "https://"),
        ({"HISTOXPLAIN_DICOMWEB_URL": URL, "HISTOXPLAIN_DICOMWEB_USER": "hx", "HISTOXPLAIN_DICOMWEB_TOKEN_FILE": "/x"},
         InvalidRequest, "keep one way"),
        ({"HISTOXPLAIN_DICOMWEB_URL": URL, "HISTOXPLAIN_DICOMWEB_PASSWORD": "x"}, InvalidRequest,
         "HISTOXPLAIN_DICOMWEB_USER"),
        ({"HISTOXPLAIN_DICOMWEB_URL": URL, "HISTOXPLAIN_DICOMWEB_USER": "hx", "HISTOXPLAIN_DICOMWEB_PASSWORD": "x",
          "HISTOXPLAIN_DICOMWEB_PASSWORD_FILE": "/nonexistent"}, InvalidRequest, "keep one"),
        ({"HISTOXPLAIN_DICOMWEB_URL": URL, "HISTOXPLAIN_DICOMWEB_USER": "hx",
          "HISTOXPLAIN_DICOMWEB_PASSWORD_FILE": "/nonexistent/password"}, DependencyUnavailable,
         "HISTOXPLAIN_DICOMWEB_PASSWORD_FILE"),
    ],
    ids=["no-url", "unreadable-token", "token-over-http", "token-and-user", "password-without-user",
         "password-and-file", "unreadable-file"],
)
def test_a_misconfigured_pacs_names_the_setting(environ: dict[str, str], error: type, names: str) -> None:
    with pytest.raises(error, match=names):
        PacsConnection.from_settings(Settings.from_env(environ))


def test_settings_refuse_a_url_that_is_not_http_and_a_bad_switch() -> None:
    with pytest.raises(InvalidRequest, match="HISTOXPLAIN_DICOMWEB_URL"):
        Settings.from_env({"HISTOXPLAIN_DICOMWEB_URL": "dicomweb.example"})
    with pytest.raises(InvalidRequest, match="HISTOXPLAIN_DICOM_CROSS_PATIENT"):
        Settings.from_env({"HISTOXPLAIN_DICOM_CROSS_PATIENT": "maybe"})
    assert Settings().dicom_cross_patient is True


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} for url {URL}/studies/1.2.3", response=response)


@pytest.mark.parametrize(
    ("raised", "expected", "names"),
    [
        (requests.ConnectionError("refused"), DependencyUnavailable, "HISTOXPLAIN_DICOMWEB_URL"),
        (requests.Timeout("slow"), DependencyUnavailable, "HISTOXPLAIN_DICOMWEB_URL"),
        (_http_error(401), PermissionDenied, "HISTOXPLAIN_DICOMWEB_USER"),
        (_http_error(403), PermissionDenied, "HISTOXPLAIN_DICOMWEB_PASSWORD_FILE"),
        (_http_error(404), NotFound, "gone"),
        (_http_error(500), DependencyUnavailable, "PACS log"),
    ],
    ids=["refused", "timeout", "401", "403", "404", "500"],
)
def test_pacs_failures_become_errors_that_name_the_setting_and_no_url(
    raised: Exception, expected: type, names: str
) -> None:
    with pytest.raises(expected, match=names) as caught:
        with pacs_errors("reading a slide", not_found="gone"):
            raise raised
    assert "1.2.3" not in str(caught.value) and "http" not in str(caught.value)


def test_a_slide_is_the_same_image_on_every_machine() -> None:
    assert dicom_image_id("1.2", "3.4") == dicom_image_id("1.2", "3.4") != dicom_image_id("1.2", "3.5")
    assert len(dicom_image_id("1.2", "3.4")) == 40
    assert dicom_source("1.2", "3.4") == "dicomweb:studies/1.2/series/3.4"


# -- the objects, on the demo slide converted to DICOM ---------------------------------------------


@pytest.fixture(scope="module")
def level(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Level 1 of the demo slide as DICOM (1110 x 1484 px, 0.998 µm/px), metadata only."""
    import pydicom

    from histoxplain_service.app.samples import he_slide_path
    from histoxplain_service.pacs.dicomize import dicomize

    slide = dicomize(he_slide_path(), tmp_path_factory.mktemp("dicom"))
    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in slide.files]
    return next(ds for ds in datasets if ds.TotalPixelMatrixColumns == 1110)


def _cases(count: int, studies: int) -> list[SimilarCase]:
    from pydicom.uid import generate_uid

    study_uids = [generate_uid() for _ in range(studies)]
    return [SimilarCase(i + 1, 0.9 - i / 100, study_uids[i % studies], generate_uid(), generate_uid()) for i in range(count)]


def test_the_region_polygon_runs_along_the_outer_edges_of_its_pixels(level: Any) -> None:
    polygon = region_polygon(RegionOnLevel(level, 10, 20, 4, 2))
    spacing = 0.000998  # mm, level 1
    assert polygon.shape == (5, 3) and np.array_equal(polygon[0], polygon[-1])
    edges = np.abs(np.diff(polygon[:, :2], axis=0)).max(axis=1)
    np.testing.assert_allclose(edges, [4 * spacing, 2 * spacing, 4 * spacing, 2 * spacing], rtol=1e-6)


def test_the_heatmap_map_is_placed_at_the_region_and_holds_the_values(level: Any) -> None:
    import highdicom as hd

    heatmap = np.linspace(0, 1, 30 * 40, dtype=np.float32).reshape(30, 40)
    parametric_map = heatmap_map(RegionOnLevel(level, 100, 200, 40, 30), heatmap, "gradcam", "test")
    assert parametric_map.FrameOfReferenceUID == level.FrameOfReferenceUID
    assert (parametric_map.TotalPixelMatrixColumns, parametric_map.TotalPixelMatrixRows) == (40, 30)
    corner = hd.spatial.PixelToReferenceTransformer.for_image(level, for_total_pixel_matrix=True)(np.array([[100, 200]]))
    origin = parametric_map.TotalPixelMatrixOriginSequence[0]
    np.testing.assert_allclose([origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem], corner[0, :2])
    np.testing.assert_array_equal(parametric_map.get_total_pixel_matrix(), heatmap)
    with pytest.raises(InvalidRequest, match="region"):
        heatmap_map(RegionOnLevel(level, 100, 200, 41, 30), heatmap, "gradcam", "test")


def test_results_refuse_a_slide_without_a_frame_of_reference(level: Any) -> None:
    copy = deepcopy(level)
    del copy.FrameOfReferenceUID
    with pytest.raises(FailedPrecondition, match="Frame of Reference"):
        similar_cases_report(RegionOnLevel(copy, 0, 0, 8, 8), _cases(1, 1), "gradcam")


def test_a_map_at_the_levels_top_left_pixel_is_refused_by_field_and_one_pixel_in_is_written(level: Any) -> None:
    heatmap = np.linspace(0, 1, 32 * 24, dtype=np.float32).reshape(24, 32)
    with pytest.raises(InvalidRequest, match="region: .*x >= 1 or y >= 1"):
        RegionOnLevel(level, 0, 0, 32, 24).check_storable()
    with pytest.raises(InvalidRequest, match="x = y = 0"):
        heatmap_map(RegionOnLevel(level, 0, 0, 32, 24), heatmap, "gradcam", "test")
    for x, y in ((1, 0), (0, 1)):
        parametric_map = heatmap_map(RegionOnLevel(level, x, y, 32, 24), heatmap, "gradcam", "test")
        np.testing.assert_array_equal(parametric_map.get_total_pixel_matrix(), heatmap)


def test_the_selection_lists_cases_of_several_other_studies_by_uid_only(level: Any) -> None:
    cases = _cases(5, 3)
    selection = similar_cases_selection(RegionOnLevel(level, 0, 0, 8, 8), cases, "gradcam")
    assert selection.PatientID == level.PatientID and selection.StudyInstanceUID == level.StudyInstanceUID
    listed = {
        (study.StudyInstanceUID, series.SeriesInstanceUID, sop.ReferencedSOPInstanceUID)
        for study in selection.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert listed == {(case.study_uid, case.series_uid, case.instance_uid) for case in cases}
    import highdicom as hd

    report = hd.sr.Comprehensive3DSR.from_dataset(similar_cases_report(RegionOnLevel(level, 0, 0, 8, 8), cases, "gradcam"))
    groups = report.content.get_planar_roi_measurement_groups()
    assert [group.get_measurements()[0].value for group in groups] == pytest.approx([case.similarity for case in cases])
    with pytest.raises(InvalidRequest):
        similar_cases_selection(RegionOnLevel(level, 0, 0, 8, 8), [], "gradcam")


def test_objects_take_the_uids_given_before_building_and_are_of_the_sop_class_announced(level: Any) -> None:
    region, cases = RegionOnLevel(level, 100, 200, 40, 30), _cases(2, 1)
    heatmap = np.linspace(0, 1, 30 * 40, dtype=np.float32).reshape(30, 40)
    built = {
        "map": lambda uids: heatmap_map(region, heatmap, "gradcam", "test", uids),
        "overlay": lambda uids: heatmap_overlay(region, np.zeros((30, 40, 3), np.uint8), heatmap, "gradcam", "t", uids=uids),
        "report": lambda uids: similar_cases_report(region, cases, "gradcam", uids),
        "selection": lambda uids: similar_cases_selection(region, cases, "gradcam", uids),
    }
    assert set(built) == set(SOP_CLASSES)
    for number, (kind, build) in enumerate(built.items()):
        uids = (f"1.2.826.0.1.3680043.8.498.9{number}", f"1.2.826.0.1.3680043.8.498.9{number}.1")
        dataset = build(uids)
        assert (dataset.SeriesInstanceUID, dataset.SOPInstanceUID, dataset.SOPClassUID) == (*uids, SOP_CLASSES[kind]), kind
        fresh = build(None)
        assert fresh.SOPClassUID == SOP_CLASSES[kind] and fresh.SOPInstanceUID not in uids, kind
