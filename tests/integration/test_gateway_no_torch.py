"""The gateway in front of TorchServe never imports torch, for any RPC.

A fresh interpreter builds the gateway the way ``python -m histoxplain_service.gateway.server``
does (``bootstrap.create_backend`` with ``HISTOXPLAIN_BACKEND=torchserve``), runs every RPC of
``histoxplain.v1.RetrievalService`` through the SDK against the real TorchServe of the session
fixture, and reports which heavy model packages ended up in ``sys.modules``. The gateway image
installs no torch (``docker/gateway.Dockerfile``), so any such import would break it there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_stopping import _free_port

pytestmark = pytest.mark.integration

_SCRIPT = r'''
import asyncio, io, json, sys
import numpy as np
from PIL import Image
from skimage import data
from histoxplain_client import Client, IndexImage, Unavailable, RiseOptions
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_service.bootstrap import create_backend, open_gateway_index
from histoxplain_service.config import GatewaySettings
from histoxplain_service.gateway.server import Gateway

def png(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()

ihc = data.immunohistochemistry()
tiles = [png(np.ascontiguousarray(ihc[y:y + 224, x:x + 224])) for x, y in ((0, 0), (224, 0), (0, 224), (224, 224))]
query = png(np.ascontiguousarray(ihc[100:324, 100:324]))
called = set()

def every_rpc(port):
    with Client(f"127.0.0.1:{port}", timeout=120) as client:
        client.wait_until_ready(60); called.add("Health")
        client.info(); called.add("GetModelInfo")
        image_ids = [f"tile-{n}" for n in range(len(tiles))]
        client.index_images("cases", [IndexImage(tile, image_id=i) for tile, i in zip(tiles, image_ids)])
        called.add("IndexImages")
        client.list_indexes(); called.add("ListIndexes")
        client.describe_index("cases"); called.add("DescribeIndex")
        client.search("cases", query, k=2); client.search("cases", query, k=2, ranking="image"); called.add("Search")
        for method in ("gradcam", "gradcampp", "smoothgrad", "simmap", "rise"):
            client.search_and_explain("cases", query, k=2, method=method, smoothgrad_samples=2, rise=RiseOptions(masks=8))
        client.search_and_explain("cases", query, k=2, ranking="image"); called.add("SearchAndExplain")
        client.explain(query, index="cases", image_ids=image_ids[:2]); client.explain(query, references=tiles[:2])
        called.add("Explain")
        client.delete("cases", image_ids[:1]); called.add("DeleteImages")
        # the PACS RPCs load the pacs package (wsidicom, highdicom); no PACS listens: UNAVAILABLE
        for pacs_call in (lambda: client.index_dicom("cases", "1.2.3"),
                          lambda: client.explain_dicom_region("cases", "1.2.3", "1.2.4", region=(0, 0, 8, 8), k=1)):
            try:
                pacs_call()
                raise AssertionError("a PACS answered where none listens")
            except Unavailable:
                pass
        called.update(("IndexDicom", "ExplainDicomRegion"))

async def main():
    settings = GatewaySettings.from_env()
    backend, index_engine = create_backend(settings), open_gateway_index(settings)
    gateway = Gateway(settings, backend, index_engine)
    await gateway.start()
    try:
        await asyncio.to_thread(every_rpc, gateway.port)
    finally:
        await gateway.stop(0)
        index_engine.close()
        backend.close()

asyncio.run(main())
rpcs = set(pb.DESCRIPTOR.services_by_name["RetrievalService"].methods_by_name)
heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "torchvision", "timm", "onnxruntime"))
print(json.dumps({"missed_rpcs": sorted(rpcs - called), "heavy_modules": heavy[:20]}))
'''


def test_every_rpc_runs_without_importing_torch(torchserve, tmp_path: Path) -> None:
    env = {
        **os.environ,
        **torchserve.env,
        "HISTOXPLAIN_DATA": str(tmp_path / "data"),
        "HISTOXPLAIN_PORT": "0",
        "QDRANT_URL": "",  # the embedded index: this test is about the gateway process itself
        "HISTOXPLAIN_DICOMWEB_URL": f"http://127.0.0.1:{_free_port()}/dicom-web",  # a PACS that is down
    }
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["missed_rpcs"] == []
    assert report["heavy_modules"] == []
