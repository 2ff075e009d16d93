"""The cost of keeping tile pixels in Qdrant's payload (issue 12, requirement 6).

Several gateway replicas in front of one Qdrant cluster cannot read tiles from one replica's
disk, so with ``HISTOXPLAIN_TILE_PIXELS=payload`` each point carries its tile as a base64 PNG.
This measures what that costs, on the real sample tiles (the H&E slide and the IHC image at
224 px, tissue tiles only):

  codec        bytes per tile and encode / decode ms for PNG (level 3, what histoxplain writes,
               lossless), WebP lossless and JPEG quality 90 (both for comparison: JPEG is not
               lossless, so an explanation would run on other pixels than were embedded)
  engine       histoxplain's QdrantIndex on qdrant-client local mode (the code path of a Qdrant
               server), N tiles of 1280-d clustered unit vectors with their histoxplain payload:
               upsert tiles/s, search p50 / p95 at k=10 and load_tile p50, with the pixels in a
               local tile folder (``local``) and in the payload (``payload``); searches leave
               the pixels out of the returned payload, so their latency must not change
  edge         the same upserts and searches on a raw qdrant-edge shard (Qdrant's Rust segment
               engine, as in the server; payload on disk) with and without the pixel payload,
               searched with the pixels excluded: the engine's own cost of a larger payload

Usage:
  .venv/bin/python benchmarks/tile_pixels_bench.py                 # N = 2000 (~2 min on 2 cores)
  .venv/bin/python benchmarks/tile_pixels_bench.py --tiles 500 --queries 20
Prints tables; benchmarks/RESULTS.md is written by hand from them.
"""

from __future__ import annotations

import argparse
import base64
import io
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import qdrant_edge as qe
from PIL import Image

from histoxplain_model.imageio import read_image
from histoxplain_service.app.samples import he_slide_path, ihc_image_path
from histoxplain_service.config import Settings
from histoxplain_service.domain.ingest import SlideSource, plan_tiles
from histoxplain_service.domain.types import Box, TileRecord
from histoxplain_service.index.qdrant import QdrantEngine, open_qdrant
from histoxplain_service.index.qdrant_config import PIXELS_KEY, pixels_payload
from histoxplain_service.index.tile_store import decode_tile_png, encode_tile_png

DIM = 1280
TILE = 224


def sample_tiles() -> list[np.ndarray]:
    """Every tissue tile (224 px grid) of the H&E slide, plus the IHC image's four."""
    slide = SlideSource(he_slide_path(), 0, "he")
    try:
        tiles = [slide.read(r.box.x, r.box.y, r.box.w, r.box.h) for r in plan_tiles(slide, TILE, TILE, 0.25)]
    finally:
        slide.close()
    ihc = read_image(ihc_image_path(), 10**8)
    tiles += [ihc[y:y + TILE, x:x + TILE] for y in (0, TILE) for x in (0, TILE)]
    return [np.ascontiguousarray(t[:TILE, :TILE]) for t in tiles if t.shape[:2] == (TILE, TILE)]


def _ms(fn, items) -> tuple[list, float]:
    start = time.perf_counter()
    out = [fn(item) for item in items]
    return out, (time.perf_counter() - start) * 1000 / len(items)


