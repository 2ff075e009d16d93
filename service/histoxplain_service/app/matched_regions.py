"""Matched regions drawn for the report: numbered outlines on the query and on the hit.

Each correspondence (``ExplainedHit.correspondences``) is drawn on both images as a rectangle
of the same colour with the same number, so "this gland matches that gland" reads at a glance.
The drawing is inline SVG over the image file (its ``viewBox`` is the image's pixel grid, so the
boxes, given in each image's own pixels, need no scaling and stay sharp at any zoom).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from histoxplain_model.results import RegionCorrespondence

__all__ = ["OUTLINE_COLOURS", "matched_regions_cell"]

#: One colour per rank (at most ``MAX_CORRESPONDENCES`` = 16), distinguishable on H&E and IHC.
OUTLINE_COLOURS = (
    "#00e5ff", "#ffea00", "#76ff03", "#ff3d00", "#d500f9", "#ffffff", "#2979ff", "#ff9100",
    "#1de9b6", "#f50057", "#c6ff00", "#651fff", "#00b0ff", "#ffc400", "#64dd17", "#aa00ff",
)


def _outlined(image_name: str, size: tuple[int, int], boxes: Sequence[tuple[int, tuple[int, int, int, int]]], alt: str) -> str:
    height, width = size
    stroke = max(1.0, min(height, width) / 100)
    font = max(8.0, min(height, width) / 14)
    shapes = []
    for rank, (x, y, box_width, box_height) in boxes:
        colour = OUTLINE_COLOURS[(rank - 1) % len(OUTLINE_COLOURS)]
        shapes.append(
            f'<g class="match" data-rank="{rank}"><rect x="{x}" y="{y}" width="{box_width}" height="{box_height}" '
            f'fill="none" stroke="{colour}" stroke-width="{stroke:.1f}"/>'
            f'<text x="{x + stroke}" y="{y + font}" fill="{colour}" font-size="{font:.0f}" font-weight="bold" '
            f'stroke="#000" stroke-width="{stroke / 3:.2f}">{rank}</text></g>'
        )
    return (
        f'<svg class="matches" viewBox="0 0 {width} {height}" preserveAspectRatio="xMidYMid meet" '
        f'role="img" aria-label="{html.escape(alt)}"><image href="{html.escape(image_name)}" x="0" y="0" '
        f'width="{width}" height="{height}"/>' + "".join(shapes) + "</svg>"
    )


def matched_regions_cell(
    pairs: Sequence[RegionCorrespondence],
    query_name: str,
    query_size: tuple[int, int],
    hit_name: str,
    hit_size: tuple[int, int],
) -> str:
    """A table cell: the query and the hit with their matched regions outlined and numbered
    alike, and each pair's share of the cosine. ``*_size``: (H, W) of the image files."""
    if not pairs:
        return '<td class="meta">not computed</td>'
    query = _outlined(query_name, query_size, [(pair.rank, pair.query_box) for pair in pairs], "query, matched regions")
    hit = _outlined(hit_name, hit_size, [(pair.rank, pair.reference_box) for pair in pairs], "retrieved tile, matched regions")
    shares = ", ".join(f"{pair.rank}: {pair.share:+.4f}" for pair in pairs)
    return (
        f"<td>{query}{hit}<br><span class=\"meta\">query (left) and retrieved tile (right): same number, same "
        f"region pair; share of the cosine {html.escape(shares)}</span></td>"
    )
