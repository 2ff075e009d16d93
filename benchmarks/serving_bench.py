"""Serving benchmark: latency and throughput of Search and SearchAndExplain (GradCAM, k=10).

Three ways, on loopback only:
  in-process         Retrieval (the domain layer) called directly with the embedded backend
                     (decode + embed + Qdrant + explain; no overlays, no protobuf)
  gateway+embedded   the gRPC gateway (in this process, port 0) with the embedded backend, via the SDK
  gateway+torchserve the gateway with a real TorchServe (fresh .mar), batching off (batchSize 1)
                     and on (batchSize 8, maxBatchDelay 10 ms)
each with 1 and 8 concurrent clients. Bounded request counts; it stops by itself.

    .venv/bin/python benchmarks/serving_bench.py [--quick] [--no-results]

Prints a table and the ratio gateway+TorchServe p50 / in-process p50 for SearchAndExplain at one
client (target <= 1.3x), and writes them under "## Serving" in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)

import histoxplain_client as hc  # noqa: E402
from histoxplain_model.imageio import decode_image  # noqa: E402
from histoxplain_service.gateway_settings import GatewaySettings  # noqa: E402
from histoxplain_service.index import open_qdrant  # noqa: E402
from histoxplain_service.retrieval import Retrieval  # noqa: E402
from histoxplain_service.server import Gateway  # noqa: E402
from histoxplain_service.settings import Settings  # noqa: E402
from results_md import RESULTS, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INDEX = "bench"
K = 10
TILE = 224


@dataclass(frozen=True)
class Row:
    way: str
    batching: str
    clients: int
    rpc: str
    requests: int
    p50_ms: float
    p95_ms: float
    throughput: float


def sample_tiles(count: int) -> list[bytes]:
    """``count`` 224x224 PNG crops of the packaged IHC image and H&E slide (real histology)."""
    from skimage import data

    sources = [data.immunohistochemistry()]
    try:
        from histoxplain_service.samples import he_slide_path
        from tiffslide import TiffSlide

        with TiffSlide(str(he_slide_path())) as slide:
            sources.append(np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB")))
    except Exception as error:  # noqa: BLE001 -- the IHC image alone is enough to benchmark
        logging.warning("H&E sample unavailable (%s); using the IHC image only", error)
    rng = np.random.default_rng(0)
    tiles = []
    for i in range(count):
        source = sources[i % len(sources)]
        y = int(rng.integers(0, source.shape[0] - TILE))
        x = int(rng.integers(0, source.shape[1] - TILE))
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(source[y : y + TILE, x : x + TILE])).save(buffer, format="PNG")
        tiles.append(buffer.getvalue())
    return tiles


def measure(call: Callable[[int], Any], requests: int, clients: int) -> tuple[list[float], float]:
    """Run ``requests`` calls spread over ``clients`` threads; (latencies in s, wall time in s)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(indices: list[int]) -> None:
        for i in indices:
            start = time.perf_counter()
            call(i)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)

    shares = [list(range(c, requests, clients)) for c in range(clients)]
    wall_start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker, share) for share in shares]:
            future.result()
    return latencies, time.perf_counter() - wall_start


def summarise(way: str, batching: str, clients: int, rpc: str, latencies: list[float], wall: float) -> Row:
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return Row(way, batching, clients, rpc, len(ordered), statistics.median(ordered) * 1e3, p95 * 1e3, len(ordered) / wall)


def bench_way(
    way: str, batching: str, search: Callable[[int], Any], explain: Callable[[int], Any], counts: dict[str, int]
) -> list[Row]:
    rows = []
    search(0), explain(0)  # warm-up (lazy model info, first forward)
    for clients in (1, 8):
        for rpc, call in (("Search", search), ("SearchAndExplain", explain)):
            n = counts[rpc] * (2 if clients == 8 else 1)
            rows.append(summarise(way, batching, clients, rpc, *measure(call, n, clients)))
            print(f"  {way:18s} {batching:4s} clients={clients} {rpc:16s} p50={rows[-1].p50_ms:8.1f} ms", flush=True)
    return rows


