"""The explanation target and the region correspondences on every hop: SDK -> proto -> gateway
choice -> library request -> TorchServe input map -> handler, and back: library result -> handler
envelope -> gateway -> proto -> SDK, and into the HTML report."""

from __future__ import annotations

import re

import numpy as np
import pytest

from histoxplain_client import Box
from histoxplain_client import RegionCorrespondence as SdkCorrespondence
from histoxplain_client import _convert
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_client._proto.histoxplain.v1 import types_pb2
from histoxplain_model.errors import InvalidRequest, UnknownNameError
from histoxplain_model.limits import MAX_CORRESPONDENCES
from histoxplain_model.requests import ExplainRequest
from histoxplain_model.results import RegionCorrespondence, RetrievalExplanation
from histoxplain_model.wire.envelope import decode_envelope, encode_request_image
from histoxplain_model.wire.inputs import decode_explain_request, explain_inputs
from histoxplain_model.wire.outputs import decode_explanation, encode_explanation
from histoxplain_service.app.correspondence_args import correspondences_json
from histoxplain_service.app.matched_regions import OUTLINE_COLOURS
from histoxplain_service.app.report import write_report
from histoxplain_service.domain.types import ExplainedHit, ExplainedSearch
from histoxplain_service.gateway import converters

PAIRS = (
    (
        RegionCorrespondence((0, 0, 29, 43), (32, 64, 32, 32), 0.0125, 1),
        RegionCorrespondence((171, 257, 29, 43), (0, 192, 32, 32), -0.0005, 2),
    ),
    (RegionCorrespondence((28, 42, 29, 43), (96, 96, 32, 32), 0.03, 1),),
)


def test_the_sdk_options_reach_the_gateway_choice_and_are_echoed() -> None:
    sent = _convert.explain_options("simmap", "similar", "both", "float16", 0, None, None, "projection", 5)
    choice = converters.explain_choice_from_proto(types_pb2.ExplainOptions.FromString(sent.SerializeToString()))
    assert (choice.target, choice.correspondences) == ("projection", 5)
    echoed = converters.explain_choice_to_proto(choice)
    assert (echoed.target, echoed.correspondences) == (types_pb2.EXPLANATION_TARGET_PROJECTION, 5)
    default = converters.explain_choice_from_proto(types_pb2.ExplainOptions())
    assert (default.target, default.correspondences) == ("cosine", 0)
    assert converters.explain_choice_to_proto(default).target == types_pb2.EXPLANATION_TARGET_COSINE
    # Correspondences cost at most one forward pass of each image: k + 1 units on top.
    assert choice.cost(10) == converters.ExplainChoice(method="simmap").cost(10) + 11


def test_out_of_range_and_unknown_values_are_refused_by_field_name() -> None:
    with pytest.raises(InvalidRequest, match=rf"correspondences={MAX_CORRESPONDENCES + 1} is out of range; use 1 to {MAX_CORRESPONDENCES}"):
        converters.explain_choice_from_proto(types_pb2.ExplainOptions(correspondences=MAX_CORRESPONDENCES + 1))
    with pytest.raises(UnknownNameError, match="explanation target"):
        converters.explain_choice_from_proto(types_pb2.ExplainOptions(target=7))
    with pytest.raises(ValueError, match="correspondences must be >= 0"):
        _convert.explain_options("gradcam", "similar", "both", "float16", 0, None, None, "cosine", -1)
    with pytest.raises(ValueError, match="target"):
        _convert.explain_options("gradcam", "similar", "both", "float16", 0, None, None, "dot", 0)


def test_the_torchserve_input_map_carries_target_and_correspondences() -> None:
    image = np.zeros((16, 24, 3), dtype=np.uint8)
    encoded = encode_request_image(image)
    request = ExplainRequest(image, [image], "gradcam", target="projection", correspondences=3)
    inputs = explain_inputs(request, encoded, [encoded])
    decoded = decode_explain_request(inputs, 10**6, 4)
    assert (decoded.target, decoded.correspondences) == ("projection", 3)
    plain = explain_inputs(ExplainRequest(image, [image], "gradcam"), encoded, [encoded])
    assert "target" not in plain and "correspondences" not in plain  # defaults travel as absence
    assert (decode_explain_request(plain, 10**6, 4).target, decode_explain_request(plain, 10**6, 4).correspondences) == ("cosine", 0)
    with pytest.raises(InvalidRequest, match="correspondences"):
        decode_explain_request({**inputs, "correspondences": b"99"}, 10**6, 4)
    with pytest.raises(InvalidRequest, match="'correspondences' must be a whole number"):
        decode_explain_request({**inputs, "correspondences": b"-1"}, 10**6, 4)


