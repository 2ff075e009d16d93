"""Latency of explaining one query against k references (issue 2, requirement 8).

For each model (224 px, 1 torch thread, pretrained=False: weights do not change the cost):

GradCAM section, all variants interleaved round by round in one process (median of --repeats):
  forward           one forward pass of the query, no autograd (the floor for CNNs)
  forward+backward  one forward with autograd + the backward of one cosine target to the
                    input pixels (no weight gradients; the floor for the ViT)
  ours gradcam/gradcampp   histoxplain_model.saliency, query vs k references, one call
  pgc batch         pytorch-grad-cam GradCAM as shipped, the query replicated k times with one
                    cosine target per row, one call
  pgc loop          pytorch-grad-cam GradCAM, k calls of one image and one target
  ours simmap       the similarity decomposition (histoxplain_model.saliency.SimilarityMap), query vs
                    k references and vs 1 reference, finished maps at the input size (CNNs only:
                    a CLS-pooled ViT has no exact decomposition); no backward pass, so its floor
                    is one forward pass. "native": the raw maps on the target layer's grid, what
                    the TorchServe handler returns (the gateway upsamples them with numpy)
  correspondences   the top 16 region pairs of the query and each of k references
                    (histoxplain_model.saliency.correspondences, CNNs only), against "forward k+1"
                    (one forward pass of the query and the k references, the bound): "reused" is
                    the added cost when the locations come from passes the explanation ran anyway
                    (GradCAM, GradCAM++, simmap, or embedding the images), "own pass" the cost
                    with a forward pass of each image for them (stored vectors and SmoothGrad/RISE)
  verify            ExplainOptions.verify for the k query-side GradCAM maps (histoxplain_model.
                    faithfulness.verify_maps: deletion and insertion of each map and of its random
                    map, VERIFY_FORWARD_PASSES_PER_MAP forward passes per map, torch eager here; the
                    embedded backend scores them with ONNX Runtime), on top of the explanation

SmoothGrad section (n noisy copies, k references), each run in a fresh subprocess so that its
peak memory can be read as the process's peak RSS (VmHWM, reset after the warm-up):
  ours              histoxplain_model SmoothGrad: the k targets share the n noisy forwards
  captum            Captum NoiseTunnel(Saliency), nt_type="smoothgrad", one call per reference
                    (all n copies in one batch, Captum's default)
Peak memory is reported as the peak RSS during the timed runs and as its rise above the RSS
after the model is built and a small warm-up ran (the same baseline for both).

Usage:
  .venv/bin/python benchmarks/explain_bench.py                # full run (~10 min on 2 cores)
  .venv/bin/python benchmarks/explain_bench.py --quick        # 3 repeats, SmoothGrad n=5
  --models resnet50 --repeats 7 --no-write
Results are printed and written to benchmarks/RESULTS.md under "## Explanation latency".
RISE (N masked forward passes, against k, the floor of N plain forward passes, GradCAM and
SmoothGrad, and its faithfulness against N): benchmarks/rise_bench.py, section "## RISE".
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

torch.set_num_threads(1)

import timm  # noqa: E402

from histoxplain_model.encoders import resolve_module  # noqa: E402
from histoxplain_model.options import SmoothGradOptions  # noqa: E402
from histoxplain_model.faithfulness import feature_grid, verify_maps  # noqa: E402
from histoxplain_model.limits import MAX_CORRESPONDENCES, VERIFY_FORWARD_PASSES_PER_MAP, VERIFY_STEPS  # noqa: E402
from histoxplain_model.saliency import GradCAM, GradCAMPlusPlus, SimilarityMap, SmoothGrad  # noqa: E402
from histoxplain_model.saliency.correspondences import region_correspondences  # noqa: E402
from histoxplain_model.saliency.locations import forward_locations  # noqa: E402
from results_md import RESULTS, write_section  # noqa: E402

MODELS = ("tf_efficientnet_lite0", "resnet50", "vit_small_patch16_224")
# The layers the encoder presets hook (histoxplain_model.encoders): the last CNN feature map,
# and for a CLS-pooled ViT the last block's norm1 (a later layer gives zero patch gradients).
TARGET_LAYERS = {"tf_efficientnet_lite0": "bn2", "resnet50": "layer4", "vit_small_patch16_224": "blocks.-1.norm1"}
# Where the served GradCAM hooks when its preset names another layer (EncoderPreset.gradcam_layer).
SERVED_GRADCAM_LAYERS = {"tf_efficientnet_lite0": "blocks.4"}
SECTION = "## Explanation latency"


def build(arch: str) -> tuple[torch.nn.Module, torch.nn.Module, Callable | None]:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0).eval()
    layer = resolve_module(model, TARGET_LAYERS[arch])
    reshape = None
    if hasattr(model, "num_prefix_tokens"):
        prefix, (grid_h, grid_w) = model.num_prefix_tokens, model.patch_embed.grid_size

        def reshape(tokens: torch.Tensor) -> torch.Tensor:
            return tokens[:, prefix:].reshape(tokens.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2)

    return model, layer, reshape


class PgcCosineTarget:
    """pytorch-grad-cam target: one output row (D,) -> cosine similarity to a reference."""

    def __init__(self, reference: torch.Tensor) -> None:
        self.reference = reference

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(output, self.reference, dim=0)


def gradcam_variants(arch: str, k: int, size: int) -> dict[str, Callable[[], object]]:
    from pytorch_grad_cam import GradCAM as PgcGradCAM

    model, layer, reshape = build(arch)
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 3, size, size, generator=generator)
    references = F.normalize(torch.randn(k, model.num_features, generator=generator), dim=1)
    ours_cam = GradCAM(model, layer, reshape)
    ours_campp = GradCAMPlusPlus(model, layer, reshape)
    pgc = PgcGradCAM(model=model, target_layers=[layer], reshape_transform=reshape)
    targets = [PgcCosineTarget(r) for r in references]
    replicated = query.repeat(k, 1, 1, 1)

    def forward() -> object:
        with torch.no_grad():
            return model(query)

    def forward_backward() -> object:
        pixels = query.clone().requires_grad_(True)
        score = F.cosine_similarity(model(pixels), references[:1], dim=1).sum()
        return torch.autograd.grad(score, pixels)

    def pgc_batch() -> object:
        maps = pgc(input_tensor=replicated, targets=targets)
        model.zero_grad(set_to_none=True)
        return maps

    def pgc_loop() -> object:
        maps = [pgc(input_tensor=query, targets=[target]) for target in targets]
        model.zero_grad(set_to_none=True)
        return maps

    query_maps = ours_cam.explain(query, references).heatmaps[0]
    grid = feature_grid(model, layer, reshape, query)

    def verify() -> object:
        def score(k: int):
            return lambda images: F.cosine_similarity(model(images), references[k : k + 1], dim=1)

        with torch.no_grad():
            return [verify_maps(score(k), query, [query_maps[k]], grid, VERIFY_STEPS, seed=k) for k in range(len(references))]

    variants = {
        "forward": forward,
        "forward+backward": forward_backward,
        "ours verify": verify,
        "ours gradcam": lambda: ours_cam.explain(query, references),
        "ours gradcampp": lambda: ours_campp.explain(query, references),
        "pgc gradcam batch": pgc_batch,
        "pgc gradcam loop": pgc_loop,
    }
    if arch in SERVED_GRADCAM_LAYERS:
        served = resolve_module(model, SERVED_GRADCAM_LAYERS[arch])
        ours_served = GradCAM(model, served, reshape)
        pgc_served = PgcGradCAM(model=model, target_layers=[served], reshape_transform=reshape)

        def pgc_served_batch() -> object:
            maps = pgc_served(input_tensor=replicated, targets=targets)
            model.zero_grad(set_to_none=True)
            return maps

        variants["ours gradcam served layer"] = lambda: ours_served.explain(query, references)
        variants["pgc gradcam served layer batch"] = pgc_served_batch
    if reshape is None:  # the CNNs: the embedding is the mean of the target layer's map
        ours_simmap = SimilarityMap(model, layer, reshape)
        variants["ours simmap k=1"] = lambda: ours_simmap.explain(query, references[:1])
        variants["ours simmap"] = lambda: ours_simmap.explain(query, references)
        variants["ours simmap native"] = lambda: ours_simmap.explain(query, references, native=True)
        images = torch.cat([query, torch.randn(k, 3, size, size, generator=generator)])
        locations, _ = forward_locations(model, layer, None, images)
        sizes = [(size, size)] * k

        def forward_all() -> object:
            with torch.no_grad():
                return model(images)

        def own_pass() -> object:
            own, _ = forward_locations(model, layer, None, images)
            return region_correspondences(own[0], own[1:], MAX_CORRESPONDENCES, (size, size), sizes)

        variants["forward k+1"] = forward_all
        variants["ours correspondences reused"] = lambda: region_correspondences(
            locations[0], locations[1:], MAX_CORRESPONDENCES, (size, size), sizes
        )
        variants["ours correspondences own pass"] = own_pass
    return variants


def time_interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per variant; one warm-up call each, then rounds over all variants."""
    for run in variants.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> float:
    """Reset the process's peak RSS (VmHWM) to its current RSS; return that RSS in MiB.

    ru_maxrss cannot be used: Linux carries the parent's peak into a forked-and-exec'd child.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    return _status_mib("VmHWM")


def smoothgrad_worker(arch: str, variant: str, n: int, k: int, size: int, repeats: int) -> dict:
    """Runs in its own process: time one SmoothGrad explanation of k references; peak RSS."""
    model, _, _ = build(arch)
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 3, size, size, generator=generator)
    references = F.normalize(torch.randn(k, model.num_features, generator=generator), dim=1)
    sigma = 0.15
    if variant == "ours":
        explainer = SmoothGrad(model, options=SmoothGradOptions(n_samples=n, sigma=sigma))
        warm = SmoothGrad(model, options=SmoothGradOptions(n_samples=1, sigma=sigma))

        def run() -> object:
            return explainer.explain(query, references)

        def warm_up() -> object:
            return warm.explain(query, references[:1])
    else:
        from captum.attr import NoiseTunnel, Saliency

        stdev = float(sigma * (query.max() - query.min()))
        tunnels = [
            NoiseTunnel(Saliency(lambda x, r=r: F.cosine_similarity(model(x), r[None], dim=1)))
            for r in references
        ]

        def run() -> object:
            return [t.attribute(query, nt_type="smoothgrad", nt_samples=n, stdevs=stdev) for t in tunnels]

        def warm_up() -> object:
            return tunnels[0].attribute(query, nt_type="smoothgrad", nt_samples=1, stdevs=stdev)

    warm_up()
    baseline = reset_peak_rss()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = peak_rss_mib()
    return {"seconds": statistics.median(times), "peak_rss_mib": peak, "rise_mib": peak - baseline}


def run_smoothgrad(arch: str, variant: str, n: int, k: int, size: int, repeats: int) -> dict:
    command = [
        sys.executable, __file__, "--smoothgrad-worker", arch, variant,
        "--n-samples", str(n), "--k", str(k), "--size", str(size), "--sg-repeats", str(repeats),
    ]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], args: argparse.Namespace, started: str, load: str) -> str:
    lines = [
        SECTION,
        "",
        f"`benchmarks/explain_bench.py {' '.join(sys.argv[1:])}`: {started}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, 1 thread, {args.size} px, k={args.k}, median of {args.repeats} "
        f"(GradCAM section), SmoothGrad n={args.n_samples} median of {args.sg_repeats}. "
        f"Load average at start: {load}.",
        "",
        "Latency in ms. `fwd`: one forward pass; `fwd+bwd`: forward + backward of one cosine target to "
        "the input. `pgc best`: pytorch-grad-cam GradCAM's faster mode (batch with the query "
        "replicated, or a loop of calls). Ratios: ours / floor (target <= 1.2: CNN vs fwd, ViT vs "
        "fwd+bwd), pgc best / ours (target >= 10).",
        "",
        "| model | fwd | fwd+bwd | gradcam | gradcampp | pgc batch | pgc loop | gradcam / floor | gradcampp / floor | pgc best / gradcam | pgc best / gradcampp |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        t = row["gradcam"]
        floor = t["forward+backward"] if row["vit"] else t["forward"]
        best = min(t["pgc gradcam batch"], t["pgc gradcam loop"])
        lines.append(
            f"| {row['model']} | {t['forward'] * 1e3:.0f} | {t['forward+backward'] * 1e3:.0f} | "
            f"{t['ours gradcam'] * 1e3:.0f} | {t['ours gradcampp'] * 1e3:.0f} | "
            f"{t['pgc gradcam batch'] * 1e3:.0f} | {t['pgc gradcam loop'] * 1e3:.0f} | "
            f"{t['ours gradcam'] / floor:.2f} ({'fwd+bwd' if row['vit'] else 'fwd'}) | "
            f"{t['ours gradcampp'] / floor:.2f} | {best / t['ours gradcam']:.1f}x | "
            f"{best / t['ours gradcampp']:.1f}x |"
        )
    served_rows = [row for row in rows if "ours gradcam served layer" in row["gradcam"]]
    if served_rows:
        lines += [
            "",
            f"GradCAM on the layer it is served at where the preset names one (`EncoderPreset.gradcam_layer`: "
            f"{', '.join(f'{arch} `{name}`' for arch, name in SERVED_GRADCAM_LAYERS.items())}), same runs, k={args.k}: "
            "the backward pass now runs through the stages after it.",
            "",
            "| model | fwd | fwd+bwd | gradcam (served layer) | pgc batch (same layer) | gradcam / fwd | gradcam / fwd+bwd | pgc / gradcam |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in served_rows:
            t = row["gradcam"]
            ours = t["ours gradcam served layer"]
            lines.append(
                f"| {row['model']} | {t['forward'] * 1e3:.1f} | {t['forward+backward'] * 1e3:.1f} | {ours * 1e3:.1f} | "
                f"{t['pgc gradcam served layer batch'] * 1e3:.1f} | {ours / t['forward']:.2f} | "
                f"{ours / t['forward+backward']:.2f} | {t['pgc gradcam served layer batch'] / ours:.1f}x |"
            )
    simmap_rows = [row for row in rows if "ours simmap" in row["gradcam"]]
    if simmap_rows:
        lines += [
            "",
            f"Similarity decomposition (simmap), same runs: one call explains the query against 1 or k={args.k} "
            "references from one forward pass and no backward pass (target: k / fwd <= 1.05 on the CNNs). "
            "Finished maps are upsampled to the input size and min-max normalised, as GradCAM's; `native` "
            "maps stay on the target layer's grid (what the TorchServe handler sends). "
            "The ViT has no exact decomposition (CLS pooling) and is left out.",
            "",
            f"| model | fwd | simmap k=1 | simmap k={args.k} | simmap k={args.k} native | gradcam k={args.k} | "
            f"k=1 / fwd | k={args.k} / fwd | k={args.k} native / fwd |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in simmap_rows:
            t = row["gradcam"]
            lines.append(
                f"| {row['model']} | {t['forward'] * 1e3:.1f} | {t['ours simmap k=1'] * 1e3:.1f} | "
                f"{t['ours simmap'] * 1e3:.1f} | {t['ours simmap native'] * 1e3:.1f} | {t['ours gradcam'] * 1e3:.1f} | "
                f"{t['ours simmap k=1'] / t['forward']:.3f} | {t['ours simmap'] / t['forward']:.3f} | "
                f"{t['ours simmap native'] / t['forward']:.3f} |"
            )
    if simmap_rows:
        lines += [
            "",
            f"Region correspondences (top {MAX_CORRESPONDENCES} pairs of the query and each of k={args.k} references), "
            "same runs (target: no more than one forward pass of each image, `fwd k+1`). `reused`: the added cost "
            "where the explanation's own passes give the locations; `own pass`: a forward pass of each image for them.",
            "",
            "| model | fwd k+1 | reused | own pass | reused / fwd k+1 | own pass / fwd k+1 |",
            "|---|---|---|---|---|---|",
        ]
        for row in simmap_rows:
            t = row["gradcam"]
            floor = t["forward k+1"]
            lines.append(
                f"| {row['model']} | {floor * 1e3:.1f} | {t['ours correspondences reused'] * 1e3:.2f} | "
                f"{t['ours correspondences own pass'] * 1e3:.1f} | {t['ours correspondences reused'] / floor:.3f} | "
                f"{t['ours correspondences own pass'] / floor:.3f} |"
            )
    lines += [
        "",
        f"ExplainOptions.verify, k={args.k} query-side GradCAM maps ({VERIFY_STEPS} steps, "
        f"{VERIFY_FORWARD_PASSES_PER_MAP} forward passes per map, torch eager), added to the explanation:",
        "",
        "| model | fwd ms | gradcam ms | verify ms | verify / fwd | verify / gradcam |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        t = row["gradcam"]
        lines.append(
            f"| {row['model']} | {t['forward'] * 1e3:.1f} | {t['ours gradcam'] * 1e3:.1f} | {t['ours verify'] * 1e3:.0f} | "
            f"{t['ours verify'] / t['forward']:.0f} | {t['ours verify'] / t['ours gradcam']:.1f} |"
        )
    if any("smoothgrad" in row for row in rows):
        lines += [
            "",
            f"SmoothGrad, n={args.n_samples}, k={args.k}: seconds per explanation; each variant in a "
            "fresh process, peak RSS during the runs (VmHWM, reset after the warm-up) and its rise above "
            "the RSS after building the model and a warm-up (target: Captum / ours >= 1.5 with peak memory no higher).",
            "",
            "| model | ours s | Captum s | Captum / ours | ours peak MiB (rise) | Captum peak MiB (rise) |",
            "|---|---|---|---|---|---|",
        ]
        for row in rows:
            if "smoothgrad" not in row:
                continue
            ours, captum = row["smoothgrad"]["ours"], row["smoothgrad"]["captum"]
            lines.append(
                f"| {row['model']} | {ours['seconds']:.2f} | {captum['seconds']:.2f} | "
                f"{captum['seconds'] / ours['seconds']:.2f}x | {ours['peak_rss_mib']:.0f} ({ours['rise_mib']:.0f}) | "
                f"{captum['peak_rss_mib']:.0f} ({captum['rise_mib']:.0f}) |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--repeats", type=int, default=None, help="GradCAM rounds (default 7, quick 3)")
    parser.add_argument("--sg-repeats", type=int, default=1, help="SmoothGrad runs per process")
    parser.add_argument("--n-samples", type=int, default=None, help="SmoothGrad n (default 25, quick 5)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--quick", action="store_true", help="3 rounds, SmoothGrad n=5")
    parser.add_argument("--skip-smoothgrad", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only, do not update RESULTS.md")
    parser.add_argument("--smoothgrad-worker", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.n_samples = args.n_samples or (5 if args.quick else 25)

    if args.smoothgrad_worker:
        arch, variant = args.smoothgrad_worker
        print(json.dumps(smoothgrad_worker(arch, variant, args.n_samples, args.k, args.size, args.sg_repeats)))
        return

    warnings.filterwarnings("ignore")
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = []
    for arch in args.models:
        print(f"[{arch}] GradCAM section ...", file=sys.stderr, flush=True)
        row: dict = {"model": arch, "vit": arch.startswith("vit"),
                     "gradcam": time_interleaved(gradcam_variants(arch, args.k, args.size), args.repeats)}
        if not args.skip_smoothgrad:
            print(f"[{arch}] SmoothGrad section ...", file=sys.stderr, flush=True)
            row["smoothgrad"] = {
                variant: run_smoothgrad(arch, variant, args.n_samples, args.k, args.size, args.sg_repeats)
                for variant in ("ours", "captum")
            }
        rows.append(row)
    text = markdown(rows, args, started, load)
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"written to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
