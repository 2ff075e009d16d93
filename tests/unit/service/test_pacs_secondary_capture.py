"""The Secondary Capture overlay built without a PACS (tests/integration/test_pacs_overlay.py
stores it in a real Orthanc and runs dciodvfy on what comes back)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.overlay import overlay
from histoxplain_service.pacs.results import RegionOnLevel, heatmap_overlay

from test_pacs_objects import level  # noqa: F401 -- fixture: level 1 of the demo slide as DICOM


def test_the_overlay_blends_the_heatmap_over_the_region_and_keeps_the_slide_identity(level: Any) -> None:
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    heatmap = np.linspace(0, 1, 30 * 40, dtype=np.float32).reshape(30, 40)
    picture = heatmap_overlay(RegionOnLevel(level, 100, 200, 40, 30), image, heatmap, "gradcam", "test", alpha=0.25)
    np.testing.assert_array_equal(picture.pixel_array, overlay(image, heatmap, 0.25))
    assert (picture.Rows, picture.Columns, picture.PhotometricInterpretation) == (30, 40, "RGB")
    assert (picture.StudyInstanceUID, picture.PatientID) == (level.StudyInstanceUID, level.PatientID)
    assert picture.ContainerIdentifier == level.ContainerIdentifier
    assert [float(v) for v in picture.PixelSpacing] == [
        float(v) for v in level.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    ]


@pytest.mark.parametrize(("image_shape", "heatmap_shape"), [((30, 41, 3), (30, 40)), ((30, 40, 3), (29, 40))])
def test_the_overlay_refuses_pixels_that_are_not_the_region(level: Any, image_shape: tuple, heatmap_shape: tuple) -> None:
    with pytest.raises(InvalidRequest, match="region's 30x40 px"):
        heatmap_overlay(
            RegionOnLevel(level, 0, 0, 40, 30), np.zeros(image_shape, np.uint8), np.zeros(heatmap_shape, np.float32),
            "gradcam", "test",
        )
