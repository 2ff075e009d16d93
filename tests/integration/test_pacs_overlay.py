"""The optional Secondary Capture overlay written beside the Parametric Map, against a real
Orthanc: stored in a new series of the query's study, valid for dciodvfy, and reading back as
the region's pixels with the heatmap blended over them. Reuses test_pacs.py's fixtures (the
demo slide as two studies, indexed at level 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histoxplain_model.overlay import overlay
from histoxplain_service.domain.retrieval import Retrieval
from histoxplain_service.domain.types import Box
from histoxplain_service.pacs.dicomweb import DicomWeb
from histoxplain_service.pacs.explain import Region, explain_region
from histoxplain_service.pacs.results import SERIES_NUMBERS

from pacs_fixtures import StoredSlide, orthanc, pacs, stored_slides  # noqa: F401 -- fixtures
from test_pacs import INDEX, LEVEL, _dciodvfy_errors, backend, indexed, query_box, retrieval  # noqa: F401 -- fixtures

pytestmark = pytest.mark.integration

SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def test_the_overlay_is_a_valid_rgb_secondary_capture_of_the_region_with_its_heatmap(
    query_box: Box, retrieval: Retrieval, pacs: DicomWeb, stored_slides: dict[str, StoredSlide], tmp_path: Path
) -> None:
    query, case = stored_slides["query"], stored_slides["case"]
    region = Region(query_box.x, query_box.y, query_box.w, query_box.h)
    result = explain_region(
        retrieval, INDEX, pacs, query.study_uid, query.series_uid, region, level=LEVEL, k=3, store=True,
        store_overlay=True,
    )
    stored = {item.kind: item for item in result.stored}
    assert set(stored) == {"map", "overlay", "report", "selection"}
    item = stored["overlay"]
    assert item.sop_class_uid == SC_IMAGE_STORAGE
    assert len({stored_item.series_uid for stored_item in result.stored}) == 4  # each in a series of its own

    dataset = pacs.client.retrieve_instance(query.study_uid, item.series_uid, item.instance_uid)
    path = tmp_path / "overlay.dcm"
    dataset.save_as(path, enforce_file_format=True)
    assert _dciodvfy_errors(path) == []
    raw = path.read_bytes()
    assert case.patient_id.encode() not in raw and b"PatientB" not in raw  # nothing of the other patient
    assert (dataset.StudyInstanceUID, dataset.PatientID) == (query.study_uid, query.patient_id)
    assert (dataset.PhotometricInterpretation, dataset.SamplesPerPixel) == ("RGB", 3)
    assert dataset.SeriesNumber == SERIES_NUMBERS["overlay"]
    pixels = dataset.pixel_array
    assert pixels.shape == result.image.shape and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, overlay(result.image, result.heatmap, 0.4))
    assert not np.array_equal(pixels, result.image)  # the heatmap is in it
