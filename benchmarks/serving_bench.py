"""Serving benchmark: latency and throughput of Search and SearchAndExplain (GradCAM, k=10).

Three ways, on loopback only:
  in-process         Retrieval (the domain layer) called directly with the embedded backend
                     (decode + embed + Qdrant + explain; no overlays, no protobuf)
  gateway+embedded   the gRPC gateway (in this process, port 0) with the embedded backend, via the SDK
  gateway+torchserve the gateway with a real TorchServe (fresh .mar), batching off (batchSize 1)
                     and on (batchSize 8, maxBatchDelay 10 ms)
each with 1 and 8 concurrent clients. Bounded request counts; it stops by itself.

All ways are up at once (two TorchServe models, one per batching setting) and take turns: round
by round, each way serves one request per client before the next way's round. A change in the
machine's speed during the run (on a shared 2-core VM the same explanation measured 490 ms and
650 ms minutes apart) then hits every way alike instead of whichever ran at that moment.
Every process runs with MALLOC_ARENA_MAX=1 (the script re-executes itself to set it; see the
comment at the top): which glibc malloc arena a thread draws otherwise moved torch's speed by
up to 20% per thread, in either direction.

    .venv/bin/python benchmarks/serving_bench.py [--quick] [--no-results]

Prints a table and the ratio gateway+TorchServe p50 / in-process p50 for SearchAndExplain at one
client (target <= 1.3x), and writes them under "## Serving" in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
# glibc gives threads their own malloc arenas, and torch's CPU kernels ran up to 20% faster or
# slower depending on which arena the calling thread had (the same explanation: 346 ms on a
# gateway worker thread, 429 ms on the benchmark's thread, in one process). One arena for every
# thread of every process here (TorchServe inherits the environment) takes that out of the
# comparison; glibc reads the variable at start-up, hence the re-exec.
if os.environ.get("MALLOC_ARENA_MAX") != "1":
    os.environ["MALLOC_ARENA_MAX"] = "1"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)

import histoxplain_client as hc  # noqa: E402
from histoxplain_model.imageio import decode_image  # noqa: E402
from histoxplain_service.config import GatewaySettings  # noqa: E402
from histoxplain_service.bootstrap import open_index_engine  # noqa: E402
from histoxplain_service.domain.retrieval import Retrieval  # noqa: E402
from histoxplain_service.gateway.server import Gateway  # noqa: E402
from histoxplain_service.config import Settings  # noqa: E402
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
        from histoxplain_service.app.samples import he_slide_path
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


@dataclass(frozen=True)
class Way:
    """One way to serve: a label, its batching setting and a call per RPC (request number -> result)."""

    name: str
    batching: str
    calls: dict[str, Callable[[int], Any]]


def measure_interleaved(ways: list[Way], rpc: str, requests: int, clients: int) -> list[Row]:
    """``requests`` calls of ``rpc`` per way from ``clients`` threads, in rounds: each round
    every way (in rotating order) serves ``clients`` concurrent requests. Throughput is a way's
    requests over the wall time of its own rounds."""
    latencies: list[list[float]] = [[] for _ in ways]
    busy = [0.0] * len(ways)

    def timed(call: Callable[[int], Any], number: int) -> float:
        start = time.perf_counter()
        call(number)
        return time.perf_counter() - start

    rounds = -(-requests // clients)
    with ThreadPoolExecutor(clients) as pool:
        for round_number in range(rounds):
            shift = round_number % len(ways)
            for position in [*range(shift, len(ways)), *range(shift)]:
                start = time.perf_counter()
                numbers = range(round_number * clients, (round_number + 1) * clients)
                futures = [pool.submit(timed, ways[position].calls[rpc], number) for number in numbers]
                latencies[position].extend(future.result() for future in futures)
                busy[position] += time.perf_counter() - start
    return [
        summarise(way.name, way.batching, clients, rpc, latencies[position], busy[position])
        for position, way in enumerate(ways)
    ]


def summarise(way: str, batching: str, clients: int, rpc: str, latencies: list[float], wall: float) -> Row:
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return Row(way, batching, clients, rpc, len(ordered), statistics.median(ordered) * 1e3, p95 * 1e3, len(ordered) / wall)


def bench(ways: list[Way], counts: dict[str, int]) -> list[Row]:
    for way in ways:  # warm-up: lazy model info, first forward and backward passes
        for call in way.calls.values():
            call(0)
    rows = []
    for clients in (1, 8):
        for rpc in ("Search", "SearchAndExplain"):
            n = counts[rpc] * (2 if clients == 8 else 1)
            measured = measure_interleaved(ways, rpc, n, clients)
            for row in measured:
                print(f"  {row.way:18s} {row.batching:4s} clients={clients} {rpc:16s} p50={row.p50_ms:8.1f} ms", flush=True)
            rows += measured
    order = {(way.name, way.batching): position for position, way in enumerate(ways)}
    return sorted(rows, key=lambda row: order[(row.way, row.batching)])


class GatewayThread:
    def __init__(self, settings: GatewaySettings, backend: Any, index_engine: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> Gateway:
            gateway = Gateway(settings, backend, index_engine)
            await gateway.start()
            return gateway

        self.gateway = asyncio.run_coroutine_threadsafe(start(), self.loop).result(60)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.gateway.stop(1.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def gateway_way(
    settings: GatewaySettings, backend: Any, index_engine: Any, queries: list[bytes], name: str, batching: str,
    servers: list[GatewayThread], clients: list[hc.Client],
) -> Way:
    """A gateway (started here, stopped by the caller through ``servers``) and an SDK client."""
    server = GatewayThread(settings, backend, index_engine)
    servers.append(server)
    client = hc.Client(f"127.0.0.1:{server.gateway.port}", timeout=600, retry=hc.NO_RETRY)
    clients.append(client)
    return Way(name, batching, {
        "Search": lambda i: client.search(INDEX, queries[i % len(queries)], k=K),
        "SearchAndExplain": lambda i: client.search_and_explain(INDEX, queries[i % len(queries)], k=K, method="gradcam"),
    })


def render(rows: list[Row], quick: bool) -> str:
    in_process = {(r.rpc, r.clients): r for r in rows if r.way == "in-process"}
    lines = [
        f"Run: `benchmarks/serving_bench.py{' --quick' if quick else ''}` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, 1 intra-op thread, MALLOC_ARENA_MAX=1, loopback; "
        f"efficientnet-lite0-imagenet, index of tiles in embedded Qdrant, k={K}, GradCAM, side=both. "
        "All ways up at once, taking turns round by round (see the script's docstring).",
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
    counts = {"Search": 8, "SearchAndExplain": 4} if args.quick else {"Search": 50, "SearchAndExplain": 30}
    index_size = min(args.index_size, 60) if args.quick else args.index_size

    from histoxplain_model.encoders import load_encoder

    from histoxplain_service.backends.embedded import EmbeddedBackend

    servers: list[GatewayThread] = []
    clients: list[hc.Client] = []
    with tempfile.TemporaryDirectory(prefix="histoxplain-serving-bench-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        core = Settings(data_dir=work / "data", tile_size=TILE, min_tissue=0.0)
        backend = EmbeddedBackend(load_encoder(core.model))
        index_engine = open_index_engine(core)
        stack.callback(backend.close)
        stack.callback(index_engine.close)

        tiles = sample_tiles(index_size + 8)
        retrieval = Retrieval(core, backend, index_engine)
        print(f"indexing {index_size} tiles ...", flush=True)
        retrieval.index_encoded(INDEX, [(data, f"tile-{i}", None, None) for i, data in enumerate(tiles[:index_size])])
        queries = tiles[index_size:]

        def settings(backend_name: str) -> GatewaySettings:
            return GatewaySettings(core=core, port=0, backend=backend_name, health_interval_s=5.0, worker_threads=8)

        model_backends: list[tuple[str, str, str, Any]] = [("gateway+embedded", "-", "embedded", backend)]
        if not args.no_torchserve:
            from histoxplain_service.backends.torchserve.backend import TorchServeBackend, TorchServeConfig
            from histoxplain_service.backends.torchserve.mar import build_mar
            from histoxplain_service.backends.torchserve.process import TorchServeProcess

            store = work / "model-store"
            build_mar(store, model_name="histoxplain", check=False)
            process = stack.enter_context(TorchServeProcess(store, work / "torchserve"))
            for label, batch_size in (("off", 1), ("on", 8)):
                print(f"starting TorchServe model, batching {label} (batchSize {batch_size})", flush=True)
                model = process.register_model(
                    "histoxplain.mar", f"histoxplain-batch{batch_size}", batch_size=batch_size, max_batch_delay_ms=10
                )
                ts_backend = TorchServeBackend(
                    TorchServeConfig(target=process.grpc_target, model_name=model, key_file=process.key_file)
                )
                stack.callback(ts_backend.close)
                model_backends.append(("gateway+torchserve", label, "torchserve", ts_backend))

        # Stopped in reverse: SDK clients, then gateways, then TorchServe and the backends.
        stack.callback(lambda: [server.stop() for server in servers])
        stack.callback(lambda: [client.close() for client in clients])
        ways = [
            Way("in-process", "-", {
                "Search": lambda i: retrieval.search(INDEX, decode_image(queries[i % len(queries)], core.max_pixels), K),
                "SearchAndExplain": lambda i: retrieval.search_and_explain(
                    INDEX, decode_image(queries[i % len(queries)], core.max_pixels), K, "gradcam"
                ),
            }),
        ]
        for name, batching, backend_name, model_backend in model_backends:
            ways.append(gateway_way(settings(backend_name), model_backend, index_engine, queries, name, batching, servers, clients))
        print("measuring (the ways take turns)", flush=True)
        rows = bench(ways, counts)

    text = render(rows, args.quick)
    print()
    print(text)
    if not args.no_results:
        write_section(f"## Serving\n\n{text}")
        print(f"\nwritten under '## Serving' in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
