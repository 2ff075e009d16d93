"""The limits table (``histoxplain_model.limits``) against the contract (the .proto comments).

Every string field of the API either carries a length stated in its comment, equal to the
table's number for that field, or is marked "set by the server". Each limit is enforced at
exactly that value, and a search answer at the largest ``k`` whose hits carry every text at its
limit fits the default message size of both the gateway and the SDK.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from histoxplain_client._channel import DEFAULT_MAX_MESSAGE_BYTES as CLIENT_MAX_MESSAGE_BYTES
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_client._proto.histoxplain.v1 import types_pb2
from histoxplain_model.errors import InvalidRequest
from histoxplain_model.imageio import DEFAULT_MAX_REQUEST_PIXELS
from histoxplain_model.limits import (
    MAX_K,
    MAX_MESSAGE_BYTES,
    MAX_MPP,
    MAX_N_SAMPLES,
    TEXT_LIMITS,
    TextLimit,
    check_mpp,
    shorten,
)
from histoxplain_service.config import GatewaySettings, Settings
from histoxplain_service.domain.types import MAX_FILTER_CONDITIONS, MAX_FILTER_VALUES

PROTO = Path(__file__).resolve().parents[3] / "proto" / "histoxplain" / "v1"
_FIELD = re.compile(r"^\s*(?:repeated\s+|optional\s+)?([\w.]+)\s+(\w+)\s*=\s*\d+\s*;")
_MESSAGE = re.compile(r"^\s*message\s+(\w+)\s*\{")


def _proto_fields() -> dict[str, tuple[str, str]]:
    """``Message.field`` -> (type, the comment lines just above it joined by spaces)."""
    fields: dict[str, tuple[str, str]] = {}
    for path in sorted(PROTO.glob("*.proto")):
        message, comment = "", []
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith("//"):
                comment.append(stripped[2:].strip())
                continue
            if match := _MESSAGE.match(line):
                message = match.group(1)
            elif message and (match := _FIELD.match(line)):
                fields[f"{message}.{match.group(2)}"] = (match.group(1), " ".join(comment))
            comment = []
    return fields


FIELDS = _proto_fields()
STRING_FIELDS = {name for name, (kind, _) in FIELDS.items() if kind == "string"}
#: Strings the server fills from its own configuration (never from a caller).
SERVER_DEFINED = {
    "GetModelInfoResponse.server_version", "IndexInfo.encoder_preset", "ModelInfo.preset",
    "ModelInfo.architecture", "ModelInfo.backend",
}


def test_the_parser_sees_the_contract() -> None:
    assert FIELDS["ImageRecord.label"][0] == "string" and FIELDS["SearchRequest.k"][0] == "uint32"
    assert len(STRING_FIELDS) >= 20


@pytest.mark.parametrize("limit", TEXT_LIMITS, ids=lambda limit: limit.field)
def test_each_text_limit_is_stated_in_the_proto_comments(limit: TextLimit) -> None:
    for name in limit.proto_fields:
        kind, comment = FIELDS[name]
        assert kind == "string", name
        stated = re.findall(r"at most (\d+) characters", comment)
        assert stated == [str(limit.max_chars)], f"{name}: {comment!r} should state at most {limit.max_chars}"


def test_filter_counts_are_stated_in_the_proto_comments() -> None:
    assert f"1 to {MAX_FILTER_VALUES}," in FIELDS["FieldCondition.values"][1]
    assert f"at most {MAX_FILTER_CONDITIONS}," in FIELDS["TileFilter.conditions"][1]


def test_every_string_field_has_a_stated_limit_or_is_set_by_the_server() -> None:
    limited = {name for limit in TEXT_LIMITS for name in limit.proto_fields}
    assert limited.isdisjoint(SERVER_DEFINED)
    assert STRING_FIELDS == limited | SERVER_DEFINED
    for name in SERVER_DEFINED:
        assert "set by the server" in FIELDS[name][1], name


def test_numeric_limits_are_the_ones_the_proto_states() -> None:
    assert f"1 to {MAX_K}." in FIELDS["SearchRequest.k"][1]
    assert f"1 to {MAX_K}." in FIELDS["SearchAndExplainRequest.k"][1]
    assert f"1 to {MAX_K} references" in (PROTO / "retrieval_service.proto").read_text()
    assert f"1 to {MAX_N_SAMPLES}." in FIELDS["ExplainOptions.smoothgrad_samples"][1]
    for name in ("ImageRecord.mpp", "SearchHit.mpp"):
        assert f"finite number in (0, {MAX_MPP:g}]" in FIELDS[name][1], name
    assert f"{DEFAULT_MAX_REQUEST_PIXELS:,} pixels" in FIELDS["ImageRecord.content"][1]
    assert f"{DEFAULT_MAX_REQUEST_PIXELS:,} pixels" in FIELDS["SearchRequest.image"][1]
    assert Settings().max_request_pixels == DEFAULT_MAX_REQUEST_PIXELS
    assert GatewaySettings(core=Settings()).max_k == MAX_K


@pytest.mark.parametrize("limit", TEXT_LIMITS, ids=lambda limit: limit.field)
def test_each_text_limit_is_enforced_at_exactly_its_value(limit: TextLimit) -> None:
    assert limit.check("é" * limit.max_chars, "image 0") == "é" * limit.max_chars
    secret = "PATIENT=Jane Doe;" * (limit.max_chars // 17 + 1)
    with pytest.raises(InvalidRequest) as caught:
        limit.check(secret[: limit.max_chars + 1], "image 7")
    message = str(caught.value)
    assert limit.field in message and "image 7" in message and f"limit is {limit.max_chars:,}" in message
    assert "Jane" not in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 0.0, -0.5, MAX_MPP * 1.001])
def test_mpp_must_be_finite_and_in_range(value: float) -> None:
    with pytest.raises(InvalidRequest, match=r"mpp of image 2 is .*finite number in \(0, 1000\]"):
        check_mpp(value, "image 2")


def test_mpp_in_range_passes() -> None:
    assert check_mpp(None) is None and check_mpp(0.25) == 0.25 and check_mpp(MAX_MPP) == MAX_MPP


def test_shorten_repeats_a_short_prefix_only() -> None:
    assert shorten("crc") == "'crc'"
    long = shorten("x" * 10_000)
    assert len(long) < 60 and "10,000 characters" in long


def _worst_case_hit(rank: int) -> types_pb2.SearchHit:
    """A hit whose every text is at its limit in 4-byte UTF-8 characters (the most bytes)."""
    by_field = {limit.field: limit.max_chars for limit in TEXT_LIMITS}
    wide = "\U0001F52C"  # 4 bytes in UTF-8
    return types_pb2.SearchHit(
        score=-0.999, image_id=wide * by_field["image_id"], point_id="f" * by_field["point_id"],
        label=wide * by_field["label"], source=wide * by_field["source"],
        box=types_pb2.Box(x=2**32 - 1, y=2**32 - 1, width=2**32 - 1, height=2**32 - 1),
        level=2**32 - 1, mpp=MAX_MPP, matched_tiles=rank + 2**31,
    )


def test_a_search_at_the_largest_k_fits_the_default_message_size() -> None:
    response = pb.SearchResponse(hits=[_worst_case_hit(rank) for rank in range(MAX_K)])
    size = response.ByteSize()
    assert size <= 2 * 1024 * 1024  # what the limits module docstring states (about 1.9 MB)
    assert size < MAX_MESSAGE_BYTES // 16 and size < CLIENT_MAX_MESSAGE_BYTES // 16
