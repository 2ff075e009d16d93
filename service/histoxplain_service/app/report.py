"""The HTML report of an explained search: query, hits and heatmaps side by side, with scores.

Written for a pathologist: every picture is labelled, the colour scale is explained, and the
report opens from the folder with no server (images are files beside ``index.html``).
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from histoxplain_model.overlay import overlay_png
from histoxplain_model.vocabulary import METHOD_TITLES
from histoxplain_service.app.matched_regions import matched_regions_cell
from histoxplain_service.domain.types import ExplainedSearch


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1300px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; } td, th { padding: 6px 10px; vertical-align: top; text-align: left; }
tr:nth-child(even) { background: #f6f6f6; }
img { width: 200px; height: 200px; object-fit: contain; border: 1px solid #ddd; }
svg.matches { width: 200px; height: 200px; border: 1px solid #ddd; margin-right: 4px; }
.meta { color: #555; font-size: 0.9em; } .score { font-weight: bold; font-size: 1.1em; }
.legend { display: inline-block; width: 200px; height: 12px;
          background: linear-gradient(to right, #00007f, #0000ff, #00ffff, #ffff00, #ff0000, #7f0000); }
"""


def write_report(
    searches: Sequence[ExplainedSearch], out_dir: Path, title: str, notes: Sequence[str] = ()
) -> Path:
    """Write ``out_dir/index.html`` and the PNGs it shows; returns the path of ``index.html``.

    The folder is assembled beside ``out_dir`` and moved into place at the end, so a failure
    leaves no half-written report (an existing report is replaced only by a complete one).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        sections = [_write_section(search, staging, number) for number, search in enumerate(searches)]
        page = _page(title, sections, notes)
        (staging / "index.html").write_text(page, encoding="utf-8")
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / "index.html"


def _write_section(search: ExplainedSearch, folder: Path, number: int) -> str:
    prefix = f"{number:02d}-{search.method}-{search.polarity}"
    query_name = f"{prefix}-query.png"
    Image.fromarray(search.query_image).save(folder / query_name)
    rows = []
    matched = any(explained.correspondences for explained in search.hits)
    for rank, explained in enumerate(search.hits, start=1):
        hit = explained.hit
        hit_name = f"{prefix}-hit{rank:02d}.png"
        Image.fromarray(explained.image).save(folder / hit_name)
        cells = [
            f'<td class="score">{rank}</td>',
            f'<td><span class="score">{explained.similarity:.3f}</span><br>'
            + ("" if hit is None else f'<span class="meta">index score {hit.score:.3f}</span>') + "</td>",
            f'<td><img src="{hit_name}" alt="retrieved tile {rank}"><br>{_hit_caption(hit)}</td>',
        ]
        cells.append(_heatmap_cell(folder, f"{prefix}-hit{rank:02d}-query-map.png", search.query_image,
                                   explained.query_heatmap, "query, regions driving this match"))
        cells.append(_heatmap_cell(folder, f"{prefix}-hit{rank:02d}-hit-map.png", explained.image,
                                   explained.hit_heatmap, "retrieved tile, regions driving this match"))
        if matched:
            cells.append(matched_regions_cell(explained.correspondences, query_name, search.query_image.shape[:2],
                                              hit_name, explained.image.shape[:2]))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    method = METHOD_TITLES.get(search.method, search.method)
    polarity = "similarity" if search.polarity == "similar" else "dissimilarity"
    return (
        f"<h2>{html.escape(method)}: what drives the {polarity}</h2>"
        f'<p><img src="{query_name}" alt="query"><br><b>Query</b></p>'
        "<table><tr><th>Rank</th><th>Cosine similarity</th><th>Retrieved tile</th>"
        "<th>Query heatmap</th><th>Retrieved heatmap</th>"
        + ("<th>Matched regions</th>" if matched else "") + "</tr>" + "".join(rows) + "</table>"
    )


def _heatmap_cell(folder: Path, name: str, image, heatmap, caption: str) -> str:
    if heatmap is None:
        return '<td class="meta">not computed</td>'
    (folder / name).write_bytes(overlay_png(image, heatmap))
    return f'<td><img src="{name}" alt="{html.escape(caption)}"><br><span class="meta">{html.escape(caption)}</span></td>'


def _hit_caption(hit) -> str:
    if hit is None:
        return '<span class="meta">reference image given in the request</span>'
    box = hit.box
    parts = [f"<b>{html.escape(hit.label or 'unlabelled')}</b>", html.escape(Path(hit.source).name)]
    parts.append(f"tile at ({box.x}, {box.y}), {box.w}x{box.h} px, level {hit.level}")
    if hit.mpp:
        parts.append(f"{hit.mpp:.3g} µm/px")
    return '<span class="meta">' + "<br>".join(parts) + "</span>"


def _page(title: str, sections: Sequence[str], notes: Sequence[str]) -> str:
    note_items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        "<p>Heatmap colours: <span class='legend'></span> low &rarr; high relevance. "
        "Each heatmap shows where the encoder's embedding is most sensitive for the cosine "
        "similarity between the query and that retrieved tile; it is an aid to reading the match, "
        "not a diagnosis.</p>"
        f"<ul class='meta'>{note_items}</ul>" + "".join(sections) + "</body></html>"
    )


def _replace_dir(staging: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)
