"""`evaluate retrieval`: tile and image embeddings of a dataset, ranked by cosine, scored.

Pipeline: adapter scan -> seeded class-balanced sample of images -> tiling policy -> encoder
embeddings (cached per image under ``OUT/cache/``, so an interrupted run resumes) -> metrics
(:mod:`.metrics`) at two levels:

- tile level: every tile queries all tiles of other groups;
- image level: image A's similarity to image B is the mean over A's tiles of the best cosine
  to any of B's tiles (mean of max), so an image matches when each of its regions has a close
  counterpart; images of the same group are excluded as at tile level.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from histoxplain_model.errors import InvalidRequest
from histoxplain_service.evaluation.datasets import (
    DEFAULT_CRC_PATTERN,
    DatasetImage,
    TilingPolicy,
    get_adapter,
)
from histoxplain_service.evaluation.metrics import DEFAULT_KS, ranking_metrics
from histoxplain_service.evaluation.tiles import tile_image

__all__ = ["EvaluationConfig", "TileSet", "embed_dataset", "image_similarity", "load_dataset", "run_retrieval"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationConfig:
    """Everything a run depends on; recorded in the JSON so a run can be repeated."""

    root: Path
    layout: str
    out: Path
    model: str = "efficientnet-lite0-imagenet"
    weights: Path | None = None
    sample_size: int = 64
    seed: int = 0
    ks: tuple[int, ...] = DEFAULT_KS
    crc_pattern: str = DEFAULT_CRC_PATTERN
    dataset_mpp: float | None = None
    split: str | None = None
    tiling: TilingPolicy = field(default_factory=TilingPolicy)
    batch_size: int = 16
    resume: bool = True
    max_pixels: int = 20000 * 20000

    def to_json(self) -> dict:
        data = asdict(self)
        return {key: str(value) if isinstance(value, Path) else value for key, value in data.items()}


@dataclass(frozen=True)
class TileSet:
    """Embedded tiles of the sampled images; tiles of one image are contiguous.

    embeddings (T, D) float32 L2-normalised; tile_image (T,) index into ``images``;
    boxes (T, 4) int (x, y, w, h) in the resized image's pixels.
    """

    images: list[DatasetImage]
    embeddings: np.ndarray
    tile_image: np.ndarray
    boxes: np.ndarray

    @property
    def tile_labels(self) -> list[str]:
        return [self.images[i].label for i in self.tile_image]

    @property
    def tile_groups(self) -> list[str]:
        return [self.images[i].group for i in self.tile_image]


def load_dataset(config: EvaluationConfig) -> list[DatasetImage]:
    """Scan the dataset and draw a seeded sample of ``sample_size`` images, balanced by class."""
    adapter = get_adapter(config.layout, config.crc_pattern, config.dataset_mpp)
    images = adapter.scan(config.root)
    if config.split is not None:
        splits = sorted({image.split for image in images})
        images = [image for image in images if image.split == config.split]
        if not images:
            raise InvalidRequest(f"no images in split {config.split!r}; the dataset has splits: {', '.join(splits)}")
    if config.sample_size < 0:
        raise InvalidRequest(f"--sample-size must be >= 0 (0 = all images), got {config.sample_size}")
    if config.sample_size and len(images) > config.sample_size:
        rng = np.random.default_rng(config.seed)
        by_label: dict[str, list[DatasetImage]] = {}
        for image in images:
            by_label.setdefault(image.label, []).append(image)
        queues = [[group[i] for i in rng.permutation(len(group))] for _, group in sorted(by_label.items())]
        chosen: list[DatasetImage] = []
        while len(chosen) < config.sample_size:
            for queue in queues:
                if queue and len(chosen) < config.sample_size:
                    chosen.append(queue.pop())
        images = sorted(chosen, key=lambda image: image.image_id)
    labels = {image.label for image in images}
    if len(labels) < 2:
        raise InvalidRequest(f"the sample has {len(labels)} class(es); retrieval needs at least 2 (raise --sample-size)")
    return images


def encoder_key(config: EvaluationConfig) -> str:
    """Cache key of the embeddings: encoder preset, weights file identity and tiling policy."""
    weights = None
    if config.weights is not None:
        stat = Path(config.weights).stat()
        weights = [str(Path(config.weights).resolve()), stat.st_size, stat.st_mtime_ns]
    payload = json.dumps([config.model, weights, asdict(config.tiling), config.seed, config.dataset_mpp], sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:12]


def _cache_path(config: EvaluationConfig, image: DatasetImage) -> Path:
    digest = hashlib.sha1(image.image_id.encode()).hexdigest()[:16]
    return config.out / "cache" / f"embeddings-{encoder_key(config)}" / f"{digest}.npz"


def embed_dataset(config: EvaluationConfig, images: Sequence[DatasetImage], encoder) -> TileSet:
    """Tile and embed every image (cached per image); images without tiles are dropped."""
    embeddings, owners, boxes, kept = [], [], [], []
    reused = 0
    for image in tqdm(images, desc="embedding images", unit="image"):
        cache = _cache_path(config, image)
        if config.resume and cache.is_file():
            with np.load(cache) as stored:
                vectors, image_boxes = stored["embeddings"], stored["boxes"]
            reused += 1
        else:
            tiles = tile_image(image, config.tiling, config.max_pixels)
            if not tiles:
                logger.warning("no tiles in %s; skipped", image.image_id)
                continue
            vectors = np.concatenate(
                [
                    encoder.embed_images([tile.pixels for tile in tiles[i : i + config.batch_size]])
                    for i in range(0, len(tiles), config.batch_size)
                ]
            ).astype(np.float32)
            image_boxes = np.array([tile.box for tile in tiles], dtype=np.int64)
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(".tmp.npz")
            np.savez(partial, embeddings=vectors, boxes=image_boxes)
            partial.replace(cache)
        owners.append(np.full(len(vectors), len(kept)))
        kept.append(image)
        embeddings.append(vectors)
        boxes.append(image_boxes)
    if reused:
        logger.info("reused cached embeddings of %d/%d images", reused, len(images))
    if not kept:
        raise InvalidRequest("no image gave a tile; check --tile-size / --target-mpp against the image sizes")
    return TileSet(kept, np.concatenate(embeddings), np.concatenate(owners), np.concatenate(boxes))


def image_similarity(tiles: TileSet, chunk: int = 1024) -> np.ndarray:
    """(N, N) image similarity: mean over the query image's tiles of the max cosine per image."""
    n_images = len(tiles.images)
    starts = np.flatnonzero(np.r_[True, np.diff(tiles.tile_image) != 0])
    sums = np.zeros((n_images, n_images), dtype=np.float64)
    for first in range(0, len(tiles.embeddings), chunk):
        rows = tiles.embeddings[first : first + chunk] @ tiles.embeddings.T
        best = np.maximum.reduceat(rows, starts, axis=1)  # (chunk, N): best tile of each image
        np.add.at(sums, tiles.tile_image[first : first + chunk], best)
    counts = np.bincount(tiles.tile_image, minlength=n_images)
    return (sums / counts[:, None]).astype(np.float32)


