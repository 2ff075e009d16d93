"""`evaluate explanations`: faithfulness, sanity and runtime of each method on retrieval pairs.

Pairs: a seeded sample of query tiles from the retrieval run, each with its best match from
another group (the top-1 hit a user would ask about). For every pair, method, polarity and
side the map is scored by deletion/insertion (:mod:`.faithfulness`) against the same curves
for a random map and a centred Gaussian map; the query-side ``similar`` map is also
recomputed after re-initialising the encoder's top block(s) (:mod:`.sanity`). Completed pairs
are appended to ``OUT/explanations.pairs.jsonl`` so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.saliency import METHODS, POLARITIES, check_method, get_explainer
from histoxplain_service.evaluation.faithfulness import (
    BASELINES,
    baseline_image,
    centred_gaussian_map,
    deletion_insertion,
    random_map,
)
from histoxplain_service.evaluation.metrics import rank_gallery
from histoxplain_service.evaluation.retrieval import EvaluationConfig, TileSet, run_retrieval
from histoxplain_service.evaluation.sanity import SANITY_THRESHOLD, map_rank_correlation, randomise_top_blocks
from histoxplain_service.evaluation.tiles import tile_image

__all__ = ["ExplanationConfig", "SIDES", "run_explanations"]

SIDES = ("query", "retrieved")
REFERENCE_MAPS = ("random", "gaussian")


@dataclass(frozen=True)
class ExplanationConfig:
    """Options of the explanation evaluation (the dataset and encoder come from EvaluationConfig)."""

    methods: tuple[str, ...] = tuple(METHODS)
    polarities: tuple[str, ...] = POLARITIES
    pairs: int = 8
    steps: int = 16
    baselines: tuple[str, ...] = ("blur",)
    randomised_blocks: int = 1
    forward_batch: int = 9
    smoothgrad_samples: int = 25

    def check(self) -> None:
        for method in self.methods:
            check_method(method)
        for baseline in self.baselines:
            if baseline not in BASELINES:
                raise InvalidRequest(f"unknown baseline {baseline!r}; known: {', '.join(BASELINES)}")
        if self.pairs < 1 or self.steps < 2 or self.randomised_blocks < 1 or self.smoothgrad_samples < 1:
            raise InvalidRequest("--pairs and --smoothgrad-samples must be >= 1, --steps >= 2 and --randomised-blocks >= 1")


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


def _score_fn(model: torch.nn.Module, reference: torch.Tensor, sign: float):
    reference = torch.nn.functional.normalize(reference.reshape(1, -1), dim=1)

    def score(pixels: torch.Tensor) -> torch.Tensor:
        embeddings = torch.nn.functional.normalize(model(pixels), dim=1)
        return sign * (embeddings @ reference.T)[:, 0]

    return score


@torch.no_grad()
def _embed(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(model(pixels), dim=1)


def _evaluate_pair(encoder, randomised, pixels_of, query: int, hit: int, config: ExplanationConfig, seed: int) -> tuple[dict, dict]:
    model = encoder.model
    pixels = {"query": encoder.preprocess([pixels_of(query)]), "retrieved": encoder.preprocess([pixels_of(hit)])}
    embedded = {side: _embed(model, pixels[side]) for side in SIDES}
    references = {"query": embedded["retrieved"], "retrieved": embedded["query"]}
    shape = tuple(pixels["query"].shape[-2:])
    maps: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    runtime: dict[str, dict[str, float]] = {}
    for method in config.methods:
        explainer = get_explainer(method, model, encoder.target_layer, encoder.reshape_transform, n_samples=config.smoothgrad_samples)
        maps[method], runtime[method] = {}, {}
        for side in SIDES:
            for polarity in config.polarities:
                started = time.perf_counter()
                result = explainer.explain(pixels[side], references[side], polarity=polarity)
                runtime[method].setdefault(side, 0.0)
                runtime[method][side] += (time.perf_counter() - started) / len(config.polarities)
                maps[method][f"{side}/{polarity}"] = result.heatmaps[0, 0]
    reference_maps = {"random": random_map(shape, seed), "gaussian": centred_gaussian_map(shape)}
    curves: dict = {}
    for side in SIDES:
        for polarity in config.polarities:
            score = _score_fn(model, references[side], -1.0 if polarity == "dissimilar" else 1.0)
            for baseline_kind in config.baselines:
                baseline = baseline_image(pixels[side], baseline_kind)
                named = {m: maps[m][f"{side}/{polarity}"] for m in config.methods} | reference_maps
                for name, saliency in named.items():
                    c = deletion_insertion(score, pixels[side], saliency, baseline, config.steps, config.forward_batch, seed)
                    curves.setdefault(side, {}).setdefault(polarity, {}).setdefault(baseline_kind, {})[name] = {
                        "deletion_auc": c.deletion_auc,
                        "insertion_auc": c.insertion_auc,
                        "deletion": c.deletion.round(5).tolist(),
                        "insertion": c.insertion.round(5).tolist(),
                    }
    randomised_model, target_layer = randomised
    random_refs = _embed(randomised_model, pixels["retrieved"])
    sanity = {}
    for method in config.methods:
        explainer = get_explainer(method, randomised_model, target_layer, encoder.reshape_transform, n_samples=config.smoothgrad_samples)
        random_map_ = explainer.explain(pixels["query"], random_refs, polarity="similar").heatmaps[0, 0]
        sanity[method] = map_rank_correlation(maps[method]["query/similar"], random_map_)
    record = {
        "score": float((embedded["query"] @ embedded["retrieved"].T).item()),
        "runtime_s": runtime,
        "curves": curves,
        "sanity_spearman": sanity,
    }
    stored_maps = {f"{m}/{key}": value for m in config.methods for key, value in maps[m].items()}
    return record, stored_maps


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
    layer_name = next(name for name, module in encoder.model.named_modules() if module is encoder.target_layer)
    randomised_model, randomised_names = randomise_top_blocks(encoder.model, explanation.randomised_blocks, config.seed)
    randomised = (randomised_model, randomised_model.get_submodule(layer_name) if layer_name else randomised_model)
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
        record, maps = _evaluate_pair(encoder, randomised, pixels_of, query, hit, explanation, config.seed + number)
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
            "randomised_modules": randomised_names,
            "smoothgrad_samples": explanation.smoothgrad_samples,
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
                for name in (*explanation.methods, *REFERENCE_MAPS):
                    rows = [r["curves"][side][polarity][baseline] for r in records]
                    deletion = np.array([row[name]["deletion_auc"] for row in rows])
                    insertion = np.array([row[name]["insertion_auc"] for row in rows])
                    rand_del = np.array([row["random"]["deletion_auc"] for row in rows])
                    rand_ins = np.array([row["random"]["insertion_auc"] for row in rows])
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
                            "mean_deletion_curve": np.mean([row[name]["deletion"] for row in rows], axis=0).round(5).tolist(),
                            "mean_insertion_curve": np.mean([row[name]["insertion"] for row in rows], axis=0).round(5).tolist(),
                        }
                    )
    sanity = {}
    runtime = {}
    for method in explanation.methods:
        rho = np.array([r["sanity_spearman"][method] for r in records])
        sanity[method] = {
            "spearman_mean": float(rho.mean()),
            "spearman_sd": float(rho.std()),
            "passes": bool(abs(rho.mean()) < SANITY_THRESHOLD),
        }
        runtime[method] = {side: float(np.median([r["runtime_s"][method][side] for r in records])) for side in SIDES}
    return {"faithfulness": faithfulness, "sanity": sanity, "runtime_median_s": runtime}