def test_the_handler_envelope_round_trips_the_pairs() -> None:
    explanation = RetrievalExplanation(
        "simmap", "similar", np.array([0.8, 0.7], dtype=np.float32), np.zeros((2, 7, 7), np.float32), None,
        map_size=(224, 224), correspondences=PAIRS,
    )
    meta, arrays = decode_envelope(encode_explanation(explanation, "query", 1))
    assert decode_explanation(meta, arrays).correspondences == PAIRS
    without = RetrievalExplanation("gradcam", "similar", np.array([0.8], dtype=np.float32), None, None)
    meta, arrays = decode_envelope(encode_explanation(without, "query", 1))
    assert decode_explanation(meta, arrays).correspondences is None


def _search() -> ExplainedSearch:
    rng = np.random.default_rng(0)
    query = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    hits = tuple(
        ExplainedHit(None, 0.8 - 0.1 * position, rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
                     rng.random((224, 224)).astype(np.float32), None, position, correspondences=PAIRS[position])
        for position in range(2)
    )
    return ExplainedSearch("simmap", "similar", "query", query, hits)


def test_the_gateway_sends_and_the_sdk_reads_typed_pairs() -> None:
    search = _search()
    references = converters.explained_references(search, converters.ExplainChoice(method="simmap", side="query"))
    response = pb.ExplainResponse.FromString(pb.ExplainResponse(references=references).SerializeToString())
    explanation = _convert.decode_explanation(response)
    first = explanation.references[0].correspondences
    assert first == (
        SdkCorrespondence(Box(0, 0, 29, 43), Box(32, 64, 32, 32), pytest.approx(0.0125), 1),
        SdkCorrespondence(Box(171, 257, 29, 43), Box(0, 192, 32, 32), pytest.approx(-0.0005), 2),
    )
    assert [len(reference.correspondences) for reference in explanation.references] == [2, 1]


def test_the_cli_json_lists_each_hits_pairs() -> None:
    rows = correspondences_json(_search())
    assert rows[0]["correspondences"][1] == {"rank": 2, "query_box": [171, 257, 29, 43], "hit_box": [0, 192, 32, 32], "share": -0.0005}
    assert [len(row["correspondences"]) for row in rows] == [2, 1]


def test_the_report_outlines_matched_regions_on_both_images_with_the_same_number_and_colour(tmp_path) -> None:
    page = write_report([_search()], tmp_path / "report", title="matches").read_text()
    assert "<th>Matched regions</th>" in page
    for pairs in PAIRS:
        for pair in pairs:
            colour = OUTLINE_COLOURS[pair.rank - 1]
            for x, y, width, height in (pair.query_box, pair.reference_box):
                outline = (f'<rect x="{x}" y="{y}" width="{width}" height="{height}" fill="none" stroke="{colour}"')
                assert outline in page
    # Each drawing's viewBox is its image's own pixel grid (the query is 200 x 300 px).
    assert page.count('viewBox="0 0 200 300"') == 2 and page.count('viewBox="0 0 224 224"') == 2
    numbers = re.findall(r'data-rank="(\d+)"', page)
    assert sorted(numbers) == ["1", "1", "1", "1", "2", "2"]  # each pair drawn once on each image
    plain = _search()
    unmatched = ExplainedSearch(plain.method, plain.polarity, plain.side, plain.query_image,
                                tuple(ExplainedHit(h.hit, h.similarity, h.image, h.query_heatmap, None, h.position) for h in plain.hits))
    assert "Matched regions" not in write_report([unmatched], tmp_path / "plain", title="plain").read_text()
