"""RISE (histoxplain_model.saliency.rise): latency against k and the floor, faithfulness against N.

Latency (tf_efficientnet_lite0 by default, 224 px, 1 thread, pretrained=False: weights do not
change the cost), all variants interleaved round by round in one process, median of --repeats:
  fwd N             N plain forward passes of the query, ``batch_size`` per pass (the floor:
                    RISE is N masked forward passes plus one clean one)
  rise k=1, k=10    one RISE call explaining the query against 1 or k references (N masks)
  gradcam k=10      GradCAM on the same runtime, same query and references
  smoothgrad k=10   SmoothGrad (its defaults, n=25) on the same runtime
The torch rows run eager torch under inference_mode; the "onnx" rows run the same N images
through the encoder's ONNX export with onnxruntime (1 intra-op thread), which is what the
embedded backend hands RISE (its ``pixel_embedder``). Targets: rise k=10 / rise k=1 <= 1.1 and
rise k=10 / fwd N <= 1.1 on the same runtime.

Faithfulness against N (the default preset's real weights on the project's sample data, the
tiles of ``histoxplain_service.app.samples.write_sample_dataset``): each of --pairs query tiles
(spread evenly over the tiles) against its top hit among the other tiles (no two tiles share
pixels); deletion and insertion of the cosine to the hit with the blurred baseline in 16 steps
(histoxplain_model.faithfulness), the RISE map (similar polarity, default options but N)
against the mean of 3 smooth random maps on RISE's own 7x7 grid, pair by pair; 95% bootstrap
interval of the mean paired difference (histoxplain_service.evaluation.statistics, one cluster
per pair: the tiles come from two images, so the pairs are not fully independent and the
intervals are optimistic). Images are scored and masked through onnxruntime when installed.

Usage:
  .venv/bin/python benchmarks/rise_bench.py                       # both parts (~15 min on 2 cores)
  .venv/bin/python benchmarks/rise_bench.py --skip-faithfulness --repeats 3
  --masks 100 200 400 800 --pairs 12 --no-write
Results are printed and written to benchmarks/RESULTS.md under "## RISE latency" and
"## RISE faithfulness against N" (a part that is skipped keeps its section as it was).
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import platform
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from explain_bench import build, time_interleaved  # noqa: E402
from histoxplain_model.options import RiseOptions  # noqa: E402
from histoxplain_model.saliency import GradCAM, Rise, SmoothGrad  # noqa: E402
from results_md import RESULTS, write_section  # noqa: E402

LATENCY_SECTION, FAITHFULNESS_SECTION = "## RISE latency", "## RISE faithfulness against N"


def _onnx_embedder(model: torch.nn.Module, size: int, folder: str):
    """(n, 3, H, W) numpy -> (n, D) numpy through onnxruntime, or None without it."""
    from histoxplain_model.onnx_embedder import OnnxEmbedder, export_onnx, onnxruntime_available

    if not onnxruntime_available():
        return None
    return OnnxEmbedder(export_onnx(model, Path(folder) / "model.onnx", (size, size)), intra_op_threads=1).embed


def latency(arch: str, k: int, size: int, masks: int, repeats: int) -> dict[str, float]:
    model, layer, reshape = build(arch)
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 3, size, size, generator=generator)
    references = F.normalize(torch.randn(k, model.num_features, generator=generator), dim=1)
    options = RiseOptions(n_masks=masks)
    batches = [query.repeat(min(options.batch_size, masks - start), 1, 1, 1) for start in range(0, masks, options.batch_size)]
    rise = Rise(model, options=options)
    gradcam, smoothgrad = GradCAM(model, layer, reshape), SmoothGrad(model)

    def forward_n() -> object:
        with torch.inference_mode():
            return [model(batch) for batch in batches]

    variants = {
        "fwd N": forward_n,
        "rise k=1": lambda: rise.explain(query, references[:1]),
        "rise k": lambda: rise.explain(query, references),
        "gradcam k": lambda: gradcam.explain(query, references),
        "smoothgrad k": lambda: smoothgrad.explain(query, references),
    }
    with tempfile.TemporaryDirectory() as folder:
        embed = _onnx_embedder(model, size, folder)
        if embed is not None:
            onnx_rise = Rise(model, options=options, pixel_embedder=embed)
            numpy_batches = [batch.numpy() for batch in batches]
            variants["onnx fwd N"] = lambda: [embed(batch) for batch in numpy_batches]
            variants["onnx rise k=1"] = lambda: onnx_rise.explain(query, references[:1])
            variants["onnx rise k"] = lambda: onnx_rise.explain(query, references)
        return time_interleaved(variants, repeats)


def _sample_pairs(encoder, count: int, folder: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, query tile, its top hit) for ``count`` queries spread evenly over the sample tiles."""
    from histoxplain_model.imageio import read_image
    from histoxplain_service.app.samples import write_sample_dataset

    dataset = write_sample_dataset(folder, per_class=None)
    paths = [path for label in sorted(dataset.files) for path in dataset.files[label]]
    tiles = [read_image(path) for path in paths]
    vectors = encoder.embed_images(tiles)
    similarities = vectors @ vectors.T
    np.fill_diagonal(similarities, -np.inf)
    queries = np.linspace(0, len(tiles) - 1, min(count, len(tiles))).round().astype(int)
    return [(paths[q].stem, tiles[q], tiles[int(np.argmax(similarities[q]))]) for q in queries]


