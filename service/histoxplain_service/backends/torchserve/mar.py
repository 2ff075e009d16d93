"""Build ``<name>.mar``: the histoxplain TorchServe model archive for one encoder preset.

The archive holds everything the TorchServe worker needs, nothing downloaded at run time:

    retrieval_handler.py      the handler (handlers/retrieval_handler.py, installed as a module)
    histoxplain_model/        the model library (handlers/histoxplain_model, no __pycache__)
    <weights file>            the preset's weights (from its package, or --weights)
    setup_config.json         {"preset", "weights", "max_pixels", "max_embed_batch"}; max_pixels is the
                              request pixel limit (HISTOXPLAIN_MAX_REQUEST_PIXELS, 16 Mpx by default)
    model-config.yaml         worker and batching defaults (registration parameters override them)

Usage (from the repository root; ``model_store/build_mar.py`` runs this module's ``main``):

    .venv/bin/python model_store/build_mar.py                      # efficientnet-lite0-imagenet
    .venv/bin/python model_store/build_mar.py --preset timm:resnet50 --weights rn50.pth \
        --model-name histoxplain --out model_store/

It archives the INSTALLED handler module and library (``pip install -e .`` or a wheel), so it
works from a source checkout and from an image alike.

Before archiving it loads the encoder once with the same preset and weights, so a weights file
that does not fit fails here (WeightsMismatchError) rather than in a TorchServe worker.
Built archives are not committed (``model_store/*.mar`` is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

from histoxplain_model.vocabulary import DEFAULT_PRESET

DEFAULT_MODEL_NAME = "histoxplain"

logger = logging.getLogger("build_mar")


def _source_of(module: str) -> Path:
    """Where an installed module lives, without importing it (the handler imports torch)."""
    spec = find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{module} is not installed; pip install -e . from the repository root")
    return Path(spec.origin)


def stage_weights(preset: str, weights: Path | None, staging: Path) -> str:
    """Put the weights file to archive into ``staging``; returns its file name.

    ``weights`` if given (copied as is), else the preset's packaged weights, saved in timm's
    key names (what ``load_encoder`` loads without any conversion).
    """
    from histoxplain_model.encoders import efficientnet_lite0_package_weights, get_preset

    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise SystemExit(f"weights file {weights} does not exist")
        shutil.copy2(weights, staging / weights.name)
        return weights.name
    if get_preset(preset).weights_source != "package:efficientnet-lite0":
        raise SystemExit(f"preset {preset!r} has no packaged weights; give --weights PATH")
    import torch

    name = "efficientnet-lite0-imagenet-timm.pt"
    torch.save(efficientnet_lite0_package_weights(), staging / name)
    return name


def check_loads(preset: str, weights: Path) -> None:
    """Load the encoder as the handler will, so a mismatch fails at build time."""
    from histoxplain_model.encoders import load_encoder

    encoder = load_encoder(preset, weights=weights)
    logger.info("%s loads with %s: %d-d embeddings", preset, weights.name, encoder.embedding_dim)


def model_config_yaml(batch_size: int, max_batch_delay_ms: int, response_timeout_s: int) -> str:
    return (
        "# Defaults when the archive is loaded without registration parameters (--models).\n"
        "minWorkers: 1\n"
        "maxWorkers: 1\n"
        f"batchSize: {batch_size}\n"
        f"maxBatchDelay: {max_batch_delay_ms}\n"
        f"responseTimeout: {response_timeout_s}\n"
    )


def build_mar(
    out_dir: Path,
    preset: str = DEFAULT_PRESET,
    weights: Path | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    version: str = "1.0",
    max_pixels: int | None = None,
    max_embed_batch: int = 32,
    batch_size: int = 1,
    max_batch_delay_ms: int = 50,
    response_timeout_s: int = 120,
    check: bool = True,
) -> Path:
    """Write ``out_dir/<model_name>.mar`` (replacing an older one) and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="histoxplain-mar-") as tmp:
        staging = Path(tmp) / "extra"
        staging.mkdir()
        weights_name = stage_weights(preset, weights, staging)
        if check:
            check_loads(preset, staging / weights_name)
        library = _source_of("histoxplain_model").parent
        shutil.copytree(library, staging / library.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        setup: dict[str, object] = {"preset": preset, "weights": weights_name, "max_embed_batch": max_embed_batch}
        if max_pixels is not None:
            setup["max_pixels"] = max_pixels
        (staging / "setup_config.json").write_text(json.dumps(setup, indent=2) + "\n")
        model_config = Path(tmp) / "model-config.yaml"
        model_config.write_text(model_config_yaml(batch_size, max_batch_delay_ms, response_timeout_s))
        archiver = Path(sys.executable).with_name("torch-model-archiver")
        command = [
            str(archiver if archiver.exists() else "torch-model-archiver"),
            "--model-name", model_name,
            "--version", version,
            "--handler", str(_source_of("retrieval_handler")),
            "--extra-files", str(staging),
            "--config-file", str(model_config),
            "--export-path", str(out_dir),
            "--force",
        ]
        # The archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps parallel
        # builds of the same name apart.
        env = dict(os.environ, TMPDIR=tmp)
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"torch-model-archiver failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    mar = out_dir / f"{model_name}.mar"
    logger.info("wrote %s (%.1f MB)", mar, mar.stat().st_size / 1e6)
    return mar


def ensure_mar(
    model_store: Path, preset: str, weights: Path | None, model_name: str, max_pixels: int | None = None,
    rebuild: bool = False,
) -> str:
    """Build ``<model_name>.mar`` for ``preset`` unless it exists (or ``rebuild``); its file name."""
    mar_name = f"{model_name}.mar"
    if rebuild or not (model_store / mar_name).is_file():
        logger.info("building %s for preset %s (one-off, ~30 s)", mar_name, preset)
        build_mar(model_store, preset=preset, weights=weights, model_name=model_name, max_pixels=max_pixels)
    return mar_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the histoxplain TorchServe model archive (.mar).")
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"encoder preset (default {DEFAULT_PRESET})")
    parser.add_argument("--weights", type=Path, help="weights file (default: the preset's packaged weights)")
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="archive and model name (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("model_store"), help="output folder (default model_store/)")
    parser.add_argument("--version", default="1.0", help="model version (default %(default)s)")
    parser.add_argument("--max-pixels", type=int,
                        help="largest request image (width * height) the worker decodes (default 4096 * 4096)")
    parser.add_argument("--max-embed-batch", type=int, default=32, help="images per forward pass (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="default TorchServe batchSize (default %(default)s)")
    parser.add_argument(
        "--max-batch-delay-ms", type=int, default=50, help="default maxBatchDelay (default %(default)s)"
    )
    parser.add_argument("--no-check", action="store_true", help="skip loading the encoder before archiving")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_mar(
        args.out,
        preset=args.preset,
        weights=args.weights,
        model_name=args.model_name,
        version=args.version,
        max_pixels=args.max_pixels,
        max_embed_batch=args.max_embed_batch,
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        check=not args.no_check,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
