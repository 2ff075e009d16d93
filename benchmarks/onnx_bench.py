"""Embedding throughput: ONNX Runtime vs torch eager (plain and channels_last), 1 thread.

Measures images/s for batch 1 and batch 32 at 224 px on the default encoder
(``efficientnet-lite0-imagenet``, tf_efficientnet_lite0 with its real ImageNet weights) and
prints a Markdown table with the ORT/torch ratios. Target (issue 2, req. 9): ORT >= 3x torch
eager at batch 32. Also checks that ORT and torch agree (minimum cosine).

    .venv/bin/python benchmarks/onnx_bench.py [--preset NAME] [--weights FILE] [--repeats N]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from histoxplain_model.encoders import DEFAULT_PRESET, load_encoder
from histoxplain_model.onnx_embedder import OnnxEmbedder, export_onnx
from results_md import write_section


def _images_per_second(run: Callable[[], object], batch: int, repeats: int, min_seconds: float) -> float:
    run()  # warm-up: allocator, ORT arena, oneDNN primitives
    timings = []
    started = time.perf_counter()
    while len(timings) < repeats or time.perf_counter() - started < min_seconds:
        tick = time.perf_counter()
        run()
        timings.append(time.perf_counter() - tick)
    return batch / statistics.median(timings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5, help="minimum timed runs per cell (median reported)")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="minimum time per cell")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only, do not update RESULTS.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    encoder = load_encoder(args.preset, args.weights)
    model = encoder.model
    channels_last_model = load_encoder(args.preset, args.weights).model.to(memory_format=torch.channels_last)
    height, width = encoder.input_size
    with tempfile.TemporaryDirectory() as folder:
        embedder = OnnxEmbedder(export_onnx(encoder, Path(folder) / "model.onnx"), intra_op_threads=args.threads)
        providers = embedder.providers
        print(
            f"# {args.preset} ({encoder.preset.architecture}), {height}x{width} px, {args.threads} thread(s), "
            f"torch {torch.__version__}, ORT providers {embedder.providers}",
            flush=True,
        )
        rows = []
        for batch in args.batches:
            pixels = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch))
            pixels_cl = pixels.contiguous(memory_format=torch.channels_last)
            pixels_np = pixels.numpy()
            with torch.inference_mode():
                eager = _images_per_second(lambda: model(pixels), batch, args.repeats, args.min_seconds)
                eager_cl = _images_per_second(lambda: channels_last_model(pixels_cl), batch, args.repeats, args.min_seconds)
                reference = torch.nn.functional.normalize(model(pixels), dim=1).numpy()
            ort = _images_per_second(lambda: embedder.embed(pixels_np), batch, args.repeats, args.min_seconds)
            cosine = float(np.min(np.sum(embedder.embed(pixels_np) * reference, axis=1)))
            rows.append((batch, eager, eager_cl, ort, cosine))
            print(f"batch {batch}: eager {eager:.1f}, channels_last {eager_cl:.1f}, ORT {ort:.1f} img/s", flush=True)

    lines = [
        "## ONNX embedding throughput",
        "",
        f"`benchmarks/onnx_bench.py{''.join(' ' + arg for arg in (sys.argv[1:] if argv is None else argv))}`: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {args.preset} ({encoder.preset.architecture}), {height}x{width} px, "
        f"{args.threads} thread(s), torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"providers {providers}. Images per second, median of at least {args.repeats} runs. "
        "Target (issue 2, req. 9): ORT >= 3x torch eager at batch 32.",
        "",
        "| batch | torch eager img/s | torch channels_last img/s | ORT img/s | ORT / eager | ORT / channels_last | min cosine |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, eager, eager_cl, ort, cosine in rows:
        lines.append(
            f"| {batch} | {eager:.1f} | {eager_cl:.1f} | {ort:.1f} | {ort / eager:.2f}x | {ort / eager_cl:.2f}x | {cosine:.7f} |"
        )
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_write:
        print(f"written to {write_section(text)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
