"""Admission control: the cost model, the budget, and a busy gateway refusing at once.

A backend whose explanations block until the test lets them go stands in for a long
SmoothGrad; the gateway is real (port 0, grpc.aio) so the status codes are what clients see.
"""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc import aio
from PIL import Image
from qdrant_client import QdrantClient

from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2_grpc as pb_grpc
from histoxplain_client._proto.histoxplain.v1 import types_pb2
from histoxplain_model.errors import InvalidRequest, ResourceExhausted
from histoxplain_model.requests import ExplainRequest
from histoxplain_model.results import ModelInfo, RetrievalExplanation
from histoxplain_service.config import GatewaySettings, Settings
from histoxplain_service.gateway.admission import Admission, explain_cost
from histoxplain_service.gateway.server import Gateway
from histoxplain_service.index.qdrant import QdrantEngine


def test_cost_model() -> None:
    assert explain_cost("gradcam", 10, "query", 25) == 10
    assert explain_cost("gradcampp", 10, "both", 25) == 20
    assert explain_cost("smoothgrad", 10, "retrieved", 25) == 500
    assert explain_cost("smoothgrad", 100, "both", 256) == 102_400


def test_budget_refuses_what_never_fits_and_what_does_not_fit_now() -> None:
    admission = Admission(100)
    with pytest.raises(InvalidRequest, match="HISTOXPLAIN_MAX_EXPLAIN_COST"):
        admission.take(101)
    admission.take(60)
    with pytest.raises(ResourceExhausted, match="retry"):
        admission.take(50)
    admission.take(40)
    assert admission.in_flight == 100
    admission.give_back(60)
    admission.take(50)
    assert admission.in_flight == 90


class BlockingBackend:
    """Explanations wait for ``release``; counts how many are running."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.running = 0

    def info(self) -> ModelInfo:
        return ModelInfo("tiny", "resnet18", 4, (8, 8), ("gradcam", "gradcampp", "smoothgrad"), "blocking")

    def ready(self) -> bool:
        return True

    def embed(self, images: Any, timeout: float | None = None) -> np.ndarray:
        raise NotImplementedError

    def explain(self, request: ExplainRequest, timeout: float | None = None) -> RetrievalExplanation:
        self.running += 1
        try:
            self.release.wait(30)
        finally:
            self.running -= 1
        scores = np.zeros(len(request.references), np.float32)
        return RetrievalExplanation(request.method, request.polarity, scores, None, None)

    def close(self) -> None:
        pass


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _explain(references: int, samples: int) -> pb.ExplainRequest:
    options = types_pb2.ExplainOptions(
        method=types_pb2.EXPLANATION_METHOD_SMOOTHGRAD, side=types_pb2.EXPLANATION_SIDE_QUERY,
        smoothgrad_samples=samples,
    )
    return pb.ExplainRequest(
        query_image=_png(), images=pb.ReferenceImages(images=[_png()] * references), options=options
    )


def test_a_busy_gateway_refuses_at_once_and_holds_units_until_abandoned_work_ends(tmp_path: Path) -> None:
    async def main() -> None:
        # 2 * 10 samples * 2 references = 40 units a call; the budget holds one call, not two.
        settings = GatewaySettings(core=Settings(data_dir=tmp_path), port=0, backend="embedded", max_explain_cost=60)
        backend = BlockingBackend()
        qdrant = QdrantClient(":memory:")
        gateway = Gateway(settings, backend, QdrantEngine(settings.core, qdrant))
        await gateway.start()
        try:
            async with aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                stub = pb_grpc.RetrievalServiceStub(channel)
                with pytest.raises(aio.AioRpcError) as too_big:
                    await stub.Explain(_explain(references=4, samples=10), timeout=5)
                assert too_big.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                # The first call times out for its client while its work goes on.
                first = asyncio.ensure_future(stub.Explain(_explain(references=2, samples=10), timeout=1.0))
                with pytest.raises(aio.AioRpcError) as expired:
                    await first
                assert expired.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                assert backend.running == 1
                with pytest.raises(aio.AioRpcError) as busy:
                    await stub.Explain(_explain(references=2, samples=10), timeout=5)
                assert busy.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "retry" in busy.value.details()
                backend.release.set()
                while backend.running or gateway.servicer._admission.in_flight:
                    await asyncio.sleep(0.05)
                response = await stub.Explain(_explain(references=2, samples=10), timeout=10)
                assert len(response.references) == 2
        finally:
            backend.release.set()
            await gateway.stop(0)
            qdrant.close()

    asyncio.run(main())
