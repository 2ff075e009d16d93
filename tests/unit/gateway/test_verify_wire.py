"""ExplainOptions.verify on every hop: SDK -> proto -> gateway choice (and its admission cost) ->
library request -> TorchServe input map, and back: library result -> handler envelope -> domain
hit -> proto -> typed SDK result and the CLI's JSON."""

from __future__ import annotations

import numpy as np
import pytest

from histoxplain_client import _convert
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_client._proto.histoxplain.v1 import types_pb2
from histoxplain_model.errors import InvalidRequest
from histoxplain_model.limits import VERIFY_FORWARD_PASSES_PER_MAP, VERIFY_STEPS
from histoxplain_model.requests import ExplainRequest
from histoxplain_model.results import Faithfulness, RetrievalExplanation
from histoxplain_model.wire.envelope import decode_envelope, encode_request_image
from histoxplain_model.wire.inputs import decode_explain_request, explain_inputs
from histoxplain_model.wire.outputs import decode_explanation, encode_explanation
from histoxplain_service.app.verify_args import faithfulness_json
from histoxplain_service.domain.types import ExplainedHit, ExplainedSearch
from histoxplain_service.gateway import converters

VERIFIED = (Faithfulness(0.41, 0.62, 0.45, 0.55, VERIFY_STEPS), Faithfulness(0.50, 0.40, 0.47, 0.44, VERIFY_STEPS))


def test_the_sdk_option_reaches_the_gateway_choice_is_echoed_and_costs_its_forward_passes() -> None:
    sent = _convert.explain_options("gradcam", "similar", "both", "float16", 0, None, None, "cosine", 0, True)
    choice = converters.explain_choice_from_proto(types_pb2.ExplainOptions.FromString(sent.SerializeToString()))
    assert choice.verify is True
    assert converters.explain_choice_to_proto(choice).verify is True
    assert converters.explain_choice_from_proto(types_pb2.ExplainOptions()).verify is False
    # Bounded: a fixed number of forward passes per explained map (k references x 2 sides).
    plain = converters.ExplainChoice(method="gradcam", side="both")
    assert choice.cost(10) == plain.cost(10) + 2 * 10 * VERIFY_FORWARD_PASSES_PER_MAP
    query_only = converters.ExplainChoice(method="gradcam", side="query", verify=True)
    assert query_only.cost(10) == converters.ExplainChoice(method="gradcam", side="query").cost(10) + 10 * VERIFY_FORWARD_PASSES_PER_MAP


def test_the_torchserve_input_map_carries_verify() -> None:
    image = np.zeros((16, 24, 3), dtype=np.uint8)
    encoded = encode_request_image(image)
    inputs = explain_inputs(ExplainRequest(image, [image], "gradcam", verify=True), encoded, [encoded])
    assert decode_explain_request(inputs, 10**6, 4).verify is True
    plain = explain_inputs(ExplainRequest(image, [image], "gradcam"), encoded, [encoded])
    assert "verify" not in plain and decode_explain_request(plain, 10**6, 4).verify is False
    with pytest.raises(InvalidRequest, match="'verify' must be 0 or 1"):
        decode_explain_request({**inputs, "verify": b"yes"}, 10**6, 4)


def test_the_handler_envelope_round_trips_the_faithfulness() -> None:
    explanation = RetrievalExplanation(
        "gradcam", "similar", np.array([0.8, 0.7], dtype=np.float32), np.zeros((2, 7, 7), np.float32), None,
        map_size=(224, 224), query_faithfulness=VERIFIED,
    )
    decoded = decode_explanation(*decode_envelope(encode_explanation(explanation, "query", 1)))
    assert decoded.query_faithfulness == VERIFIED and decoded.reference_faithfulness is None
    plain = RetrievalExplanation("gradcam", "similar", np.array([0.8], dtype=np.float32), None, None)
    assert decode_explanation(*decode_envelope(encode_explanation(plain, "query", 1))).query_faithfulness is None


def _search() -> ExplainedSearch:
    rng = np.random.default_rng(0)
    hits = tuple(
        ExplainedHit(None, 0.8, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), rng.random((32, 32)).astype(np.float32),
                     None, position, query_faithfulness=VERIFIED[position])
        for position in range(2)
    )
    return ExplainedSearch("gradcam", "similar", "query", hits[0].image, hits)


def test_the_gateway_sends_and_the_sdk_reads_typed_faithfulness() -> None:
    references = converters.explained_references(_search(), converters.ExplainChoice(side="query", verify=True))
    response = pb.ExplainResponse.FromString(pb.ExplainResponse(references=references).SerializeToString())
    first, second = (reference.faithfulness for reference in _convert.decode_explanation(response).references)
    assert first.steps == VERIFY_STEPS and first.reference is None
    assert first.query.deletion_auc == pytest.approx(0.41) and first.query.random_insertion_auc == pytest.approx(0.55)
    assert first.query.deletion_difference == pytest.approx(-0.04) and first.query.beats_random
    assert not second.query.beats_random
    assert references[0].faithfulness.query.insertion_difference == pytest.approx(0.07)


def test_the_cli_json_says_which_map_beat_random() -> None:
    rows = faithfulness_json(_search())
    assert [row["query_map"]["beats_random"] for row in rows] == [True, False]
    assert rows[0]["hit_map"] is None and rows[0]["query_map"]["deletion_difference"] == pytest.approx(-0.04)
