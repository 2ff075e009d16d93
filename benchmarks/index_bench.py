"""Index engines at 10k, 100k and 1M tiles (issue 12, requirement 5).

For each size N, on the same vectors and the same queries:

  numpy exact          the vectors in one float32 (N, D) array, X @ q and argpartition: the floor
                       of brute force and the recall reference
  local mode           qdrant-client local mode through histoxplain's QdrantIndex (the embedded
                       store of earlier versions); 10k and 100k only: at 100k it already upserts
                       ~500 tiles/s and answers in ~0.3 s, so 1M would take half an hour to fill
                       and seconds per query (issue 12's measurement)
  edge exact           qdrant-edge through histoxplain's EdgeIndex, points in plain segments
                       (measured before optimize: brute force in Rust)
  edge HNSW ef=E       the same shard after optimize() built the HNSW graph (m=16,
                       ef_construct=100, histoxplain's defaults), searched with hnsw_ef=E
  edge HNSW int8       a second shard with scalar int8 quantization in RAM, float vectors
                       memory-mapped (HISTOXPLAIN_VECTORS_ON_DISK=1), rescoring on, oversampling 2

Data: clustered unit vectors of the default encoder's dimension (1280): 1000 centres drawn
uniformly on the sphere, each vector a centre plus Gaussian noise of norm ~0.6, normalised
(cosine ~0.74 within a cluster, ~0 across); the queries are drawn the same way (other seed).
The repository's sample slides give a few thousand tiles, too few for 100k, so no real
embeddings are used. Such data are easy for HNSW (a query's 10 nearest lie in its own cluster);
``--noise 4`` makes the vectors nearly unstructured, the worst case (recall@10 ~0.4 at ef=128 on
100k), so recall on an archive's own embeddings should be measured before trusting a setting.
Vectors are generated in chunks of 10k from per-chunk seeds, so no process holds more than one
copy (numpy exact holds the array it searches).

Each (engine, N) runs in its own process, so RSS belongs to that engine: RssAnon (heap) and
RssFile (memory-mapped files resident, e.g. qdrant-edge's vectors) after the searches, and the
peak (VmHWM, which counts mapped files too: WAL and segment files read while the HNSW graph is
built, pages the kernel can reclaim). Upsert: tiles/s through the adapter in batches of 1000
with histoxplain payloads (no tile pixels written); "build" is optimize() (HNSW), "ready" is
N / (upsert + build). Search:
one query at a time, k=10, 10 warm-up queries, p50 / p95 over the rest; recall@10 against numpy
exact. Disk: the engine's folder after the run.

Usage:
  .venv/bin/python benchmarks/index_bench.py                        # 10k, 100k, 1M (~65 min on 2 cores)
  .venv/bin/python benchmarks/index_bench.py --sizes 10000 --queries 50
Prints a table; benchmarks/RESULTS.md is written by hand from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

DIM = 1280
CENTRES = 1000
NOISE = 0.6
CHUNK = 10_000
TILES_PER_IMAGE = 1000
BATCH = 1000
WARMUP = 10
SEED = 12
EF_VALUES = (64, 128, 256)


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def centres() -> np.ndarray:
    return unit(np.random.default_rng(SEED).normal(size=(CENTRES, DIM)))


def draw(rng: np.random.Generator, n: int, centre_vectors: np.ndarray) -> np.ndarray:
    picked = centre_vectors[rng.integers(0, CENTRES, n)]
    return unit(picked + NOISE * rng.normal(size=(n, DIM)).astype(np.float32) / np.sqrt(DIM))


def chunks(n: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, vectors) of the N vectors, in chunks of CHUNK, each from its own seed."""
    centre_vectors = centres()
    for start in range(0, n, CHUNK):
        rng = np.random.default_rng([SEED, start // CHUNK])
        yield start, draw(rng, min(CHUNK, n - start), centre_vectors)


def queries(count: int) -> np.ndarray:
    return draw(np.random.default_rng([SEED, 10**9]), count, centres())


def ground_truth(n: int, qs: np.ndarray) -> np.ndarray:
    """(Q, 10) indices of the exact top 10 per query, streamed over the chunks."""
    best_scores = np.full((len(qs), 10), -np.inf, np.float32)
    best_ids = np.zeros((len(qs), 10), np.int64)
    for start, vectors in chunks(n):
        scores = qs @ vectors.T
        ids = np.broadcast_to(np.arange(start, start + len(vectors)), scores.shape)
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_ids = np.concatenate([best_ids, ids], axis=1)
        top = np.argsort(-all_scores, axis=1)[:, :10]
        best_scores = np.take_along_axis(all_scores, top, axis=1)
        best_ids = np.take_along_axis(all_ids, top, axis=1)
    return best_ids


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / 10 for f, t in zip(found, truth)]))