class GatewayThread:
    def __init__(self, settings: GatewaySettings, backend: Any, qdrant: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> Gateway:
            gateway = Gateway(settings, backend, qdrant)
            await gateway.start()
            return gateway

        self.gateway = asyncio.run_coroutine_threadsafe(start(), self.loop).result(60)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.gateway.stop(1.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def through_gateway(settings: GatewaySettings, backend: Any, qdrant: Any, queries: list[bytes], way: str,
                    batching: str, counts: dict[str, int]) -> list[Row]:
    server = GatewayThread(settings, backend, qdrant)
    try:
        with hc.Client(f"127.0.0.1:{server.gateway.port}", timeout=600, retry=hc.NO_RETRY) as client:
            return bench_way(
                way, batching,
                lambda i: client.search(INDEX, queries[i % len(queries)], k=K),
                lambda i: client.search_and_explain(INDEX, queries[i % len(queries)], k=K, method="gradcam"),
                counts,
            )
    finally:
        server.stop()


def load_build_mar() -> Any:
    spec = importlib.util.spec_from_file_location("histoxplain_build_mar", REPO / "model_store" / "build_mar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(rows: list[Row], quick: bool) -> str:
    in_process = {(r.rpc, r.clients): r for r in rows if r.way == "in-process"}
    lines = [
        f"Run: `benchmarks/serving_bench.py{' --quick' if quick else ''}` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, 1 intra-op thread, loopback; "
        f"efficientnet-lite0-imagenet, index of tiles in embedded Qdrant, k={K}, GradCAM, side=both.",
        "",
        *(
            [
                "Quick run (`--quick`: 4-16 requests per row) on a shared machine: noisy. Ratios below "
                "1 mean the load from other processes changed during the run, not that serving is "
                "faster than in-process; rerun without --quick on a quiet machine.",
                "",
            ]
            if quick
            else []
        ),
        "| way | batching | clients | RPC | requests | p50 ms | p95 ms | req/s | p50 / in-process |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        base = in_process.get((r.rpc, r.clients))
        ratio = f"{r.p50_ms / base.p50_ms:.2f}x" if base else "-"
        lines.append(
            f"| {r.way} | {r.batching} | {r.clients} | {r.rpc} | {r.requests} | {r.p50_ms:.1f} | {r.p95_ms:.1f} "
            f"| {r.throughput:.2f} | {ratio} |"
        )
    base = in_process.get(("SearchAndExplain", 1))
    for r in rows:
        if r.way == "gateway+torchserve" and r.rpc == "SearchAndExplain" and r.clients == 1 and base:
            verdict = "meets" if r.p50_ms / base.p50_ms <= 1.3 else "misses"
            lines.append("")
            lines.append(
                f"SearchAndExplain, 1 client, batching {r.batching}: gateway+TorchServe p50 / in-process p50 = "
                f"{r.p50_ms / base.p50_ms:.2f}x ({verdict} the <= 1.3x target)."
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (noisy, for a smoke run)")
    parser.add_argument("--index-size", type=int, default=200, help="tiles in the index (default %(default)s)")
    parser.add_argument("--no-torchserve", action="store_true", help="skip the TorchServe rows")
    parser.add_argument("--no-results", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    counts = {"Search": 8, "SearchAndExplain": 4} if args.quick else {"Search": 50, "SearchAndExplain": 20}
    index_size = min(args.index_size, 60) if args.quick else args.index_size

    from histoxplain_model.encoders import load_encoder

    from histoxplain_service.backends.embedded import EmbeddedBackend

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="histoxplain-serving-bench-") as tmp:
        work = Path(tmp)
        core = Settings(data_dir=work / "data", tile_size=TILE, min_tissue=0.0)
        settings = GatewaySettings(core=core, port=0, backend="embedded", health_interval_s=5.0, worker_threads=8)
        backend = EmbeddedBackend(load_encoder(core.model))
        qdrant = open_qdrant(core)
        try:
            tiles = sample_tiles(index_size + 8)
            retrieval = Retrieval(core, backend, qdrant)
            print(f"indexing {index_size} tiles ...", flush=True)
            retrieval.index_encoded(INDEX, [(data, f"tile-{i}", None, None) for i, data in enumerate(tiles[:index_size])])
            queries = tiles[index_size:]

            print("in-process", flush=True)
            rows += bench_way(
                "in-process", "-",
                lambda i: retrieval.search(INDEX, decode_image(queries[i % len(queries)], core.max_pixels), K),
                lambda i: retrieval.search_and_explain(
                    INDEX, decode_image(queries[i % len(queries)], core.max_pixels), K, "gradcam"
                ),
                counts,
            )
            print("gateway + embedded", flush=True)
            rows += through_gateway(settings, backend, qdrant, queries, "gateway+embedded", "-", counts)

            if not args.no_torchserve:
                from histoxplain_service.backends.torchserve import TorchServeBackend, TorchServeConfig
                from histoxplain_service.torchserve_process import TorchServeProcess

                store = work / "model-store"
                load_build_mar().build_mar(store, model_name="histoxplain", check=False)
                with TorchServeProcess(store, work / "torchserve") as process:
                    ts_backend = TorchServeBackend(
                        TorchServeConfig(target=process.grpc_target, model_name="histoxplain", key_file=process.key_file)
                    )
                    ts_settings = GatewaySettings(core=core, port=0, backend="torchserve", health_interval_s=5.0, worker_threads=8)
                    try:
                        for label, batch_size in (("off", 1), ("on", 8)):
                            print(f"gateway + TorchServe, batching {label}", flush=True)
                            process.register_model("histoxplain.mar", "histoxplain", batch_size=batch_size, max_batch_delay_ms=10)
                            try:
                                rows += through_gateway(ts_settings, ts_backend, qdrant, queries, "gateway+torchserve", label, counts)
                            finally:
                                process.unregister_model("histoxplain")
                    finally:
                        ts_backend.close()
        finally:
            qdrant.close()
            backend.close()

    text = render(rows, args.quick)
    print()
    print(text)
    if not args.no_results:
        write_section(f"## Serving\n\n{text}")
        print(f"\nwritten under '## Serving' in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
