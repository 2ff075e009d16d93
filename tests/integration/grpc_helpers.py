"""What test_fuzz.py and test_load.py share: a real gateway (embedded backend, Qdrant local mode
in a temporary folder, free loopback port) holding one small index of real tiles.

The gateway itself is started with ``_start`` of test_gateway.py (same settings, same
background event loop), so every integration test runs the gateway the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import histoxplain_client as hc
from histoxplain_service.index.base import IndexEngine
from test_gateway import SERVING, GatewayThread, _start


@dataclass(frozen=True)
class IndexedGateway:
    """A running gateway and the index it was given.

    Attributes:
        gateway: the gateway (``target`` is its ``127.0.0.1:port``).
        engine: the gateway's own index engine, for reading the index behind its back.
        index: the index name.
        image_ids: the ids of the indexed tiles, one tile each.
    """

    gateway: GatewayThread
    engine: IndexEngine
    index: str
    image_ids: tuple[str, ...]


@contextmanager
def indexed_gateway(
    data_dir: Path, model_backend: Any, tiles: Mapping[str, bytes], index: str, **changes: Any
) -> Iterator[IndexedGateway]:
    """Start a gateway with ``changes`` to test_gateway's settings, index ``tiles`` (image id ->
    PNG, label ``ihc``) into ``index`` through the SDK, and stop it all on exit."""
    gateway, engine = _start(data_dir, model_backend, **changes)
    try:
        gateway.wait_health(SERVING)
        images = [hc.IndexImage(data, image_id=name, label="ihc", source=name) for name, data in tiles.items()]
        with hc.Client(gateway.target, timeout=120, retry=hc.NO_RETRY) as client:
            summary = client.index_images(index, images)
        assert summary.images_indexed == len(tiles), summary
        yield IndexedGateway(gateway, engine, index, tuple(tiles))
    finally:
        gateway.stop()
        engine.close()
