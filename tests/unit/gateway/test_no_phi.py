"""No patient data in logs or error messages: an SDK round trip through an in-process gateway.

Labels, sources and image ids like ``PATIENT=Jane Doe`` are indexed, searched, explained and
deleted, with every kind of bad input next to them (unreadable, too large, over a length
limit, NaN mpp, unknown ids, a 10,000-character index name). Every log record of the process
(all loggers, DEBUG and up) and every error message the client sees are scanned for them; the
TorchServe backend's messages are checked for its internal address and key-file path.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from qdrant_client import QdrantClient

import histoxplain_client as hc
from histoxplain_model import errors
from histoxplain_model.limits import LABEL, SOURCE
from histoxplain_model.requests import ExplainRequest
from histoxplain_model.results import ModelInfo, RetrievalExplanation
from histoxplain_service.backends.torchserve.backend import TorchServeBackend, TorchServeConfig
from histoxplain_service.config import GatewaySettings, Settings
from histoxplain_service.gateway.server import Gateway
from histoxplain_service.index.qdrant import QdrantEngine

PHI_LABEL = "PATIENT=Jane Doe;DOB=1950-01-01"
PHI_SOURCE = "/pacs/PATIENT=Jane Doe;MRN=4711/slide-3.png"
PHI_ID = "MRN-4711-Jane-Doe"
SECRETS = ("Jane Doe", "MRN=4711", "MRN-4711")
SIZE = 32


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    colour = np.array([200, 110, 170]) if seed % 2 else np.array([90, 60, 160])
    pixels = np.clip(colour + rng.integers(-20, 20, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_bomb(side: int = 10_000) -> bytes:
    """A PNG header declaring side x side RGB pixels (a few hundred bytes)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


class MeanColourBackend:
    """A model backend without a model: mean-colour embeddings, flat heatmaps."""

    def info(self) -> ModelInfo:
        return ModelInfo("mean-colour", "none", 3, (SIZE, SIZE), ("gradcam",), "scripted")

    def ready(self) -> bool:
        return True

    def embed(self, images: Sequence[np.ndarray], timeout: float | None = None) -> np.ndarray:
        means = np.stack([image.reshape(-1, 3).mean(axis=0) for image in images]).astype(np.float32) + 1.0
        return means / np.linalg.norm(means, axis=1, keepdims=True)

    def explain(self, request: ExplainRequest, timeout: float | None = None) -> RetrievalExplanation:
        count = len(request.references)
        query, references = self.embed([request.query]), self.embed(list(request.references))
        maps = np.full((count, SIZE, SIZE), 0.5, np.float32)
        return RetrievalExplanation(request.method, request.polarity, (references @ query[0]).astype(np.float32),
                                    maps if request.side != "retrieved" else None,
                                    maps if request.side != "query" else None)

    def close(self) -> None:
        pass


class GatewayThread:
    """A :class:`Gateway` on port 0 in a background event loop, for the synchronous SDK."""

    def __init__(self, data_dir: Path) -> None:
        settings = GatewaySettings(
            core=Settings(data_dir=data_dir, tile_size=SIZE, min_tissue=0.0), port=0, backend="embedded",
            health_interval_s=0.5, grace_period_s=0.5,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="phi-gateway", daemon=True)
        self._thread.start()
        self._qdrant = QdrantClient(":memory:")
        self.gateway = self._call(self._make(settings))
        self._call(self.gateway.start())
        self.target = f"127.0.0.1:{self.gateway.port}"

    async def _make(self, settings: GatewaySettings) -> Gateway:
        return Gateway(settings, MeanColourBackend(), QdrantEngine(settings.core, self._qdrant))

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(60)

    def stop(self) -> None:
        self._call(self.gateway.stop(0.5))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._qdrant.close()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayThread]:
    running = GatewayThread(tmp_path / "data")
    yield running
    running.stop()


def _failure(call: Callable[[], Any]) -> hc.ApiError:
    try:
        call()
    except hc.ApiError as error:
        return error
    pytest.fail("the call succeeded")


