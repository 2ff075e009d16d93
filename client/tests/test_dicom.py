"""The SDK's DICOM methods (index_dicom, explain_dicom_region) against an in-process gRPC server
running a fake servicer: what goes on the wire, what comes back typed, what is retried, and what
is refused before sending. The real gateway and PACS are exercised end to end in
``tests/integration/test_pacs_gateway.py``."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from histoxplain_client import (
    AsyncClient,
    Box,
    Client,
    DicomReference,
    DicomRegionExplanation,
    IndexedSeries,
    SkippedSeries,
    StoredDicomObject,
    Unavailable,
)
from histoxplain_client._proto.histoxplain.v1 import pacs_pb2, types_pb2
from histoxplain_client.arrays import encode_array
from test_client import FAST_RETRY, RAMP, FakeRetrievalService, address, client  # noqa: F401 -- fixtures

STUDY, SERIES, OTHER = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"


class FakePacsService(FakeRetrievalService):
    """The fake gateway plus the two PACS RPCs: it records each request and answers from it."""

    def IndexDicom(self, request, context):
        self._enter("IndexDicom", context)
        self.requests["IndexDicom"] = request
        series = list(request.series_instance_uids) or [SERIES, OTHER]
        return pacs_pb2.IndexDicomResponse(
            index=request.index,
            series=[pacs_pb2.IndexedDicomSeries(
                series_instance_uid=series[0], image_id="a" * 40, tiles=12, status=pacs_pb2.DICOM_INDEX_STATUS_INDEXED,
            )],
            series_indexed=1, tiles_indexed=12,
            skipped=[pacs_pb2.SkippedDicomSeries(
                series_instance_uid=uid, reason=types_pb2.SKIP_REASON_NO_TISSUE, message="no tissue found",
            ) for uid in series[1:]],
        )

    def ExplainDicomRegion(self, request, context):
        self._enter("ExplainDicomRegion", context)
        self.requests["ExplainDicomRegion"] = request
        box = request.region_px if request.WhichOneof("region") == "region_px" else types_pb2.Box(x=1, y=2, width=3, height=4)
        hit = types_pb2.SearchHit(
            score=0.9, image_id="b" * 40, point_id="c" * 36, box=box, level=request.level,
            dicom=types_pb2.DicomReference(
                study_instance_uid=OTHER, series_instance_uid=OTHER + ".1", sop_instance_uid=OTHER + ".2",
                frame_of_reference_uid=OTHER + ".3",
            ),
        )
        heatmap = types_pb2.Heatmap(values=encode_array(RAMP, types_pb2.ARRAY_DTYPE_FLOAT32))
        response = pacs_pb2.ExplainDicomRegionResponse(
            options=request.options, region=box, level=request.level, referenced_cases=1,
            results=[types_pb2.ExplainedReference(reference_index=0, hit=hit, similarity=0.9, query_heatmap=heatmap)],
        )
        if request.store_results:
            response.stored.append(pacs_pb2.StoredDicomObject(
                kind=pacs_pb2.STORED_DICOM_OBJECT_KIND_PARAMETRIC_MAP, series_instance_uid=STUDY + ".7",
                sop_instance_uid=STUDY + ".8", sop_class_uid=PM_CLASS,
            ))
            if request.store_mode == pacs_pb2.STORE_MODE_BACKGROUND:  # else unset, as gateways before store_mode
                response.stored[0].state = pacs_pb2.STORED_DICOM_OBJECT_STATE_QUEUED
        return response


@pytest.fixture
def fake() -> FakePacsService:
    """Replaces test_client's ``fake``: its ``address`` and ``client`` fixtures serve this one."""
    return FakePacsService()


def test_index_dicom_sends_uids_level_and_tiling_and_types_the_summary(client: Client, fake: FakePacsService) -> None:
    summary = client.index_dicom(
        "slides", STUDY, [SERIES, OTHER], level=2, tile_size=256, stride=128, min_tissue_fraction=0.5, label="H&E"
    )
    sent = fake.requests["IndexDicom"]
    assert (sent.index, sent.study_instance_uid, list(sent.series_instance_uids)) == ("slides", STUDY, [SERIES, OTHER])
    assert (sent.level, sent.tiling.tile_size, sent.tiling.stride, sent.label) == (2, 256, 128, "H&E")
    assert sent.tiling.min_tissue_fraction == pytest.approx(0.5)
    assert summary.series == (IndexedSeries(SERIES, "a" * 40, 12, "indexed"),)
    assert summary.skipped == (SkippedSeries(OTHER, "no_tissue", "no tissue found"),)
    assert (summary.index, summary.series_indexed, summary.tiles_indexed) == ("slides", 1, 12)
    client.index_dicom("slides", STUDY)  # the whole study: no series named
    assert list(fake.requests["IndexDicom"].series_instance_uids) == [] and fake.requests["IndexDicom"].level == 0


