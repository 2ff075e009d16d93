"""GPU timings: embedding throughput and explanation latency of efficientnet-lite0 on CUDA.

    python benchmarks/gpu_timing.py [--json PATH]

Medians in ms (CUDA synchronised): embedding a batch of 32 224 px tiles; GradCAM, GradCAM++ and
SmoothGrad (n=25) of a query against k=10 references (both sides); and, as a yardstick on the
same machine, the batch-32 embedding and GradCAM at k=10 on the CPU with one thread. Needs a
CUDA device; the tests under tests/gpu check that the GPU gives the CPU's maps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from histoxplain_model.encoders import load_encoder
from histoxplain_model.explain import explain_retrieval
from histoxplain_model.requests import ExplainRequest

PRESET = "efficientnet-lite0-imagenet"


def median_ms(call: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    call()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_timing: error: no CUDA device; run it on a GPU machine", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(32)]
    figures: dict[str, object] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    for device in ("cuda", "cpu"):
        if device == "cpu":
            torch.set_num_threads(1)
        encoder = load_encoder(PRESET, device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        repeats = 30 if device == "cuda" else 3
        with torch.inference_mode():
            pixels = encoder.preprocess(tiles)
            figures[f"{device}_embed_batch32_ms"] = median_ms(lambda: encoder.embed(pixels), repeats, sync)
        for method in ("gradcam", "gradcampp", "smoothgrad") if device == "cuda" else ("gradcam",):
            request = ExplainRequest(tiles[0], tiles[1:11], method)
            figures[f"{device}_{method}_k10_ms"] = median_ms(
                lambda: explain_retrieval(encoder, request), 10 if device == "cuda" else 3, sync
            )
    text = json.dumps(figures, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