def test_a_round_trip_with_patient_data_logs_and_returns_none_of_it(
    gateway: GatewayThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    messages: list[str] = []
    with hc.Client(gateway.target, timeout=60, retry=hc.NO_RETRY) as client:
        summary = client.index_images("cases", [
            hc.IndexImage(_png(1), image_id=PHI_ID, label=PHI_LABEL, source=PHI_SOURCE, mpp=0.5),
            hc.IndexImage(_png(2), image_id=PHI_ID + "-b", label=PHI_LABEL, source=PHI_SOURCE),
            hc.IndexImage(b"not an image", image_id=PHI_ID + "-c", label=PHI_LABEL, source=PHI_SOURCE),
            hc.IndexImage(_png(1)[:90], label=PHI_LABEL, source=PHI_SOURCE),  # truncated
            hc.IndexImage(_png_bomb(), label=PHI_LABEL, source=PHI_SOURCE),
            hc.IndexImage(_png(3), label=PHI_LABEL * 10, source=PHI_SOURCE),
            hc.IndexImage(_png(4), label=PHI_LABEL, source=PHI_SOURCE * 100),
            hc.IndexImage(_png(5), image_id=PHI_ID, label=PHI_LABEL, source=PHI_SOURCE),  # repeated id
            hc.IndexImage(_png(6), label=PHI_LABEL, source=PHI_SOURCE, mpp=math.nan),
        ])
        assert summary.images_indexed == 2
        assert [(s.position, s.reason) for s in summary.skipped] == [
            (2, "unreadable_image"), (3, "unreadable_image"), (4, "image_too_large"), (5, "invalid_metadata"),
            (6, "invalid_metadata"), (7, "duplicate_image_id"), (8, "invalid_metadata"),
        ]
        assert len(PHI_LABEL * 10) > LABEL.max_chars and len(PHI_SOURCE * 100) > SOURCE.max_chars
        messages += [skipped.message for skipped in summary.skipped]

        hits = client.search("cases", _png(1), k=5)
        assert hits[0].label == PHI_LABEL and hits[0].source == PHI_SOURCE and hits[0].mpp == 0.5
        explained = client.search_and_explain("cases", _png(1), k=2)
        assert len(explained.references) == 2
        by_id = client.explain(_png(1), index="cases", image_ids=[PHI_ID], point_ids=[hits[1].point_id])
        assert len(by_id.references) == 2

        failures = {
            "unknown image id": lambda: client.explain(_png(1), index="cases", image_ids=[PHI_ID + "-unknown"]),
            "image id over the limit": lambda: client.delete("cases", [PHI_ID * 100]),
            "bad point id": lambda: client.explain(_png(1), index="cases", point_ids=[PHI_ID]),
            "unreadable query": lambda: client.search("cases", b"\x89PNG\r\n\x1a\n" + PHI_SOURCE.encode(), k=1),
            "query bomb": lambda: client.search("cases", _png_bomb(), k=1),
            "huge index name": lambda: client.search("PATIENT" + "x" * 10_000, _png(1), k=1),
            "unknown index": lambda: client.search("no-such-index", _png(1), k=1),
        }
        for case, call in failures.items():
            error = _failure(call)
            expected = hc.NotFound if case.startswith("unknown") else hc.InvalidArgument
            assert isinstance(error, expected), f"{case}: {error!r}"
            assert len(error.details) < 400, f"{case}: {len(error.details)} characters"
            messages.append(error.details)
        deleted = client.delete("cases", [PHI_ID, PHI_ID + "-b"])
        assert deleted.images_deleted == 2

    logged = caplog.text + "\n".join(record.getMessage() for record in caplog.records)
    assert any("skipping input" in record.getMessage() for record in caplog.records)
    for secret in SECRETS:
        assert secret not in logged, f"{secret!r} in the log"
        leaks = [message for message in messages if secret in message]
        assert not leaks, f"{secret!r} in {leaks}"


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("code", [
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION,
])
def test_torchserve_errors_name_neither_its_address_nor_its_key_file(code: grpc.StatusCode, tmp_path: Path) -> None:
    key_file = tmp_path / "secret-folder" / "key_file.json"
    backend = TorchServeBackend(TorchServeConfig(target="10.1.2.3:7070", key_file=key_file))
    try:
        mapped = backend._map_rpc_error(FakeRpcError(code, "failed to connect to ipv4:10.1.2.3:7070"))
        assert isinstance(mapped, errors.HistoxplainError) and mapped.status_code != "INTERNAL"
        assert "10.1.2.3" not in str(mapped) and "secret-folder" not in str(mapped)
        with pytest.raises(errors.DependencyUnavailable) as missing_key:
            backend.info(timeout=1)
        assert "secret-folder" not in str(missing_key.value) and "10.1.2.3" not in str(missing_key.value)
    finally:
        backend.close()