def run_retrieval(config: EvaluationConfig, encoder) -> tuple[dict, TileSet]:
    """Embed and score; returns the ``retrieval.json`` content and the tiles (for explanations)."""
    started = time.perf_counter()
    images = load_dataset(config)
    tiles = embed_dataset(config, images, encoder)
    embed_seconds = time.perf_counter() - started
    tile_metrics = ranking_metrics(
        lambda a, b: tiles.embeddings[a:b] @ tiles.embeddings.T, tiles.tile_labels, tiles.tile_groups, config.ks
    )
    similarity = image_similarity(tiles)
    image_metrics = ranking_metrics(
        lambda a, b: similarity[a:b], [i.label for i in tiles.images], [i.group for i in tiles.images], config.ks
    )
    labels = sorted({image.label for image in tiles.images})
    result = {
        "dataset": {
            "root": str(config.root),
            "layout": config.layout,
            "images": len(tiles.images),
            "tiles": int(len(tiles.embeddings)),
            "groups": len({image.group for image in tiles.images}),
            "labels": {label: sum(image.label == label for image in tiles.images) for label in labels},
            "tiles_per_label": {label: tiles.tile_labels.count(label) for label in labels},
            "splits": sorted({image.split for image in tiles.images}),
            "mpp": tiles.images[0].mpp,
        },
        "definitions": {
            "gallery": "all items of other groups (same image / slide / patient excluded)",
            "precision@k": "relevant items in the top k / k",
            "map@k": "mean over queries with R>0 of (1/min(k,R)) * sum_{r<=k} precision@r * rel_r",
            "accuracy@k": "majority label of the top k equals the query label (tie: best-ranked label)",
            "image_similarity": "mean over the query image's tiles of the max cosine to the other image's tiles",
        },
        "tile_level": tile_metrics,
        "image_level": image_metrics,
        "seconds": {"embedding": round(embed_seconds, 2), "total": round(time.perf_counter() - started, 2)},
    }
    return result, tiles
