"""Decompression bombs under the old 400 Mpx limit are refused before they cost memory.

A 12 KB 1-bit PNG and a JPEG header both declaring 10000 x 10000 px (100 Mpx, a quarter of
``HISTOXPLAIN_MAX_PIXELS``) once raised the gateway's RSS by 2.6 GB in one Search. Images sent as
bytes now get ``HISTOXPLAIN_MAX_REQUEST_PIXELS`` (16 Mpx by default), checked from the header.
A fresh interpreter measures its own peak RSS (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) around the domain's decoder, a Search and an IndexImages stream
through an in-process gateway; each may raise it by at most :data:`RSS_BOUND_MB`, where
decoding one such bomb takes 1.5 GB or more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path


#: The most a refused bomb may raise the process's peak RSS (decoding it: > 1000 MB).
RSS_BOUND_MB = 40

CHILD = textwrap.dedent(
    r'''
    import asyncio, io, json, struct, sys, zlib
    from pathlib import Path

    import grpc
    from grpc import aio
    from PIL import Image
    from qdrant_client import QdrantClient

    from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
    from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2_grpc as pb_grpc
    from histoxplain_client._proto.histoxplain.v1 import types_pb2
    from histoxplain_model.errors import InvalidRequest
    from histoxplain_model.results import ModelInfo
    from histoxplain_service.config import GatewaySettings, Settings
    from histoxplain_service.domain.checks import decode_request_image
    from histoxplain_service.gateway.server import Gateway
    from histoxplain_service.index.qdrant import QdrantEngine

    SIDE = 10_000

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    def png_bomb():
        """A valid 1-bit greyscale PNG of SIDE x SIDE black pixels (about 12 KB)."""
        compressor = zlib.compressobj(9)
        row = b"\x00" * (1 + SIDE // 8)
        body = b"".join(compressor.compress(row) for _ in range(SIDE)) + compressor.flush()
        header = struct.pack(">IIBBBBB", SIDE, SIDE, 1, 0, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")

    def jpeg_bomb():
        """A small real JPEG whose frame header (SOF0) is rewritten to claim SIDE x SIDE."""
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 110, 170)).save(buffer, format="JPEG")
        data = bytearray(buffer.getvalue())
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", SIDE, SIDE)
        return bytes(data)

    def rss_mb(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(field)

    def peak_rise(action):
        """(peak RSS rise in MB while action() runs, its result)."""
        Path("/proc/self/clear_refs").write_text("5")  # peak := current
        before = rss_mb("VmRSS")
        result = action()
        return rss_mb("VmHWM") - before, result

    class Backend:
        def info(self):
            return ModelInfo("tiny", "none", 3, (32, 32), ("gradcam",), "scripted")
        def ready(self):
            return True
        def embed(self, images, timeout=None):
            raise AssertionError("a refused image must never reach the model")
        def explain(self, request, timeout=None):
            raise AssertionError("a refused image must never reach the model")
        def close(self):
            pass

    def refused(decode):
        try:
            decode()
        except InvalidRequest as error:
            return type(error).__name__
        return "decoded"

    async def main():
        bombs = {"png": png_bomb(), "jpeg": jpeg_bomb()}
        results = {"sizes": {name: len(data) for name, data in bombs.items()}}
        settings = GatewaySettings(core=Settings(data_dir=Path(sys.argv[1])), port=0, backend="embedded",
                                   health_interval_s=0.5, grace_period_s=0.5)
        for name, data in bombs.items():
            decode = lambda: decode_request_image(data, settings.core, "query image")
            results[f"domain-{name}"] = peak_rise(lambda: refused(decode))
        qdrant = QdrantClient(":memory:")
        gateway = Gateway(settings, Backend(), QdrantEngine(settings.core, qdrant))
        await gateway.start()
        try:
            async with aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                stub = pb_grpc.RetrievalServiceStub(channel)
                await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)  # warm up the call path
                for name, data in bombs.items():
                    async def search():
                        try:
                            await stub.Search(pb.SearchRequest(index="bombs", image=data, k=1), timeout=60)
                        except aio.AioRpcError as error:
                            return error.code().name, error.details()
                        return "OK", ""
                    rise, answer = await peak_rise_async(search)
                    results[f"search-{name}"] = [rise, answer]

                    async def index():
                        requests = [pb.IndexImagesRequest(config=pb.IndexImagesConfig(index="bombs")),
                                    pb.IndexImagesRequest(image={"content": data, "source": "x"})]
                        response = await stub.IndexImages(iter(requests), timeout=60)
                        return [types_pb2.SkipReason.Name(item.reason) for item in response.skipped]
                    rise, answer = await peak_rise_async(index)
                    results[f"index-{name}"] = [rise, answer]
        finally:
            await gateway.stop(0)
            qdrant.close()
        print(json.dumps(results))

    async def peak_rise_async(action):
        Path("/proc/self/clear_refs").write_text("5")
        before = rss_mb("VmRSS")
        result = await action()
        return rss_mb("VmHWM") - before, result

    asyncio.run(main())
    '''
)


def test_bombs_are_refused_from_the_header_without_raising_rss(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["sizes"]["png"] < 16 * 1024 and results["sizes"]["jpeg"] < 16 * 1024
    for name in ("png", "jpeg"):
        rise, outcome = results[f"domain-{name}"]
        assert outcome == "ImageTooLargeError" and rise < RSS_BOUND_MB, (name, rise, outcome)
        rise, (code, details) = results[f"search-{name}"]
        assert code == "INVALID_ARGUMENT" and rise < RSS_BOUND_MB, (name, rise, code)
        assert "10000x10000" in details and "HISTOXPLAIN_MAX_REQUEST_PIXELS" in details
        rise, reasons = results[f"index-{name}"]
        assert reasons == ["SKIP_REASON_IMAGE_TOO_LARGE"] and rise < RSS_BOUND_MB, (name, rise, reasons)
