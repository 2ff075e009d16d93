"""`evaluate explanations`: faithfulness, sanity and runtime of each method on retrieval pairs.

Pairs: a seeded sample of query tiles from the retrieval run, each with its best match from
another group (the top-1 hit a user would ask about). For every pair, method, polarity and
side the map is scored by deletion/insertion (:mod:`.faithfulness`) against the same curves
for reference maps (a smooth random map, a centred Gaussian, pixel noise); the query-side
``similar`` map is also recomputed along a cascade that re-initialises the encoder's top
blocks one more at a time (:mod:`.sanity`). Completed pairs are appended to
``OUT/explanations.pairs.jsonl`` so an interrupted run resumes.

Work that does not depend on the method is done once per pair and side: the baseline image,
the embeddings of the two unperturbed tiles, and the curves of each distinct map. The
``dissimilar`` score is exactly minus the ``similar`` one, so a map shared by both polarities
(every reference map) is scored once and its curves negated. Every method has its own
``dissimilar`` map (SmoothGrad's is its signed gradient x input form), so each is computed. The perturbed images are scored through onnxruntime when it is installed
(the encoder's checked ONNX export, about twice as fast as torch eager on CPU), else torch.

Why about 420 lines: this is the run loop of the explanation evaluation (pairs, caches,
journal) with its configuration; metrics, the sanity check and the report are modules of their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.options import SaliencyOptions, SmoothGradOptions
from histoxplain_model.saliency import METHODS, POLARITIES, check_method, get_explainer
from histoxplain_model.vocabulary import SMOOTHGRAD
from histoxplain_service.evaluation.faithfulness import (
    BASELINES,
    REFERENCE_MAPS,
    baseline_image,
    centred_gaussian_map,
    deletion_insertion_many,
    pixel_random_map,
    smooth_random_map,
)
from histoxplain_service.evaluation.metrics import rank_gallery
from histoxplain_service.evaluation.retrieval import EvaluationConfig, TileSet, run_retrieval
from histoxplain_service.evaluation.sanity import SANITY_THRESHOLD, map_rank_correlation, randomise_cascade
from histoxplain_service.evaluation.tiles import tile_image

__all__ = ["ExplanationConfig", "REFERENCE_MAPS", "SIDES", "run_explanations"]

SIDES = ("query", "retrieved")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExplanationConfig:
    """Options of the explanation evaluation (the dataset and encoder come from EvaluationConfig)."""

    methods: tuple[str, ...] = tuple(METHODS)
    polarities: tuple[str, ...] = POLARITIES
    pairs: int = 8
    steps: int = 16
    baselines: tuple[str, ...] = ("blur",)
    randomised_blocks: int = 2
    forward_batch: int = 16
    smoothgrad_samples: int = 25
    reference_maps: tuple[str, ...] = REFERENCE_MAPS
    onnx: bool = True

    def check(self) -> None:
        for method in self.methods:
            check_method(method)
        for baseline in self.baselines:
            if baseline not in BASELINES:
                raise InvalidRequest(f"unknown baseline {baseline!r}; known: {', '.join(BASELINES)}")
        for name in self.reference_maps:
            if name not in REFERENCE_MAPS:
                raise InvalidRequest(f"unknown reference map {name!r}; known: {', '.join(REFERENCE_MAPS)}")
        if "similar" not in self.polarities:
            raise InvalidRequest("--polarities must include similar (the sanity check recomputes the similar map)")
        if "random" not in self.reference_maps:
            raise InvalidRequest("--reference-maps must include random (win rates are measured against it)")
        if min(self.pairs, self.randomised_blocks, self.smoothgrad_samples, self.forward_batch) < 1 or self.steps < 2:
            raise InvalidRequest("--pairs, --randomised-blocks, --smoothgrad-samples and --forward-batch must be >= 1, --steps >= 2")


def _pair_indices(tiles: TileSet, n_pairs: int, seed: int) -> list[tuple[int, int]]:
    groups = np.unique(np.asarray(tiles.tile_groups), return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(len(groups), size=min(n_pairs, len(groups)), replace=False))
    ranked = rank_gallery(tiles.embeddings[queries] @ tiles.embeddings.T, groups[queries], groups, 1)
    return [(int(q), int(h[0])) for q, h in zip(queries, ranked) if h[0] >= 0]


class _TilePixels:
    """Tile pixels by tile index, re-cut from the image (deterministic) and kept per image."""

    def __init__(self, tiles: TileSet, config: EvaluationConfig) -> None:
        self.tiles, self.config, self._images = tiles, config, {}

    def __call__(self, index: int) -> np.ndarray:
        owner = int(self.tiles.tile_image[index])
        if owner not in self._images:
            cut = tile_image(self.tiles.images[owner], self.config.tiling, self.config.max_pixels)
            self._images[owner] = {tile.box: tile.pixels for tile in cut}
        return self._images[owner][tuple(int(v) for v in self.tiles.boxes[index])]

    def name(self, index: int) -> str:
        x, y, w, h = (int(v) for v in self.tiles.boxes[index])
        return f"{self.tiles.images[int(self.tiles.tile_image[index])].image_id}@{x},{y},{w}x{h}"


Embedder = Callable[[torch.Tensor], torch.Tensor]
"""(B, 3, H, W) model input -> (B, D) L2-normalised embeddings, no gradients."""


def _torch_embedder(model: torch.nn.Module) -> Embedder:
    @torch.no_grad()
    def embed(pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(model(pixels), dim=1)

    return embed


def _curve_embedder(encoder, config: EvaluationConfig, explanation: ExplanationConfig) -> tuple[Embedder, str]:
    """The embedder that scores perturbed images: onnxruntime when available, else torch."""
    if explanation.onnx:
        from histoxplain_model.onnx_embedder import cached_onnx_embedder, onnxruntime_available

        if onnxruntime_available():
            embedder = cached_onnx_embedder(encoder, config.out / "cache" / "onnx")
            return (lambda pixels: torch.from_numpy(embedder.embed(pixels.numpy()))), "onnxruntime"
        logger.info("onnxruntime is not installed; deletion/insertion images are scored with torch")
    return _torch_embedder(encoder.model), "torch"


def _feature_grid(encoder, pixels: torch.Tensor) -> tuple[int, int]:
    """(h, w) of the target layer's map for ``pixels``: the grid GradCAM upsamples from."""
    grid: list[tuple[int, int]] = []

    def hook(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        activations = encoder.reshape_transform(output) if encoder.reshape_transform is not None else output
        grid.append(tuple(int(v) for v in activations.shape[-2:]))

    handle = encoder.target_layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            encoder.model(pixels)
    finally:
        handle.remove()
    return grid[0]


@dataclass(frozen=True)
class _Models:
    """What every pair uses: explainers of the trained model, the sanity cascade, the scorer."""

    explainers: dict[str, object]
    cascade: list[tuple[torch.nn.Module, dict[str, object]]]
    curve_embedder: Embedder
    grid: tuple[int, int]


def _explain_all(models: _Models, pixels: dict, references: dict, config: ExplanationConfig):
    maps: dict[str, dict[str, np.ndarray]] = {}
    runtime: dict[str, dict[str, float]] = {}
    for method, explainer in models.explainers.items():
        maps[method], runtime[method] = {}, {}
        for side in SIDES:
            seconds = []
            for polarity in config.polarities:
                started = time.perf_counter()
                result = explainer.explain(pixels[side], references[side], polarity=polarity)
                seconds.append(time.perf_counter() - started)
                maps[method][f"{side}/{polarity}"] = result.heatmaps[0, 0]
            runtime[method][side] = float(np.mean(seconds))
    return maps, runtime


def _reference_maps(shape: tuple[int, int], grid: tuple[int, int], names: Sequence[str], seed: int) -> dict[str, np.ndarray]:
    makers = {
        "random": lambda: smooth_random_map(shape, grid, seed),
        "gaussian": lambda: centred_gaussian_map(shape),
        "random_pixel": lambda: pixel_random_map(shape, seed),
    }
    return {name: makers[name]() for name in names}


def _curves(models: _Models, pixels: dict, maps: dict, reference_maps: dict, config: ExplanationConfig, seed: int) -> dict:
    curves: dict = {}
    for side in SIDES:
        reference = models.curve_embedder(pixels["retrieved" if side == "query" else "query"])

        def cosine(images: torch.Tensor) -> torch.Tensor:
            return (models.curve_embedder(images) @ reference.T)[:, 0]

        named = {(p, m): maps[m][f"{side}/{p}"] for p in config.polarities for m in config.methods}
        named |= {(p, m): saliency for p in config.polarities for m, saliency in reference_maps.items()}
        # One curve per distinct map; polarities only flip the sign of the score.
        distinct: dict[bytes, np.ndarray] = {}
        for saliency in named.values():
            distinct.setdefault(hashlib.sha1(np.ascontiguousarray(saliency).tobytes()).digest(), saliency)
        keys = list(distinct)
        for baseline_kind in config.baselines:
            baseline = baseline_image(pixels[side], baseline_kind)
            computed = dict(zip(keys, deletion_insertion_many(
                cosine, pixels[side], [distinct[k] for k in keys], baseline, config.steps, config.forward_batch, seed)))
            for (polarity, name), saliency in named.items():
                c = computed[hashlib.sha1(np.ascontiguousarray(saliency).tobytes()).digest()]
                sign = -1.0 if polarity == "dissimilar" else 1.0
                deletion, insertion = sign * c.deletion, sign * c.insertion
                curves.setdefault(side, {}).setdefault(polarity, {}).setdefault(baseline_kind, {})[name] = {
                    "deletion_auc": float(np.trapezoid(deletion, c.fractions)),
                    "insertion_auc": float(np.trapezoid(insertion, c.fractions)),
                    "deletion": deletion.round(5).tolist(),
                    "insertion": insertion.round(5).tolist(),
                }
    return curves


def _sanity(models: _Models, pixels: dict, maps: dict, config: ExplanationConfig) -> dict[str, list[float]]:
    """Spearman between the trained and the randomised query-side similar map, per cascade step."""
    sanity: dict[str, list[float]] = {method: [] for method in config.methods}
    for model, explainers in models.cascade:
        references = _torch_embedder(model)(pixels["retrieved"])
        for method, explainer in explainers.items():
            randomised = explainer.explain(pixels["query"], references, polarity="similar").heatmaps[0, 0]
            sanity[method].append(map_rank_correlation(maps[method]["query/similar"], randomised))
    return sanity


def _evaluate_pair(encoder, models: _Models, pixels_of, query: int, hit: int, config: ExplanationConfig, seed: int) -> tuple[dict, dict]:
    pixels = {"query": encoder.preprocess([pixels_of(query)]), "retrieved": encoder.preprocess([pixels_of(hit)])}
    embed = _torch_embedder(encoder.model)
    embedded = {side: embed(pixels[side]) for side in SIDES}
    references = {"query": embedded["retrieved"], "retrieved": embedded["query"]}
    maps, runtime = _explain_all(models, pixels, references, config)
    shape = tuple(pixels["query"].shape[-2:])
    reference_maps = _reference_maps(shape, models.grid, config.reference_maps, seed)
    record = {
        "score": float((embedded["query"] @ embedded["retrieved"].T).item()),
        "runtime_s": runtime,
        "curves": _curves(models, pixels, maps, reference_maps, config, seed),
        "sanity_spearman": _sanity(models, pixels, maps, config),
    }
    stored_maps = {f"{m}/{key}": value for m in config.methods for key, value in maps[m].items()}
    stored_maps |= {f"reference/{name}": value for name, value in reference_maps.items()}
    return record, stored_maps


def _build_models(encoder, config: EvaluationConfig, explanation: ExplanationConfig, example_tile):
    """Explainers for the trained model and each cascade step, the curve scorer, the map grid."""
    layer_name = next(name for name, module in encoder.model.named_modules() if module is encoder.target_layer)
    # Options belong to their method: only SmoothGrad has one to set here (the others: defaults).
    options: dict[str, SaliencyOptions] = {SMOOTHGRAD: SmoothGradOptions(n_samples=explanation.smoothgrad_samples)}

    def explainers(model: torch.nn.Module) -> dict[str, object]:
        target_layer = model.get_submodule(layer_name) if layer_name else model
        return {
            method: get_explainer(method, model, target_layer, encoder.reshape_transform, options.get(method))
            for method in explanation.methods
        }

    cascade = randomise_cascade(encoder.model, explanation.randomised_blocks, config.seed)
    curve_embedder, curve_scorer = _curve_embedder(encoder, config, explanation)
    grid = _feature_grid(encoder, encoder.preprocess([example_tile])) if example_tile is not None else (1, 1)
    models = _Models(explainers(encoder.model), [(model, explainers(model)) for model, _ in cascade], curve_embedder, grid)
    return models, [names for _, names in cascade], curve_scorer


def _config_key(config: EvaluationConfig, explanation: ExplanationConfig) -> str:
    payload = json.dumps([config.model, str(config.weights), config.seed, repr(config.tiling), repr(explanation)])
    return hashlib.sha1(payload.encode()).hexdigest()[:12]


def _load_done(path: Path, key: str) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run: that pair is recomputed
            if record.get("config_key") == key:
                done[record["pair_id"]] = record
    return done


def run_explanations(config: EvaluationConfig, explanation: ExplanationConfig, encoder) -> dict:
    """Evaluate every method on a seeded sample of retrieval pairs; returns the JSON content."""
    explanation.check()
    torch.manual_seed(config.seed)
    retrieval, tiles = run_retrieval(config, encoder)
    pairs = _pair_indices(tiles, explanation.pairs, config.seed)
    pixels_of = _TilePixels(tiles, config)
    models, cascade_names, curve_scorer = _build_models(encoder, config, explanation, pixels_of(pairs[0][0]) if pairs else None)
    key = _config_key(config, explanation)
    journal = config.out / "explanations.pairs.jsonl"
    maps_dir = config.out / "cache" / f"maps-{key}"
    maps_dir.mkdir(parents=True, exist_ok=True)
    done = _load_done(journal, key) if config.resume else {}
    if not config.resume and journal.exists():
        journal.unlink()
    records = []
    for number, (query, hit) in enumerate(tqdm(pairs, desc="explaining pairs", unit="pair")):
        pair_id = f"{pixels_of.name(query)} -> {pixels_of.name(hit)}"
        if pair_id in done and (maps_dir / f"{number}.npz").is_file():
            records.append(done[pair_id])
            continue
        record, maps = _evaluate_pair(encoder, models, pixels_of, query, hit, explanation, config.seed + number)
        record = {
            "config_key": key,
            "pair_id": pair_id,
            "number": number,
            "query": {"tile": pixels_of.name(query), "label": tiles.tile_labels[query]},
            "hit": {"tile": pixels_of.name(hit), "label": tiles.tile_labels[hit]},
            **record,
        }
        np.savez_compressed(
            maps_dir / f"{number}.npz",
            query=pixels_of(query),
            hit=pixels_of(hit),
            **{name.replace("/", "__"): value.astype(np.float16) for name, value in maps.items()},
        )
        with journal.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        records.append(record)
    return {
        "retrieval": retrieval,
        "settings": {
            "methods": list(explanation.methods),
            "polarities": list(explanation.polarities),
            "sides": list(SIDES),
            "baselines": list(explanation.baselines),
            "steps": explanation.steps,
            "pairs_requested": explanation.pairs,
            "randomised_modules": cascade_names[0] if cascade_names else [],
            "randomised_cascade": cascade_names,
            "reference_maps": list(explanation.reference_maps),
            "random_grid": list(models.grid),
            "smoothgrad_samples": explanation.smoothgrad_samples,
            "curve_scorer": curve_scorer,
            "forward_batch": explanation.forward_batch,
            "sanity_threshold": SANITY_THRESHOLD,
        },
        "summary": summarise(records, explanation),
        "pairs": records,
        "maps_dir": str(maps_dir.relative_to(config.out)),
    }


def summarise(records: Sequence[dict], explanation: ExplanationConfig) -> dict:
    """Means and standard deviations over pairs; win rates against the random map."""
    faithfulness = []
    for side in SIDES:
        for polarity in explanation.polarities:
            for baseline in explanation.baselines:
                for name in (*explanation.methods, *explanation.reference_maps):
                    rows = [r["curves"][side][polarity][baseline] for r in records]
                    deletion = np.array([row[name]["deletion_auc"] for row in rows])
                    insertion = np.array([row[name]["insertion_auc"] for row in rows])
                    rand_del = np.array([row["random"]["deletion_auc"] for row in rows])
                    rand_ins = np.array([row["random"]["insertion_auc"] for row in rows])
                    # Pixel-level maps (SmoothGrad) also against pixel noise: the chance level of their own kind.
                    pixel_wins = {}
                    if "random_pixel" in explanation.reference_maps:
                        pixel_del = np.array([row["random_pixel"]["deletion_auc"] for row in rows])
                        pixel_ins = np.array([row["random_pixel"]["insertion_auc"] for row in rows])
                        pixel_wins = {
                            "deletion_beats_random_pixel": float(np.mean(deletion < pixel_del)),
                            "insertion_beats_random_pixel": float(np.mean(insertion > pixel_ins)),
                        }
                    faithfulness.append(
                        {
                            "side": side,
                            "polarity": polarity,
                            "baseline": baseline,
                            "map": name,
                            "pairs": len(rows),
                            "deletion_auc_mean": float(deletion.mean()),
                            "deletion_auc_sd": float(deletion.std()),
                            "insertion_auc_mean": float(insertion.mean()),
                            "insertion_auc_sd": float(insertion.std()),
                            "deletion_beats_random": float(np.mean(deletion < rand_del)),
                            "insertion_beats_random": float(np.mean(insertion > rand_ins)),
                            **pixel_wins,
                            "mean_deletion_curve": np.mean([row[name]["deletion"] for row in rows], axis=0).round(5).tolist(),
                            "mean_insertion_curve": np.mean([row[name]["insertion"] for row in rows], axis=0).round(5).tolist(),
                        }
                    )
    sanity = {}
    runtime = {}
    for method in explanation.methods:
        per_step = np.array([r["sanity_spearman"][method] for r in records]).reshape(len(records), -1)  # (pairs, steps)
        steps = [
            {
                "step": step + 1,
                "spearman_mean": float(per_step[:, step].mean()),
                "spearman_sd": float(per_step[:, step].std()),
                "passes": bool(abs(per_step[:, step].mean()) < SANITY_THRESHOLD),
            }
            for step in range(per_step.shape[1])
        ]
        # The verdict is the deepest step's: the map must have changed once the top blocks are random.
        sanity[method] = {**{k: v for k, v in steps[-1].items() if k != "step"}, "steps": steps}
        runtime[method] = {side: float(np.median([r["runtime_s"][method][side] for r in records])) for side in SIDES}
    return {"faithfulness": faithfulness, "sanity": sanity, "runtime_median_s": runtime}
