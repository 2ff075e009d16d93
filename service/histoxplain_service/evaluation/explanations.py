"""`evaluate explanations`: faithfulness, sanity and runtime of each method on retrieval pairs.

Pairs: a seeded sample of query tiles from the retrieval run (a seeded permutation, so a run
with fewer pairs is a prefix of one with more), each with its best match from another group
(the top-1 hit a user would ask about). For every pair, variant (:mod:`.variants`: every
registered method, the CAM methods also on the finer stage, each target), polarity and side the
map is scored by deletion/insertion towards a baseline and by ROAD (:mod:`histoxplain_model.faithfulness`)
against the same curves of reference maps (the smooth random map on each grid, a centred Gaussian,
pixel noise); the query-side ``similar`` map of each method is also recomputed along a cascade
that re-initialises the encoder's top blocks (:mod:`.sanity`). :mod:`.summary` turns the pairs
into paired comparisons with the random map. Completed pairs are appended to
``OUT/explanations.pairs.jsonl`` so an interrupted run resumes.

Work that does not depend on the method is done once per pair and side: the baseline image,
the embeddings of the two unperturbed tiles, and the curves of each distinct map. The
``dissimilar`` score is exactly minus the ``similar`` one, so a map shared by both polarities
(every reference map) is scored once and its curves negated. The perturbed images (and RISE's
masked images) are scored through onnxruntime when it is installed (the encoder's checked ONNX
export, about twice as fast as torch eager on CPU), else torch. The curves are always of the
cosine (the score the ranking uses), whichever target a variant explains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.options import SaliencyOptions, SmoothGradOptions, default_options
from histoxplain_model.saliency import METHODS, POLARITIES, check_method
from histoxplain_model.vocabulary import SMOOTHGRAD, TARGETS, check_name
from histoxplain_service.evaluation.faithfulness import (
    PERTURBATIONS,
    ROAD_NOISE,
    REFERENCE_MAPS,
    baseline_image,
    centred_gaussian_map,
    deletion_insertion_many,
    pixel_random_map,
    road_curves_many,
    smooth_random_map,
)
from histoxplain_service.evaluation.metrics import rank_gallery
from histoxplain_service.evaluation.retrieval import EvaluationConfig, TileSet, run_retrieval
from histoxplain_service.evaluation.sanity import SANITY_THRESHOLD, map_rank_correlation, randomise_cascade
from histoxplain_service.evaluation.summary import summarise
from histoxplain_service.evaluation.tiles import tile_image
from histoxplain_service.evaluation.variants import (
    LAST,
    LAYERS,
    Variant,
    build_explainers,
    feature_grid,
    layer_modules,
    plan_variants,
    probe_variants,
    random_map_name,
)

__all__ = ["ExplanationConfig", "FULL_PRESET", "REFERENCE_MAPS", "SIDES", "run_explanations"]

SIDES = ("query", "retrieved")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExplanationConfig:
    """Options of the explanation evaluation (the dataset and encoder come from EvaluationConfig).

    ``methods``: default every method in the library's registry. ``perturbations``: ``blur``
    and ``zero`` give deletion/insertion towards that baseline in ``steps`` steps; ``road``
    gives MoRF/LeRF with noisy linear imputation in ``road_steps`` steps (one sparse solve per
    point: the costly part). ``target_layers``: ``last`` and ``previous`` (the finer stage, for
    the CAM methods). ``targets``: ``cosine`` and ``projection``. ``randomised_blocks`` 0 skips
    the sanity cascade.
    """

    methods: tuple[str, ...] = tuple(METHODS)
    polarities: tuple[str, ...] = POLARITIES
    pairs: int = 8
    steps: int = 16
    perturbations: tuple[str, ...] = ("blur", "road")
    road_steps: int = 5
    target_layers: tuple[str, ...] = LAYERS
    targets: tuple[str, ...] = TARGETS
    randomised_blocks: int = 2
    forward_batch: int = 32
    smoothgrad_samples: int = 25
    reference_maps: tuple[str, ...] = REFERENCE_MAPS
    onnx: bool = True
    resamples: int = 4000
    method_options: tuple[str, ...] = ()

    def check(self) -> None:
        for method in self.methods:
            check_method(method)
        for perturbation in self.perturbations:
            check_name("perturbation", perturbation, PERTURBATIONS)
        for layer in self.target_layers:
            check_name("target layer", layer, LAYERS)
        for target in self.targets:
            check_name("target", target, TARGETS)
        for name in self.reference_maps:
            check_name("reference map", name, REFERENCE_MAPS)
        if "similar" not in self.polarities:
            raise InvalidRequest("--polarities must include similar (the sanity check recomputes the similar map)")
        if "random" not in self.reference_maps:
            raise InvalidRequest("--reference-maps must include random (the paired differences are taken against it)")
        if LAST not in self.target_layers or "cosine" not in self.targets:
            raise InvalidRequest("--target-layers must include last and --targets cosine (the maps as served)")
        if min(self.pairs, self.smoothgrad_samples, self.forward_batch) < 1 or min(self.steps, self.road_steps) < 2:
            raise InvalidRequest("--pairs, --smoothgrad-samples and --forward-batch must be >= 1, --steps and --road-steps >= 2")
        if self.randomised_blocks < 0 or self.resamples < 100:
            raise InvalidRequest("--randomised-blocks must be >= 0 and --resamples >= 100")
        self.options()

    def options(self) -> dict[str, SaliencyOptions]:
        """Each method's options: its defaults, SmoothGrad's ``smoothgrad_samples``, then every
        ``METHOD.FIELD=VALUE`` of ``method_options`` (the value parsed as the field's default's type)."""
        options: dict[str, SaliencyOptions] = {SMOOTHGRAD: SmoothGradOptions(n_samples=self.smoothgrad_samples)}
        for text in self.method_options:
            name, _, value = text.partition("=")
            method, _, field_name = name.partition(".")
            current = options.get(method) or default_options(check_method(method))
            if not value or field_name not in {f.name for f in fields(current)}:
                raise InvalidRequest(
                    f"--option {method}.{field_name}: expected METHOD.FIELD=VALUE with FIELD one of "
                    f"{', '.join(f.name for f in fields(current)) or '(none)'}"
                )
            kind = type(getattr(current, field_name))
            try:
                parsed = kind(value)
            except ValueError as error:
                raise InvalidRequest(f"--option {method}.{field_name} must be a {kind.__name__}") from error
            options[method] = replace(current, **{field_name: parsed})
        return options


#: ``--full``: enough pairs for intervals that separate small effects (at least 200; the cost is
#: stated in docs/EVALUATION.md from the measured per-pair time).
FULL_PRESET = {"pairs": 200}


def _pair_indices(tiles: TileSet, n_pairs: int, seed: int) -> list[tuple[int, int]]:
    """(query, top-1 hit from another group) for the first ``n_pairs`` tiles of a seeded permutation."""
    groups = np.unique(np.asarray(tiles.tile_groups), return_inverse=True)[1]
    queries = np.random.default_rng(seed).permutation(len(groups))[:n_pairs]
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


def _curve_embedder(encoder, config: EvaluationConfig, explanation: ExplanationConfig):
    """The embedder that scores perturbed images: onnxruntime when available, else torch; its
    name; and the numpy pixel embedder handed to forward-only methods (None with torch)."""
    if explanation.onnx:
        from histoxplain_model.onnx_embedder import cached_onnx_embedder, onnxruntime_available

        if onnxruntime_available():
            embedder = cached_onnx_embedder(encoder, config.out / "cache" / "onnx")
            return (lambda pixels: torch.from_numpy(embedder.embed(pixels.numpy()))), "onnxruntime", embedder.embed_raw
        logger.info("onnxruntime is not installed; deletion/insertion images are scored with torch")
    return _torch_embedder(encoder.model), "torch", None


@dataclass(frozen=True)
class _Models:
    """What every pair uses: the variants and their explainers, the sanity cascade, the scorer."""

    variants: list[Variant]
    explainers: dict[str, object]
    cascade: list[tuple[torch.nn.Module, dict[str, object]]]
    curve_embedder: Embedder
    grids: dict[str, tuple[int, int]]


def _explain_all(models: _Models, pixels: dict, references: dict, config: ExplanationConfig):
    maps: dict[str, dict[str, np.ndarray]] = {}
    runtime: dict[str, dict[str, float]] = {}
    for variant in models.variants:
        explainer = models.explainers[variant.name]
        maps[variant.name], runtime[variant.name] = {}, {}
        for side in SIDES:
            seconds = []
            for polarity in config.polarities:
                started = time.perf_counter()
                result = explainer.explain(pixels[side], references[side], polarity=polarity, target=variant.target)
                seconds.append(time.perf_counter() - started)
                maps[variant.name][f"{side}/{polarity}"] = result.heatmaps[0, 0]
            runtime[variant.name][side] = float(np.mean(seconds))
    return maps, runtime


def _reference_maps(shape: tuple[int, int], grids: dict[str, tuple[int, int]], names: Sequence[str], seed: int) -> dict[str, np.ndarray]:
    maps = {random_map_name(layer): smooth_random_map(shape, grid, seed) for layer, grid in grids.items()}
    if "gaussian" in names:
        maps["gaussian"] = centred_gaussian_map(shape)
    if "random_pixel" in names:
        maps["random_pixel"] = pixel_random_map(shape, seed)
    return maps


def _digest(saliency: np.ndarray) -> bytes:
    return hashlib.sha1(np.ascontiguousarray(saliency).tobytes()).digest()


def _curves(models: _Models, pixels: dict, maps: dict, reference_maps: dict, config: ExplanationConfig, seed: int) -> dict:
    curves: dict = {}
    for side in SIDES:
        reference = models.curve_embedder(pixels["retrieved" if side == "query" else "query"])

        def cosine(images: torch.Tensor) -> torch.Tensor:
            return (models.curve_embedder(images) @ reference.T)[:, 0]

        named = {(p, name): by_key[f"{side}/{p}"] for p in config.polarities for name, by_key in maps.items()}
        named |= {(p, m): saliency for p in config.polarities for m, saliency in reference_maps.items()}
        for perturbation in config.perturbations:
            # ROAD only for what the comparisons need (methods and random maps): each point is a sparse solve.
            scored = {k: v for k, v in named.items() if perturbation != "road" or k[1] not in ("gaussian", "random_pixel")}
            # One curve per distinct map; polarities only flip the sign of the score.
            distinct = {_digest(saliency): saliency for saliency in scored.values()}
            keys = list(distinct)
            if perturbation == "road":
                computed = road_curves_many(cosine, pixels[side], [distinct[k] for k in keys], config.road_steps, config.forward_batch, seed)
            else:
                computed = deletion_insertion_many(
                    cosine, pixels[side], [distinct[k] for k in keys], baseline_image(pixels[side], perturbation),
                    config.steps, config.forward_batch, seed,
                )
            by_digest = dict(zip(keys, computed))
            for (polarity, name), saliency in scored.items():
                c = by_digest[_digest(saliency)]
                sign = -1.0 if polarity == "dissimilar" else 1.0
                deletion, insertion = sign * c.deletion, sign * c.insertion
                curves.setdefault(side, {}).setdefault(polarity, {}).setdefault(perturbation, {})[name] = {
                    "deletion_auc": float(np.trapezoid(deletion, c.fractions)),
                    "insertion_auc": float(np.trapezoid(insertion, c.fractions)),
                    "deletion": deletion.round(5).tolist(),
                    "insertion": insertion.round(5).tolist(),
                }
    return curves


def _sanity(models: _Models, pixels: dict, maps: dict) -> dict[str, list[float]]:
    """Spearman between the trained and the randomised query-side similar map, per cascade step."""
    sanity: dict[str, list[float]] = {name: [] for _, explainers in models.cascade[:1] for name in explainers}
    for model, explainers in models.cascade:
        references = _torch_embedder(model)(pixels["retrieved"])
        for name, explainer in explainers.items():
            randomised = explainer.explain(pixels["query"], references, polarity="similar").heatmaps[0, 0]
            sanity[name].append(map_rank_correlation(maps[name]["query/similar"], randomised))
    return sanity


def _evaluate_pair(encoder, models: _Models, pixels_of, query: int, hit: int, config: ExplanationConfig, seed: int) -> tuple[dict, dict]:
    pixels = {"query": encoder.preprocess([pixels_of(query)]), "retrieved": encoder.preprocess([pixels_of(hit)])}
    embed = _torch_embedder(encoder.model)
    embedded = {side: embed(pixels[side]) for side in SIDES}
    references = {"query": embedded["retrieved"], "retrieved": embedded["query"]}
    maps, runtime = _explain_all(models, pixels, references, config)
    shape = tuple(pixels["query"].shape[-2:])
    reference_maps = _reference_maps(shape, models.grids, config.reference_maps, seed)
    record = {
        "score": float((embedded["query"] @ embedded["retrieved"].T).item()),
        "runtime_s": runtime,
        "curves": _curves(models, pixels, maps, reference_maps, config, seed),
        "sanity_spearman": _sanity(models, pixels, maps),
    }
    stored_maps = {f"{name}/{key}": value for name, by_key in maps.items() for key, value in by_key.items()}
    # A constant map ranks pixels by the tie-break alone (pixel noise): an empty explanation.
    record["flat_maps"] = sorted(key for key, value in stored_maps.items() if float(value.max()) == float(value.min()))
    stored_maps |= {f"reference/{name}": value for name, value in reference_maps.items()}
    return record, stored_maps


def _build_models(encoder, config: EvaluationConfig, explanation: ExplanationConfig, example_pair):
    """Variants and explainers for the trained model and each cascade step, the curve scorer,
    the grid of each layer; the variants a method refused, with the reason."""
    layer_names = layer_modules(encoder, explanation.target_layers)
    options = explanation.options()
    curve_embedder, curve_scorer, pixel_embedder = _curve_embedder(encoder, config, explanation)
    variants = plan_variants(explanation.methods, explanation.target_layers, explanation.targets)
    skipped: dict[str, str] = {}
    grids = {LAST: (1, 1)}
    if example_pair is not None:
        query, hit = (encoder.preprocess([tile]) for tile in example_pair)
        variants, skipped = probe_variants(
            encoder.model, variants, layer_names, encoder.reshape_transform, options, query, encoder.embed(hit), pixel_embedder
        )
        grids = {
            layer: feature_grid(encoder.model, encoder.model.get_submodule(name) if name else encoder.model, encoder.reshape_transform, query)
            for layer, name in layer_names.items()
        }
    explainers = build_explainers(encoder.model, variants, layer_names, encoder.reshape_transform, options, pixel_embedder)
    base = [variant for variant in variants if variant.is_base]
    cascade = randomise_cascade(encoder.model, explanation.randomised_blocks, config.seed) if explanation.randomised_blocks else []
    models = _Models(
        variants, explainers,
        [(model, build_explainers(model, base, layer_names, encoder.reshape_transform, options)) for model, _ in cascade],
        curve_embedder, grids,
    )
    return models, [names for _, names in cascade], curve_scorer, skipped, layer_names


def _config_key(config: EvaluationConfig, explanation: ExplanationConfig) -> str:
    """What a finished pair depends on: every option but the number of pairs and the resamples,
    and each method's options as resolved now, so a changed library default (RISE's number of
    masks, say) starts new pairs instead of mixing with those computed before it."""
    options = replace(explanation, pairs=0, resamples=0)
    resolved = {method: repr(explanation.options().get(method) or default_options(check_method(method)))
                for method in explanation.methods}
    payload = json.dumps([config.model, str(config.weights), config.seed, repr(config.tiling), repr(options), resolved])
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
    """Evaluate every variant on a seeded sample of retrieval pairs; returns the JSON content."""
    explanation.check()
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    retrieval, tiles = run_retrieval(config, encoder)
    pairs = _pair_indices(tiles, explanation.pairs, config.seed)
    pixels_of = _TilePixels(tiles, config)
    example = (pixels_of(pairs[0][0]), pixels_of(pairs[0][1])) if pairs else None
    models, cascade_names, curve_scorer, skipped, layer_names = _build_models(encoder, config, explanation, example)
    key = _config_key(config, explanation)
    journal = config.out / "explanations.pairs.jsonl"
    maps_dir = config.out / "cache" / f"maps-{key}"
    maps_dir.mkdir(parents=True, exist_ok=True)
    done = _load_done(journal, key) if config.resume else {}
    if not config.resume and journal.exists():
        journal.unlink()
    records, computed_seconds = [], []
    for number, (query, hit) in enumerate(tqdm(pairs, desc="explaining pairs", unit="pair")):
        pair_id = f"{pixels_of.name(query)} -> {pixels_of.name(hit)}"
        if pair_id in done and (maps_dir / f"{number}.npz").is_file():
            records.append(done[pair_id])
            continue
        pair_started = time.perf_counter()
        record, maps = _evaluate_pair(encoder, models, pixels_of, query, hit, explanation, config.seed + number)
        record = {
            "config_key": key,
            "pair_id": pair_id,
            "number": number,
            "query": {"tile": pixels_of.name(query), "label": tiles.tile_labels[query], "group": str(tiles.tile_groups[query])},
            "hit": {"tile": pixels_of.name(hit), "label": tiles.tile_labels[hit], "group": str(tiles.tile_groups[hit])},
            **record,
            "seconds": time.perf_counter() - pair_started,
        }
        computed_seconds.append(record["seconds"])
        np.savez_compressed(
            maps_dir / f"{number}.npz",
            query=pixels_of(query),
            hit=pixels_of(hit),
            **{name.replace("/", "__"): value.astype(np.float16) for name, value in maps.items()},
        )
        with journal.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        records.append(record)
    # Resumed pairs hold the variants of the run that computed them: a variant the probe keeps
    # now but that they lack (the library changed in between) is left out, and said so.
    missing = [v.name for v in models.variants if any(v.name not in r["runtime_s"] for r in records)]
    skipped |= {name: "missing from resumed pairs computed before it was probed in; rerun with --no-resume" for name in missing}
    models = replace(models, variants=[v for v in models.variants if v.name not in missing])
    names = [variant.name for variant in models.variants]
    return {
        "retrieval": retrieval,
        "settings": {
            "methods": list(explanation.methods),
            "variants": [
                {"name": v.name, "method": v.method, "layer": v.layer, "module": layer_names[v.layer], "target": v.target,
                 "grid": list(models.grids[v.layer] if v.layer in models.grids else models.grids[LAST]),
                 "random_map": random_map_name(v.layer)}
                for v in models.variants
            ],
            "skipped_variants": skipped,
            "polarities": list(explanation.polarities),
            "sides": list(SIDES),
            "perturbations": list(explanation.perturbations),
            "steps": explanation.steps,
            "road_steps": explanation.road_steps,
            "road_noise": ROAD_NOISE,
            "pairs_requested": explanation.pairs,
            "randomised_modules": cascade_names[0] if cascade_names else [],
            "randomised_cascade": cascade_names,
            "reference_maps": sorted({*explanation.reference_maps, *(random_map_name(layer) for layer in models.grids)}),
            "random_grids": {random_map_name(layer): list(grid) for layer, grid in models.grids.items()},
            "smoothgrad_samples": explanation.smoothgrad_samples,
            "curve_scorer": curve_scorer,
            "forward_batch": explanation.forward_batch,
            "sanity_threshold": SANITY_THRESHOLD,
            "bootstrap_resamples": explanation.resamples,
        },
        "summary": summarise(records, names, {v.name: random_map_name(v.layer) for v in models.variants}, explanation),
        "cost": {
            "seconds_total": time.perf_counter() - started,
            "pairs_computed": len(computed_seconds),
            "seconds_per_pair_median": float(np.median(computed_seconds)) if computed_seconds else None,
        },
        "pairs": records,
        "maps_dir": str(maps_dir.relative_to(config.out)),
    }
