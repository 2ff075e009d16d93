"""The checks of the PACS RPCs' requests, made before anything is read (``gateway/dicom.py``,
``histoxplain_model.limits.check_uid``): UIDs go into DICOMweb URLs, so only DICOM UIDs pass;
counts and levels are bounded; a gateway without a PACS names the setting. The RPCs against a
real Orthanc: ``tests/integration/test_pacs_gateway.py``."""

from __future__ import annotations

import pytest

from histoxplain_client._proto.histoxplain.v1 import pacs_pb2, types_pb2
from histoxplain_model.errors import FailedPrecondition, InvalidRequest
from histoxplain_model.limits import MAX_DICOM_SERIES, MAX_PYRAMID_LEVEL, check_uid
from histoxplain_service.config import GatewaySettings, Settings
from histoxplain_service.gateway.dicom import GatewayPacs, IndexDicomJob, RegionJob

STUDY = "1.2.826.0.1.3680043.8.498.1"
SETTINGS = GatewaySettings(core=Settings(dicomweb_url="http://127.0.0.1:9/dicom-web"))
PACS = GatewayPacs(SETTINGS.core)  # opens nothing until a job runs


@pytest.mark.parametrize("uid", ["1", "0.1", "1.2.840.10008.5.1.4.1.1.77.1.6", "2.25." + "9" * 59])
def test_dicom_uids_pass(uid: str) -> None:
    assert check_uid(uid, "study_instance_uid") == uid


@pytest.mark.parametrize(
    "uid", ["", "1.", ".1", "1..2", "01.2", "1.02", "1.2a", "1/../2", "1.2?x=3", "http://h/1", " 1.2", "1.2 ", "2.25." + "9" * 60]
)
def test_anything_else_is_refused_naming_the_field_not_the_value(uid: str) -> None:
    with pytest.raises(InvalidRequest, match=r"series_instance_uids\[3\]") as caught:
        check_uid(uid, "series_instance_uids[3]")
    assert not uid.strip() or uid not in str(caught.value)


def _region(**changes: object) -> pacs_pb2.ExplainDicomRegionRequest:
    request = pacs_pb2.ExplainDicomRegionRequest(
        index="slides", study_instance_uid=STUDY, series_instance_uid=STUDY + ".2", k=3
    )
    request.region_px.width = request.region_px.height = 224
    for name, value in changes.items():
        if name == "side":
            request.options.side = value  # type: ignore[assignment]
        else:
            setattr(request, name, value)
    return request


def test_a_checked_region_request_keeps_its_choices_and_cost() -> None:
    job = RegionJob.from_request(_region(ranking=types_pb2.RANKING_LEVEL_TILE), "slides", SETTINGS, PACS)
    assert (job.index, job.k, job.image_ranking, job.choice.side) == ("slides", 3, False, "both")
    assert job.cost == 6  # Grad-CAM, k = 3, both sides
    assert RegionJob.from_request(_region(side=types_pb2.EXPLANATION_SIDE_QUERY), "slides", SETTINGS, PACS).cost == 3


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"study_instance_uid": "1.2.x"}, "study_instance_uid is not a DICOM UID"),
        ({"series_instance_uid": ""}, "series_instance_uid is not a DICOM UID"),
        ({"level": MAX_PYRAMID_LEVEL + 1}, f"level={MAX_PYRAMID_LEVEL + 1} is out of range; use 0 .* to {MAX_PYRAMID_LEVEL}"),
        ({"k": 0}, "k"),
        ({"ranking": 7}, "unknown ranking level"),
        ({"store_mode": 7}, "unknown store_mode 7; use STORE_MODE_SYNCHRONOUS or STORE_MODE_BACKGROUND"),
        ({"side": types_pb2.EXPLANATION_SIDE_RETRIEVED}, "QUERY or BOTH"),
    ],
)
def test_bad_region_requests_are_invalid(changes: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        RegionJob.from_request(_region(**changes), "slides", SETTINGS, PACS)


def test_a_region_request_without_a_region_is_invalid() -> None:
    request = _region()
    request.ClearField("region_px")
    with pytest.raises(InvalidRequest, match="region_px .* or region_mm"):
        RegionJob.from_request(request, "slides", SETTINGS, PACS)


def test_index_requests_are_bounded_and_checked() -> None:
    request = pacs_pb2.IndexDicomRequest(index="slides", study_instance_uid=STUDY, level=2, label="H&E")
    request.tiling.tile_size = 256
    job = IndexDicomJob.from_request(request, "slides", SETTINGS.core, PACS)
    assert (job.study_uid, job.series_uids, job.level, job.label, job.settings.tile_size) == (STUDY, (), 2, "H&E", 256)
    request.series_instance_uids.extend(f"{STUDY}.{n}" for n in range(MAX_DICOM_SERIES + 1))
    with pytest.raises(InvalidRequest, match=f"the limit is {MAX_DICOM_SERIES}"):
        IndexDicomJob.from_request(request, "slides", SETTINGS.core, PACS)
    del request.series_instance_uids[1:]
    request.series_instance_uids.append("1.2.3/../../studies")
    with pytest.raises(InvalidRequest, match=r"series_instance_uids\[1\] is not a DICOM UID"):
        IndexDicomJob.from_request(request, "slides", SETTINGS.core, PACS)
    request.tiling.tile_size = 8
    del request.series_instance_uids[:]
    with pytest.raises(InvalidRequest, match="tile_size"):
        IndexDicomJob.from_request(request, "slides", SETTINGS.core, PACS)


def test_a_gateway_without_a_pacs_names_the_setting() -> None:
    no_pacs = GatewayPacs(Settings())
    assert not no_pacs.configured
    with pytest.raises(FailedPrecondition, match="HISTOXPLAIN_DICOMWEB_URL"):
        IndexDicomJob.from_request(
            pacs_pb2.IndexDicomRequest(index="slides", study_instance_uid=STUDY), "slides", Settings(), no_pacs
        )
    with pytest.raises(FailedPrecondition, match="HISTOXPLAIN_DICOMWEB_URL"):
        RegionJob.from_request(_region(), "slides", GatewaySettings(core=Settings()), no_pacs)
    with pytest.raises(FailedPrecondition, match="HISTOXPLAIN_DICOMWEB_URL"):
        no_pacs.get()