def faithfulness(masks: list[int], pairs: int, seed: int) -> tuple[list[dict], int]:
    from histoxplain_model.encoders import DEFAULT_PRESET, load_encoder
    from histoxplain_model.faithfulness import baseline_image, deletion_insertion_many, smooth_random_map
    from histoxplain_service.evaluation.statistics import compare_paired

    encoder = load_encoder(DEFAULT_PRESET)
    with tempfile.TemporaryDirectory() as folder:
        embed = _onnx_embedder(encoder.model, encoder.input_size[0], folder)
        samples = _sample_pairs(encoder, pairs, folder)
        per_n: dict[int, dict[str, list[float]]] = {n: {"deletion": [], "insertion": [], "seconds": []} for n in masks}
        for index, (name, query, hit) in enumerate(samples):
            pixels = encoder.preprocess([query])
            reference = encoder.embed(encoder.preprocess([hit]))

            def cosine(batch: torch.Tensor) -> torch.Tensor:
                if embed is None:
                    return F.cosine_similarity(encoder.model(batch), reference)
                return torch.from_numpy(embed(batch.numpy())) @ reference[0]

            maps = []
            for n in masks:
                explainer = Rise(encoder.model, options=RiseOptions(n_masks=n, seed=seed + index), pixel_embedder=embed)
                start = time.perf_counter()
                maps.append(explainer.explain(pixels, reference).heatmaps[0, 0])
                per_n[n]["seconds"].append(time.perf_counter() - start)
            grid = (RiseOptions().grid,) * 2
            randoms = [smooth_random_map(maps[0].shape, grid, seed + 1000 * index + r) for r in range(3)]
            curves = deletion_insertion_many(cosine, pixels, [*maps, *randoms], baseline_image(pixels), seed=seed)
            random_deletion = float(np.mean([c.deletion_auc for c in curves[len(masks):]]))
            random_insertion = float(np.mean([c.insertion_auc for c in curves[len(masks):]]))
            for n, curve in zip(masks, curves):
                per_n[n]["deletion"].append(curve.deletion_auc - random_deletion)
                per_n[n]["insertion"].append(curve.insertion_auc - random_insertion)
            print(f"  pair {index + 1}/{len(samples)} {name}: " + ", ".join(
                f"N={n} del {per_n[n]['deletion'][-1]:+.3f} ins {per_n[n]['insertion'][-1]:+.3f}" for n in masks
            ), file=sys.stderr, flush=True)
    rows = []
    clusters = list(range(len(samples)))
    zeros = [0.0] * len(samples)
    for n in masks:
        deletion = compare_paired(per_n[n]["deletion"], zeros, clusters, lower_is_better=True)
        insertion = compare_paired(per_n[n]["insertion"], zeros, clusters, lower_is_better=False)
        rows.append({"n": n, "deletion": deletion, "insertion": insertion, "seconds": float(np.median(per_n[n]["seconds"]))})
    return rows, len(samples)