def _pil_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _codec(name: str, tiles: list[np.ndarray], save_kwargs: dict | None) -> dict:
    """``save_kwargs`` None: histoxplain's own PNG encoder and decoder."""

    def pil_encode(tile: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(tile).save(buffer, **(save_kwargs or {}))
        return buffer.getvalue()

    encode, decode = (encode_tile_png, decode_tile_png) if save_kwargs is None else (pil_encode, _pil_decode)
    blobs, encode_ms = _ms(encode, tiles)
    decoded, decode_ms = _ms(decode, blobs)
    worst = max(int(np.abs(d.astype(int) - t.astype(int)).max()) for d, t in zip(decoded, tiles))
    sizes = [len(b) for b in blobs]
    return {"codec": name, "bytes": statistics.mean(sizes), "base64": statistics.mean(len(base64.b64encode(b)) for b in blobs),
            "raw": TILE * TILE * 3, "encode_ms": encode_ms, "decode_ms": decode_ms, "max_diff": worst}


def vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((100, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((n, DIM)) * (0.6 / np.sqrt(DIM))
    v = centres[rng.integers(0, 100, n)] + noise
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def records(n: int) -> list[TileRecord]:
    return [
        TileRecord(f"{i // 50:040x}", f"/archive/slide{i // 50}.svs", "tumour", Box((i % 50) * TILE, 0, TILE, TILE),
                   0, 0.5, i % 50, 50)
        for i in range(n)
    ]


def percentiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return ordered[len(ordered) // 2] * 1000, ordered[int(len(ordered) * 0.95)] * 1000


def run_index(mode: str, tiles: list[np.ndarray], n: int, qs: np.ndarray, work: Path) -> dict:
    settings = Settings(data_dir=work / mode, index_engine="local", tile_pixels=mode)  # type: ignore[arg-type]
    client = open_qdrant(settings)
    try:
        index = QdrantEngine(settings, client).open_index("bench")
        index.ensure("bench", DIM)
        recs, vecs = records(n), vectors(n, 1)
        start = time.perf_counter()
        for s in range(0, n, 100):
            index.upsert(recs[s:s + 100], vecs[s:s + 100], [tiles[i % len(tiles)] for i in range(s, min(n, s + 100))])
        upsert = n / (time.perf_counter() - start)
        times = []
        for q in qs:
            t = time.perf_counter()
            hits = index.search(q, 10)
            times.append(time.perf_counter() - t)
        loads = []
        for hit in hits * 5:
            t = time.perf_counter()
            index.load_tile(hit)
            loads.append(time.perf_counter() - t)
        p50, p95 = percentiles(times[5:])
        return {"store": mode, "n": n, "upsert": upsert, "p50": p50, "p95": p95,
                "load_p50": percentiles(loads)[0], "disk": disk_mib(work / mode)}
    finally:
        client.close()


def run_edge(with_pixels: bool, tiles: list[np.ndarray], n: int, qs: np.ndarray, work: Path) -> dict:
    folder = work / f"edge-{with_pixels}"
    folder.mkdir()
    config = qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Cosine, memory=qe.Memory.Cached),
        payload_memory=qe.Memory.Cold,
    )
    shard = qe.EdgeShard.create(str(folder), config)
    payloads = [pixels_payload(t) for t in tiles] if with_pixels else None
    recs, vecs = records(n), vectors(n, 1).tolist()
    start = time.perf_counter()
    for s in range(0, n, 100):
        points = []
        for i in range(s, min(n, s + 100)):
            payload = recs[i].payload()
            if payloads is not None:
                payload[PIXELS_KEY] = payloads[i % len(payloads)]
            points.append(qe.Point(recs[i].point_id, vecs[i], payload))
        shard.update(qe.UpdateOperation.upsert_points(points))
    upsert = n / (time.perf_counter() - start)
    times = []
    for q in qs:
        t = time.perf_counter()
        shard.query(qe.QueryRequest(limit=10, query=qe.Query.Nearest(q.tolist()),
                                    with_payload=qe.PayloadSelector.Exclude([PIXELS_KEY])))
        times.append(time.perf_counter() - t)
    shard.close()
    p50, p95 = percentiles(times[5:])
    return {"store": "edge " + ("pixels in payload" if with_pixels else "no pixels"), "n": n, "upsert": upsert,
            "p50": p50, "p95": p95, "load_p50": float("nan"), "disk": disk_mib(folder)}


def disk_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=2000, help="points per engine run")
    parser.add_argument("--queries", type=int, default=55, help="searches per run (5 warm-up)")
    args = parser.parse_args()
    tiles = sample_tiles()
    print(f"{platform.machine()}, {len(tiles)} real 224 px tiles, N={args.tiles}, k=10, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("\n| codec | bytes / tile | base64 bytes | raw bytes | encode ms | decode ms | max pixel diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, kwargs in (("PNG level 3 (chosen)", None), ("WebP lossless", {"format": "WEBP", "lossless": True}),
                         ("JPEG q90", {"format": "JPEG", "quality": 90})):
        row = _codec(name, tiles, kwargs)
        print(f"| {row['codec']} | {row['bytes']:,.0f} | {row['base64']:,.0f} | {row['raw']:,} | "
              f"{row['encode_ms']:.2f} | {row['decode_ms']:.2f} | {row['max_diff']} |")
    qs = vectors(args.queries, 2)
    work = Path(tempfile.mkdtemp(prefix="tile-pixels-bench-"))
    try:
        rows = [run_index("local", tiles, args.tiles, qs, work), run_index("payload", tiles, args.tiles, qs, work),
                run_edge(False, tiles, args.tiles, qs, work), run_edge(True, tiles, args.tiles, qs, work)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| store | N | upsert tiles/s | search p50 ms | search p95 ms | load_tile p50 ms | disk MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['store']} | {r['n']:,} | {r['upsert']:,.0f} | {r['p50']:.2f} | {r['p95']:.2f} | "
              f"{r['load_p50']:.2f} | {r['disk']:,.0f} |")


if __name__ == "__main__":
    main()