def test_explain_dicom_region_in_pixels_or_millimetres_types_the_result(client: Client, fake: FakePacsService) -> None:
    result = client.explain_dicom_region(
        "slides", STUDY, SERIES, region=(100, 200, 448, 448), level=1, k=3, side="query", heatmap_dtype="float32",
        filter={"label": "tumour"}, store_results=True,
    )
    sent = fake.requests["ExplainDicomRegion"]
    assert sent.WhichOneof("region") == "region_px" and (sent.region_px.x, sent.region_px.width) == (100, 448)
    assert (sent.study_instance_uid, sent.series_instance_uid, sent.level, sent.k) == (STUDY, SERIES, 1, 3)
    assert sent.ranking == types_pb2.RANKING_LEVEL_IMAGE and sent.store_results
    assert sent.store_mode == pacs_pb2.STORE_MODE_SYNCHRONOUS
    assert sent.options.side == types_pb2.EXPLANATION_SIDE_QUERY and sent.filter.conditions[0].values == ["tumour"]
    assert isinstance(result, DicomRegionExplanation) and result.side == "query"
    assert result.region == Box(100, 200, 448, 448) and result.level == 1 and result.referenced_cases == 1
    assert result.hits[0].dicom == DicomReference(OTHER, OTHER + ".1", OTHER + ".2", OTHER + ".3")
    np.testing.assert_array_equal(result.query_heatmaps[0], RAMP)
    assert result.stored == (StoredDicomObject("parametric_map", STUDY + ".7", STUDY + ".8", PM_CLASS),)

    assert not sent.store_overlay
    in_mm = client.explain_dicom_region("slides", STUDY, SERIES, region_mm=(1.5, 2.25, 0.5, 0.5), ranking="tile")
    sent = fake.requests["ExplainDicomRegion"]
    assert sent.WhichOneof("region") == "region_mm" and (sent.region_mm.x, sent.region_mm.height) == (1.5, 0.5)
    assert sent.ranking == types_pb2.RANKING_LEVEL_TILE and not sent.store_results and in_mm.stored == ()
    client.explain_dicom_region("slides", STUDY, SERIES, region=(0, 0, 8, 8), store_results=True, store_overlay=True)
    assert fake.requests["ExplainDicomRegion"].store_overlay
    queued = client.explain_dicom_region("slides", STUDY, SERIES, region=(0, 0, 8, 8), store_results=True, store_background=True)
    assert fake.requests["ExplainDicomRegion"].store_mode == pacs_pb2.STORE_MODE_BACKGROUND
    assert [item.state for item in queued.stored] == ["queued"]


def test_storing_results_is_never_retried_but_reading_and_indexing_are(client: Client, fake: FakePacsService) -> None:
    fake.fail_with["IndexDicom"] = [grpc.StatusCode.UNAVAILABLE]
    client.index_dicom("slides", STUDY, [SERIES])
    assert fake.calls["IndexDicom"] == 2  # re-indexing is idempotent
    fake.fail_with["ExplainDicomRegion"] = [grpc.StatusCode.UNAVAILABLE]
    client.explain_dicom_region("slides", STUDY, SERIES, region=(0, 0, 10, 10))
    assert fake.calls["ExplainDicomRegion"] == 2
    fake.fail_with["ExplainDicomRegion"] = [grpc.StatusCode.UNAVAILABLE]
    with pytest.raises(Unavailable):  # a retry could store the objects twice
        client.explain_dicom_region("slides", STUDY, SERIES, region=(0, 0, 10, 10), store_results=True)
    assert fake.calls["ExplainDicomRegion"] == 3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one of region"),
        ({"region": (0, 0, 10, 10), "region_mm": (0.0, 0.0, 1.0, 1.0)}, ValueError, "exactly one of region"),
        ({"region": (0, 0, 0, 10)}, ValueError, "width and height >= 1"),
        ({"region": (0.5, 0, 10, 10)}, ValueError, "integers"),
        ({"region": (0, 0, 10)}, ValueError, "four numbers"),
        ({"region_mm": (0.0, 0.0, float("nan"), 1.0)}, ValueError, "finite"),
        ({"region": (0, 0, 10, 10), "k": 0}, ValueError, "k must be >= 1"),
        ({"region": (0, 0, 10, 10), "level": -1}, ValueError, "level must be >= 0"),
        ({"region": (0, 0, 10, 10), "ranking": "slide"}, ValueError, "unknown ranking"),
    ],
)
def test_bad_region_requests_are_refused_before_sending(
    client: Client, fake: FakePacsService, kwargs: dict, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        client.explain_dicom_region("slides", STUDY, SERIES, **kwargs)
    with pytest.raises(TypeError, match="not one string"):
        client.index_dicom("slides", STUDY, SERIES)  # type: ignore[arg-type]
    assert fake.calls["ExplainDicomRegion"] == fake.calls["IndexDicom"] == 0


def test_the_async_client_offers_the_same(address: str, fake: FakePacsService) -> None:
    async def scenario():
        async with AsyncClient(address, retry=FAST_RETRY) as sdk:
            fake.fail_with["ExplainDicomRegion"] = [grpc.StatusCode.UNAVAILABLE]
            with pytest.raises(Unavailable):
                await sdk.explain_dicom_region("slides", STUDY, SERIES, region=(0, 0, 8, 8), store_results=True)
            indexed = await sdk.index_dicom("slides", STUDY, [SERIES], level=1)
            explained = await sdk.explain_dicom_region("slides", STUDY, SERIES, region=(0, 0, 8, 8), store_results=True)
            return indexed, explained

    indexed, explained = asyncio.run(scenario())
    assert indexed.series[0].series_uid == SERIES and fake.requests["IndexDicom"].level == 1
    assert [item.kind for item in explained.stored] == ["parametric_map"] and explained.hits[0].dicom is not None
    assert fake.calls["ExplainDicomRegion"] == 2  # the failed store was not retried; the second call is new
