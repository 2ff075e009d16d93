"""The demo's fixed plan: the index, the held-out query tiles and the (method, polarity) runs.

Shared by the in-process run (:mod:`.local`) and the run through a gateway (:mod:`.remote`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import tiffslide

from histoxplain_model.imageio import read_image
from histoxplain_service.app.samples import he_slide_path, ihc_image_path
from histoxplain_service.domain.tiling import plan_tile_boxes

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
    ("he", "simmap", "similar"),
    ("he", "rise", "similar"),
    ("he", "gradcam", "dissimilar"),
    ("ihc", "gradcam", "similar"),
)

#: Matched region pairs shown for the similarity decomposition's run (numbered outlines).
DEMO_CORRESPONDENCES = 5


def demo_correspondences(method: str) -> int:
    """How many region pairs a run asks for: the simmap run shows them, the others none."""
    return DEMO_CORRESPONDENCES if method == "simmap" else 0


@dataclass(frozen=True)
class DemoQuery:
    name: str
    description: str
    image: np.ndarray


def _held_out_he_tile() -> DemoQuery:
    """A tissue-rich 224 px crop of the slide, offset by half a tile from the indexed grid."""
    with tiffslide.TiffSlide(he_slide_path()) as slide:
        width, height = slide.dimensions
        thumbnail = np.asarray(slide.get_thumbnail((512, 512)).convert("RGB"), dtype=np.uint8)
        # The grid of the slide less a half-tile margin, shifted by half a tile; the most
        # tissue-rich crop: the first all-tissue one, else the one with the most tissue.
        best = plan_tile_boxes(
            width - TILE, height - TILE, TILE, TILE, lambda: (thumbnail, thumbnail.shape[1] / width), 1.0,
            origin=(TILE // 2, TILE // 2), fallback="best",
        )[0]
        x, y, _, _ = best.box
        tile = np.asarray(slide.read_region((x, y), 0, (TILE, TILE)).convert("RGB"), dtype=np.uint8)
    return DemoQuery("he", f"H&E skin, held-out crop at ({x}, {y}) of {he_slide_path().name}", tile)


def _held_out_ihc_tile() -> DemoQuery:
    image = read_image(ihc_image_path())
    x = y = 150  # between the indexed tiles (stride 96): no indexed tile is this crop
    return DemoQuery("ihc", f"IHC colon, crop at ({x}, {y}) of {ihc_image_path().name}", image[y : y + TILE, x : x + TILE].copy())


def demo_queries() -> dict[str, DemoQuery]:
    return {query.name: query for query in (_held_out_he_tile(), _held_out_ihc_tile())}