def _header(section: str, started: str, load: str) -> list[str]:
    return [
        section,
        "",
        f"`benchmarks/rise_bench.py {' '.join(sys.argv[1:])}`: {started}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, 1 thread. Load average at start: {load} (a 2-core machine shared with "
        "other work: absolute times are inflated, ratios within one interleaved run are comparable).",
    ]


def markdown(args: argparse.Namespace, started: str, load: str, timings: dict | None, faithful: tuple | None) -> list[str]:
    """One RESULTS.md section per part that ran."""
    sections = []
    if timings is not None:
        k, n = args.k, args.latency_masks
        lines = _header(LATENCY_SECTION, started, load) + [
            "",
            f"Latency, {args.model}, {args.size} px, N={n} masks, k={k}, median of {args.repeats} interleaved rounds, "
            "seconds. Targets: rise k / rise k=1 <= 1.1, rise k / fwd N <= 1.1 on the same runtime.",
            "",
            f"| runtime | fwd N | rise k=1 | rise k={k} | k={k} / k=1 | k={k} / fwd N | gradcam k={k} | smoothgrad k={k} (n=25) |",
            "|---|---|---|---|---|---|---|---|",
            f"| torch | {timings['fwd N']:.2f} | {timings['rise k=1']:.2f} | {timings['rise k']:.2f} | "
            f"{timings['rise k'] / timings['rise k=1']:.3f} | {timings['rise k'] / timings['fwd N']:.3f} | "
            f"{timings['gradcam k']:.3f} | {timings['smoothgrad k']:.2f} |",
        ]
        if "onnx fwd N" in timings:
            lines.append(
                f"| onnxruntime | {timings['onnx fwd N']:.2f} | {timings['onnx rise k=1']:.2f} | {timings['onnx rise k']:.2f} | "
                f"{timings['onnx rise k'] / timings['onnx rise k=1']:.3f} | {timings['onnx rise k'] / timings['onnx fwd N']:.3f} | "
                "(torch only) | (torch only) |"
            )
        sections.append("\n".join(lines) + "\n")
    if faithful is not None:
        rows, pairs = faithful
        lines = _header(FAITHFULNESS_SECTION, started, load) + [
            "",
            f"Faithfulness against N, efficientnet-lite0-imagenet (real weights), {pairs} sample-data pairs "
            "(query tile vs its top hit), deletion/insertion of the cosine, blurred baseline, 16 steps; "
            "RISE minus the mean of 3 smooth random maps on its 7x7 grid, mean paired difference "
            "[95% bootstrap interval], and the share of pairs on the faithful side (deletion lower, "
            "insertion higher is better). Seconds: median per map on this runtime (onnxruntime when installed).",
            "",
            "| N | deletion - random | wins | insertion - random | wins | s per map |",
            "|---|---|---|---|---|---|",
        ]
        for row in rows:
            deletion, insertion = row["deletion"], row["insertion"]
            lines.append(
                f"| {row['n']} | {deletion.mean_difference:+.3f} [{deletion.interval[0]:+.3f}, {deletion.interval[1]:+.3f}] | "
                f"{deletion.wins:.0%} | {insertion.mean_difference:+.3f} [{insertion.interval[0]:+.3f}, "
                f"{insertion.interval[1]:+.3f}] | {insertion.wins:.0%} | {row['seconds']:.1f} |"
            )
        sections.append("\n".join(lines) + "\n")
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="latency model (explain_bench.MODELS)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--latency-masks", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--masks", type=int, nargs="+", default=[100, 200, 400, 800], help="N values for faithfulness")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-faithfulness", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only, do not update RESULTS.md")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    timings = faithful = None
    if not args.skip_latency:
        print(f"[{args.model}] latency ...", file=sys.stderr, flush=True)
        timings = latency(args.model, args.k, args.size, args.latency_masks, args.repeats)
    if not args.skip_faithfulness:
        print("faithfulness against N ...", file=sys.stderr, flush=True)
        faithful = faithfulness(args.masks, args.pairs, args.seed)
    for text in markdown(args, started, load, timings, faithful):
        print(text)
        if not args.no_write:
            write_section(text)
            print(f"written to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
