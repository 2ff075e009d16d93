"""The audit log: one JSON line per API call with who, what, where, how it ended and how long;
refused calls too; nothing of the request's content."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2_grpc as pb_grpc

FIELDS = {"request_id", "principal", "rpc", "index", "count", "status", "latency_ms"}


def _lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(record.getMessage()) for record in caplog.records if record.name == "histoxplain.audit"]


def test_every_call_gives_one_line_with_principal_status_and_request_id(
    start_gateway: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = secrets.token_urlsafe(24)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{hashlib.sha256(token.encode()).hexdigest()} reader pathology-viewer\n")
    running = start_gateway(auth_tokens_file=tokens)
    authorised = (("authorization", f"Bearer {token}"), ("x-request-id", "case-review-42"))
    with grpc.insecure_channel(running.address) as channel, caplog.at_level(logging.INFO, logger="histoxplain.audit"):
        stub = pb_grpc.RetrievalServiceStub(channel)
        response, call = stub.ListIndexes.with_call(pb.ListIndexesRequest(), timeout=10, metadata=authorised)
        assert dict(call.trailing_metadata())["x-request-id"] == "case-review-42"
        with pytest.raises(grpc.RpcError) as missing:
            stub.DescribeIndex(pb.DescribeIndexRequest(index="ward-7"), timeout=10, metadata=authorised)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError):
            stub.DeleteImages(pb.DeleteImagesRequest(index="ward-7", image_ids=["PATIENT=Jane Doe"]), timeout=10,
                              metadata=authorised)
        with pytest.raises(grpc.RpcError):
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    lines = _lines(caplog)
    assert [(line["rpc"], line["status"]) for line in lines] == [
        ("ListIndexes", "OK"), ("DescribeIndex", "NOT_FOUND"), ("DeleteImages", "PERMISSION_DENIED"),
        ("GetModelInfo", "UNAUTHENTICATED"),
    ]
    assert all(set(line) == FIELDS for line in lines)
    assert [line["principal"] for line in lines] == ["pathology-viewer", "pathology-viewer", "?", "?"]
    assert lines[0]["request_id"] == "case-review-42" and lines[0]["count"] == len(response.indexes) == 0
    assert lines[1]["index"] == "ward-7" and lines[3]["request_id"] != lines[0]["request_id"]
    assert all(line["latency_ms"] >= 0 for line in lines)
    assert "Jane Doe" not in caplog.text and token not in caplog.text


def test_without_authentication_the_principal_is_a_dash(
    start_gateway: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    running = start_gateway()
    with grpc.insecure_channel(running.address) as channel, caplog.at_level(logging.INFO, logger="histoxplain.audit"):
        pb_grpc.RetrievalServiceStub(channel).GetModelInfo(
            pb.GetModelInfoRequest(), timeout=10, metadata=(("x-request-id", "not a plain token!"),)
        )
    (line,) = _lines(caplog)
    assert (line["principal"], line["rpc"], line["status"], line["index"]) == ("-", "GetModelInfo", "OK", None)
    assert line["request_id"] != "not a plain token!"
