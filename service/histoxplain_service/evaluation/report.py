"""One self-contained HTML report (tables, matplotlib curves, heatmap grids) from the JSON files.

``write_report(out)`` renders whatever is in ``out``: ``retrieval.json``, ``explanations.json``
or both, so running the two commands into one folder gives one report. Figures are embedded
as base64 PNG, so the file can be mailed or archived alone.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from histoxplain_service.evaluation.report_explanations import explanations_section
from histoxplain_service.evaluation.report_html import escape as _esc
from histoxplain_service.evaluation.report_html import table as _table

__all__ = ["environment", "write_json", "write_report"]

_PACKAGES = ("histoxplain", "torch", "torchvision", "timm", "numpy", "scipy", "matplotlib", "pillow")


def environment(argv: list[str] | None = None) -> dict:
    """The exact command, time and software versions, recorded in every JSON file."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "command": shlex.join(["histoxplain", *(sys.argv[1:] if argv is None else argv)]),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
    }


def write_json(path: Path, content: dict) -> None:
    """Write atomically (a reader never sees half a file)."""
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(content, indent=2, sort_keys=False))
    partial.replace(path)


def _run_header(content: dict) -> str:
    env = content["environment"]
    encoder = content["encoder"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    return (
        f"<p><b>Command</b> <code>{_esc(env['command'])}</code><br><b>Finished</b> {_esc(env['finished'])}<br>"
        f"<b>Encoder</b> {_esc(encoder['preset'])} ({_esc(encoder.get('architecture'))}, "
        f"{_esc(encoder.get('embedding_dim'))}-d, weights {_esc(encoder.get('weights') or 'bundled')})<br>"
        f"<b>Software</b> {_esc(versions)}</p>"
    )


def _retrieval_section(retrieval: dict, ks: list[int]) -> str:
    data = retrieval["dataset"]
    parts = [
        f"<p><b>Dataset</b> {_esc(data['layout'])} at <code>{_esc(data['root'])}</code>: {data['images']} images, "
        f"{data['tiles']} tiles, {data['groups']} groups, splits {_esc(', '.join(data['splits']))}, "
        f"{_esc(data['mpp'] or 'unknown')} µm/px before resizing. Images per class: "
        + _esc(", ".join(f"{k} {v}" for k, v in data["labels"].items()))
        + ". Tiles per class: "
        + _esc(", ".join(f"{k} {v}" for k, v in data["tiles_per_label"].items()))
        + ".</p>",
        "<p>Every tile (or image) queries all others; matches from its own group (the same image, slide or "
        "patient) are excluded. <b>precision@k</b>: share of the top k with the query's class. "
        "<b>mAP@k</b>: mean average precision, normalised by min(k, number of relevant items). "
        "<b>accuracy@k</b>: the majority class of the top k is the query's class. Chance level for precision "
        "is about the share of the query's class in the gallery.</p>",
    ]
    for level in ("tile_level", "image_level"):
        metrics = retrieval[level]
        rows = [["overall", metrics["n_queries"], *[metrics["overall"].get(f"{m}@{k}") for m in ("precision", "map", "accuracy") for k in ks]]]
        rows += [[label, values["n_queries"], *[values.get(f"{m}@{k}") for m in ("precision", "map", "accuracy") for k in ks]] for label, values in metrics["per_class"].items()]
        header = ["class", "queries", *[f"{m}@{k}" for m in ("P", "mAP", "acc") for k in ks]]
        parts.append(f"<h3>{level.replace('_', ' ')}</h3>" + _table(header, rows))
        if metrics["queries_without_relevant"]:
            parts.append(f"<p>{metrics['queries_without_relevant']} queries had no relevant item outside their group (left out of mAP).</p>")
    return "".join(parts)


_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:.6em 0;font-size:13px}td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}"
    "th{background:#eee}td:first-child{text-align:left}code{background:#f4f4f4;padding:1px 4px}img{max-width:100%}"
)


def write_report(out: Path) -> Path:
    """Render ``out/report.html`` from the JSON files in ``out``; returns its path."""
    sections = []
    retrieval_path, explanations_path = out / "retrieval.json", out / "explanations.json"
    if retrieval_path.is_file():
        content = json.loads(retrieval_path.read_text())
        sections.append("<h2>Retrieval</h2>" + _run_header(content) + _retrieval_section(content["results"], content["config"]["ks"]))
    if explanations_path.is_file():
        content = json.loads(explanations_path.read_text())
        sections.append(
            "<h2>Explanations</h2>" + _run_header(content)
            + "<h3>Retrieval on the same tiles</h3>" + _retrieval_section(content["results"]["retrieval"], content["config"]["ks"])
            + "<h3>Faithfulness</h3>" + explanations_section(out, content["results"])
        )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>histoxplain evaluation</title><style>{_STYLE}</style>"
        f"</head><body><h1>histoxplain evaluation</h1>{''.join(sections)}</body></html>"
    )
    path = out / "report.html"
    partial = path.with_suffix(".tmp")
    partial.write_text(page)
    partial.replace(path)
    return path
