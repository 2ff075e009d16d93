"""The ``histoxplain evaluate retrieval|explanations`` commands (wired into the main CLI)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.vocabulary import DEFAULT_PRESET, POLARITIES, TARGETS
from histoxplain_service.evaluation.datasets import DEFAULT_CRC_PATTERN, LAYOUTS, TilingPolicy
from histoxplain_service.evaluation.faithfulness import PERTURBATIONS, REFERENCE_MAPS
from histoxplain_service.evaluation.metrics import DEFAULT_KS
from histoxplain_service.evaluation.report import environment, write_json, write_report

__all__ = ["add_evaluate_parser", "config_from_args"]

logger = logging.getLogger(__name__)


def _csv(kind: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from error

    return parse


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", metavar="ROOT", type=Path, help="dataset folder (a local copy)")
    parser.add_argument("--layout", required=True, choices=LAYOUTS, help="dataset layout")
    parser.add_argument("--out", required=True, type=Path, help="output folder (JSON, report.html, caches)")
    parser.add_argument("--data-dir", type=Path, default=None, help="histoxplain data folder (unused here; accepted for symmetry)")
    parser.add_argument("--model", default=DEFAULT_PRESET, metavar="PRESET", help=f"encoder preset (default {DEFAULT_PRESET})")
    parser.add_argument("--weights", type=Path, default=None, metavar="FILE", help="local weights file for the preset")
    parser.add_argument("--sample-size", type=int, default=64, metavar="N", help="images drawn per run, balanced by class; 0 = all (default 64)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of every random choice (default 0)")
    parser.add_argument("--k", type=_csv(int), default=DEFAULT_KS, metavar="K[,K...]", help="cut-offs (default 1,5,10)")
    parser.add_argument("--split", default=None, help="only this split (train, val, test, a CRC fold)")
    parser.add_argument("--crc-pattern", default=DEFAULT_CRC_PATTERN, help=f"CRC layout below ROOT with {{label}}, {{split}}, {{group}}, * (default {DEFAULT_CRC_PATTERN!r})")
    parser.add_argument("--dataset-mpp", type=float, default=None, metavar="UM", help="override the dataset's µm/px (needed for CRC and folders to resize)")
    parser.add_argument("--tile-size", type=int, default=224, metavar="PX", help="tile side after resizing (default 224)")
    parser.add_argument("--target-mpp", type=float, default=0.5, metavar="UM", help="resize to this µm/px when the dataset's is known (default 0.5); 0 = never resize")
    parser.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a tile (default 0.5)")
    parser.add_argument("--max-tiles-per-image", type=int, default=8, help="tiles drawn per image (default 8)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse cached embeddings and completed pairs in --out (default on; --no-resume recomputes)")


def config_from_args(args: argparse.Namespace):
    """EvaluationConfig from parsed arguments (validates what argparse cannot)."""
    from histoxplain_service.evaluation.retrieval import EvaluationConfig
    from histoxplain_service.config import Settings

    if not args.k or min(args.k) < 1:
        raise InvalidRequest(f"--k must be positive integers, got {args.k}")
    if args.out.exists() and not args.out.is_dir():
        raise InvalidRequest(f"--out {args.out} is a file; pass a folder")
    tiling = TilingPolicy(args.tile_size, args.target_mpp or None, args.min_tissue, args.max_tiles_per_image)
    tiling.check()
    return EvaluationConfig(
        root=args.root, layout=args.layout, out=args.out, model=args.model, weights=args.weights,
        sample_size=args.sample_size, seed=args.seed, ks=tuple(sorted(set(args.k))), crc_pattern=args.crc_pattern,
        dataset_mpp=args.dataset_mpp, split=args.split, tiling=tiling, resume=args.resume,
        max_pixels=Settings.from_env().max_pixels,
    )


def _load(config):
    from histoxplain_model.encoders import load_encoder

    if config.weights is not None and not Path(config.weights).is_file():
        raise InvalidRequest(f"--weights {config.weights} does not exist; pass a local weights file")
    return load_encoder(config.model, config.weights)


def _encoder_json(encoder, config) -> dict:
    return {
        "preset": encoder.preset.name,
        "architecture": encoder.preset.architecture,
        "embedding_dim": encoder.embedding_dim,
        "input_size": list(encoder.input_size),
        "weights": str(config.weights) if config.weights else None,
    }


def run_retrieval_command(args: argparse.Namespace) -> int:
    from histoxplain_service.evaluation.retrieval import run_retrieval

    config = config_from_args(args)
    # The scan validates the layout before the encoder (seconds) is loaded.
    from histoxplain_service.evaluation.retrieval import load_dataset

    load_dataset(config)
    config.out.mkdir(parents=True, exist_ok=True)
    encoder = _load(config)
    results, _ = run_retrieval(config, encoder)
    content = {"environment": environment(), "config": config.to_json(), "encoder": _encoder_json(encoder, config), "results": results}
    write_json(config.out / "retrieval.json", content)
    report = write_report(config.out)
    overall = results["image_level"]["overall"]
    print(f"wrote {config.out / 'retrieval.json'} and {report}; image-level " + ", ".join(f"{k} {v:.3f}" for k, v in overall.items() if v is not None and k.endswith(f"@{config.ks[0]}")))
    return 0


def run_explanations_command(args: argparse.Namespace) -> int:
    from histoxplain_service.evaluation.explanations import FULL_PRESET, ExplanationConfig, run_explanations
    from histoxplain_service.evaluation.retrieval import load_dataset

    config = config_from_args(args)
    given = {
        "polarities": args.polarities, "pairs": args.pairs, "steps": args.steps, "perturbations": args.perturbations,
        "road_steps": args.road_steps, "target_layers": args.target_layers, "targets": args.targets,
        "randomised_blocks": args.randomised_blocks, "smoothgrad_samples": args.smoothgrad_samples,
        "reference_maps": args.reference_maps, "forward_batch": args.forward_batch, "onnx": args.onnx,
        "resamples": args.resamples, "method_options": tuple(args.method_options),
    }
    if args.methods is not None:  # default: every method in the library's registry
        given["methods"] = args.methods
    if args.full:
        given = {**given, **{name: max(given[name], value) for name, value in FULL_PRESET.items()}}
    explanation = ExplanationConfig(**given)
    explanation.check()
    load_dataset(config)
    config.out.mkdir(parents=True, exist_ok=True)
    encoder = _load(config)
    results = run_explanations(config, explanation, encoder)
    content = {"environment": environment(), "config": config.to_json(), "encoder": _encoder_json(encoder, config), "results": results}
    write_json(config.out / "explanations.json", content)
    report = write_report(config.out)
    print(f"wrote {config.out / 'explanations.json'} and {report}")
    return 0


def add_evaluate_parser(subparsers) -> None:
    """Add ``evaluate`` with ``retrieval`` and ``explanations`` to an argparse subparsers object."""
    evaluate = subparsers.add_parser("evaluate", help="measure retrieval quality and explanation faithfulness on a dataset")
    commands = evaluate.add_subparsers(dest="evaluate_command", required=True, metavar="{retrieval,explanations}")
    retrieval = commands.add_parser("retrieval", help="precision@k, mAP@k, accuracy@k at tile and image level")
    _common(retrieval)
    retrieval.set_defaults(func=run_retrieval_command)
    explanations = commands.add_parser("explanations", help="deletion/insertion AUC, randomisation sanity check, runtime")
    _common(explanations)
    explanations.add_argument("--pairs", type=int, default=8, help="query/hit pairs to explain (default 8)")
    explanations.add_argument("--full", action="store_true",
                              help="the full preset: at least 200 pairs (cost: docs/EVALUATION.md), every other option as given")
    explanations.add_argument("--steps", type=int, default=16, help="deletion/insertion steps per curve (default 16)")
    explanations.add_argument("--road-steps", type=int, default=5, help="ROAD MoRF/LeRF steps per curve (default 5: 20 %% ... 100 %%)")
    explanations.add_argument("--methods", type=_csv(str), default=None, help="comma-separated (default: every method the library registers)")
    explanations.add_argument("--polarities", type=_csv(str), default=POLARITIES, help=f"comma-separated (default {','.join(POLARITIES)})")
    explanations.add_argument("--perturbations", type=_csv(str), default=("blur", "road"),
                              help=f"comma-separated, of {', '.join(PERTURBATIONS)} (default blur,road)")
    explanations.add_argument("--target-layers", type=_csv(str), default=("last", "previous"),
                              help="comma-separated, of last (the preset's target layer), previous (the stage before it, a finer grid; "
                                   "CAM methods only; CNN presets) (default last,previous)")
    explanations.add_argument("--targets", type=_csv(str), default=TARGETS, help=f"comma-separated, of {', '.join(TARGETS)} (default all)")
    explanations.add_argument("--randomised-blocks", type=int, default=2,
                              help="steps of the sanity check's cascade: step k re-initialises the top k blocks; 0 = none (default 2)")
    explanations.add_argument("--reference-maps", type=_csv(str), default=REFERENCE_MAPS,
                              help=f"comma-separated, of {', '.join(REFERENCE_MAPS)}; random is required (default all)")
    explanations.add_argument("--forward-batch", type=int, default=32, help="perturbed images per forward pass (default 32)")
    explanations.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                              help="score perturbed and masked images with onnxruntime when installed (default on; --no-onnx: torch)")
    explanations.add_argument("--smoothgrad-samples", type=int, default=25, help="SmoothGrad noisy copies (default 25, as served)")
    explanations.add_argument("--option", dest="method_options", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                              help="a method's option other than its served default, e.g. rise.n_masks=200 (repeatable)")
    explanations.add_argument("--resamples", type=int, default=4000, help="cluster-bootstrap resamples per interval (default 4000)")
    explanations.set_defaults(func=run_explanations_command)