def memory() -> dict[str, float]:
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            status[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return status


def disk_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def timed_searches(search, qs: np.ndarray) -> tuple[list[list[int]], list[float]]:
    found, times = [], []
    for position, q in enumerate(qs):
        start = time.perf_counter()
        ids = search(q)
        elapsed = time.perf_counter() - start
        if position >= WARMUP:
            found.append(ids)
            times.append(elapsed)
    return found, times


def row(engine: str, n: int, found: list[list[int]], times: list[float], truth: np.ndarray, **extra) -> dict:
    return {
        "engine": engine, "n": n, "p50_ms": 1e3 * float(np.percentile(times, 50)),
        "p95_ms": 1e3 * float(np.percentile(times, 95)), "recall": recall(found, truth[WARMUP:]), **extra,
    }


# -- one engine in one process ---------------------------------------------------------------------


def records_for(start: int, count: int):
    from histoxplain_service.domain.types import Box, TileRecord

    return [
        TileRecord(f"img{i // TILES_PER_IMAGE:05d}", f"/archive/slide{i // TILES_PER_IMAGE:05d}.svs",
                   f"class{(i // TILES_PER_IMAGE) % 8}", Box((i % TILES_PER_IMAGE) * 224, 0, 224, 224), 0, 0.5,
                   i % TILES_PER_IMAGE, TILES_PER_IMAGE)
        for i in range(start, start + count)
    ]


def tile_number(hit) -> int:
    return int(hit.image_id[3:]) * TILES_PER_IMAGE + hit.tile_index


def fill(index, n: int) -> float:
    """Upsert the N vectors through the adapter; returns seconds."""
    elapsed = 0.0
    for start, vectors in chunks(n):
        for offset in range(0, len(vectors), BATCH):
            part = vectors[offset:offset + BATCH]
            records = records_for(start + offset, len(part))
            began = time.perf_counter()
            index.upsert(records, part)
            elapsed += time.perf_counter() - began
    return elapsed


def run_numpy(n: int, qs: np.ndarray, truth: np.ndarray, work: Path) -> list[dict]:
    began = time.perf_counter()
    matrix = np.empty((n, DIM), np.float32)
    for start, vectors in chunks(n):
        matrix[start:start + len(vectors)] = vectors
    load_s = time.perf_counter() - began

    def search(q: np.ndarray) -> list[int]:
        scores = matrix @ q
        top = np.argpartition(-scores, 10)[:10]
        return top[np.argsort(-scores[top])].tolist()

    found, times = timed_searches(search, qs)
    return [row("numpy exact", n, found, times, truth, upsert_per_s=n / load_s, build_s=0.0, disk_mib=0.0, **memory())]


def run_local(n: int, qs: np.ndarray, truth: np.ndarray, work: Path) -> list[dict]:
    from qdrant_client import QdrantClient

    from histoxplain_service.index.qdrant import QdrantIndex

    folder = work / f"local-{n}"
    client = QdrantClient(path=str(folder))
    index = QdrantIndex(client, "bench", None)
    index.ensure("bench", DIM)
    upsert_s = fill(index, n)
    found, times = timed_searches(lambda q: [tile_number(h) for h in index.search(q, 10)], qs)
    mem = memory()
    client.close()
    return [row("local mode", n, found, times, truth, upsert_per_s=n / upsert_s, build_s=0.0,
                disk_mib=disk_mib(folder), **mem)]


def run_edge(n: int, qs: np.ndarray, truth: np.ndarray, work: Path, quantized: bool) -> list[dict]:
    from histoxplain_service.config import Settings
    from histoxplain_service.index.edge import EdgeEngine, EdgeOptions

    folder = work / f"edge-{'int8' if quantized else 'float'}-{n}"
    options = EdgeOptions(quantization="int8" if quantized else "none", vectors_on_disk=quantized)
    engine = EdgeEngine(Settings(data_dir=folder), options)
    index = engine.open_index("bench")
    index.ensure("bench", DIM)
    index.tile_store = None
    upsert_s = fill(index, n)
    rows = []

    def search(q: np.ndarray) -> list[int]:
        return [tile_number(h) for h in index.search(q, 10)]

    if not quantized:
        found, times = timed_searches(search, qs)  # plain segments: brute force in Rust
        rows.append(row("edge exact", n, found, times, truth, upsert_per_s=n / upsert_s, build_s=0.0,
                        disk_mib=disk_mib(folder), **memory()))
    began = time.perf_counter()
    index.optimize()
    build_s = time.perf_counter() - began
    name = "edge HNSW int8" if quantized else "edge HNSW"
    for ef in EF_VALUES:
        engine.options = EdgeOptions(hnsw_ef=ef, quantization=options.quantization)
        found, times = timed_searches(search, qs)
        rows.append(row(f"{name} ef={ef}", n, found, times, truth, upsert_per_s=n / upsert_s, build_s=build_s,
                        ready_per_s=n / (upsert_s + build_s), disk_mib=disk_mib(folder), **memory()))
    engine.close()
    return rows


RUNNERS = {
    "numpy": run_numpy,
    "local": run_local,
    "edge": lambda n, qs, truth, work: run_edge(n, qs, truth, work, quantized=False),
    "edge-int8": lambda n, qs, truth, work: run_edge(n, qs, truth, work, quantized=True),
}


def child(engine: str, n: int, work: Path) -> None:
    qs = np.load(work / "queries.npy")
    truth = np.load(work / f"truth-{n}.npy")
    for result in RUNNERS[engine](n, qs, truth, work):
        print("RESULT " + json.dumps(result), flush=True)


# -- the run ---------------------------------------------------------------------------------------


def free_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def table(results: list[dict]) -> str:
    header = ("| engine | N | upsert tiles/s | build s | ready tiles/s | p50 ms | p95 ms | recall@10 "
              "| RSS MiB (anon + file) | peak MiB | disk MiB |")
    lines = [header, "|" + "---|" * 11]
    for r in results:
        ready = f"{r['ready_per_s']:,.0f}" if "ready_per_s" in r else "-"
        lines.append(
            f"| {r['engine']} | {r['n']:,} | {r['upsert_per_s']:,.0f} | {r['build_s']:.0f} | {ready} "
            f"| {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['recall']:.3f} "
            f"| {r.get('RssAnon', 0):,.0f} + {r.get('RssFile', 0):,.0f} | {r.get('VmHWM', 0):,.0f} | {r['disk_mib']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    global NOISE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--queries", type=int, default=110, help="queries per engine (the first 10 warm up)")
    parser.add_argument("--engines", default="numpy,local,edge,edge-int8")
    parser.add_argument("--local-max", type=int, default=100_000, help="largest N run on local mode")
    parser.add_argument("--work", type=Path, default=None, help="folder for the indexes (default: a temporary one)")
    parser.add_argument("--noise", type=float, default=NOISE,
                        help=f"norm of the noise around each centre (default {NOISE}; larger: harder for HNSW)")
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    NOISE = args.noise
    if args.child:
        child(args.child[0], int(args.child[1]), args.work)
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="index-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    qs = queries(args.queries)
    np.save(work / "queries.npy", qs)
    from importlib.metadata import version

    print(f"index_bench: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"numpy {np.__version__}, qdrant-client {version('qdrant-client')}, qdrant-edge-py {version('qdrant-edge-py')}; "
          f"load average {os.getloadavg()[0]:.1f} at the start (the machine is shared)")
    print(f"data: {DIM}-d clustered unit vectors ({CENTRES} centres, noise {NOISE}); {args.queries - WARMUP} timed "
          f"queries (+{WARMUP} warm-up), k=10; upsert batches of {BATCH}", flush=True)
    results: list[dict] = []
    for n in [int(s) for s in args.sizes.split(",")]:
        began = time.perf_counter()
        np.save(work / f"truth-{n}.npy", ground_truth(n, qs))
        print(f"N={n:,}: exact top-10 of {len(qs)} queries in {time.perf_counter() - began:.0f} s; "
              f"{free_gib():.1f} GiB available", flush=True)
        for engine in args.engines.split(","):
            if engine == "local" and n > args.local_max:
                print(f"  local mode at N={n:,}: skipped (impractical, see the docstring)", flush=True)
                continue
            if engine == "numpy" and free_gib() < 2.5 * n * DIM * 4 / 2**30:
                print(f"  numpy at N={n:,}: skipped, only {free_gib():.1f} GiB available", flush=True)
                continue
            began = time.perf_counter()
            done = subprocess.run(
                [sys.executable, __file__, "--child", engine, str(n), "--work", str(work), "--noise", str(NOISE)],
                capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            if done.returncode != 0:
                print(f"  {engine} at N={n:,} failed:\n{done.stderr[-3000:]}", flush=True)
                continue
            for line in done.stdout.splitlines():
                if line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT "):])
                    results.append(result)
                    print(f"  {result['engine']:<20} N={n:>9,}  upsert {result['upsert_per_s']:>9,.0f}/s  "
                          f"build {result['build_s']:>6.0f} s  p50 {result['p50_ms']:8.2f} ms  p95 {result['p95_ms']:8.2f} ms  "
                          f"recall {result['recall']:.3f}  RSS {result.get('VmRSS', 0):,.0f} MiB  "
                          f"disk {result['disk_mib']:,.0f} MiB", flush=True)
            for path in work.glob(f"*-{n}"):
                shutil.rmtree(path, ignore_errors=True)  # free the disk before the next engine
            print(f"  ({engine} took {time.perf_counter() - began:.0f} s)", flush=True)
    print()
    print(table(results))
    print(f"\npeak RSS of this driver: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
