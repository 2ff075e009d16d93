"""One self-contained HTML report (tables, matplotlib curves, heatmap grids) from the JSON files.

``write_report(out)`` renders whatever is in ``out``: ``retrieval.json``, ``explanations.json``
or both, so running the two commands into one folder gives one report. Figures are embedded
as base64 PNG, so the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
import platform
import shlex
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

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


def _esc(value: object) -> str:
    return html.escape(str(value))


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return _esc(value)


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png_tag(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


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


def _curves_figure(summary: dict, side: str, polarity: str, baseline: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["faithfulness"] if (r["side"], r["polarity"], r["baseline"]) == (side, polarity, baseline)]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for row in rows:
        x = np.linspace(0, 1, len(row["mean_deletion_curve"]))
        style = "--" if row["map"] in ("random", "gaussian", "random_pixel") else "-"
        axes[0].plot(x, row["mean_deletion_curve"], style, label=f"{row['map']} ({row['deletion_auc_mean']:.3f})")
        axes[1].plot(x, row["mean_insertion_curve"], style, label=f"{row['map']} ({row['insertion_auc_mean']:.3f})")
    for axis, name in zip(axes, ("deletion (lower AUC = better)", "insertion (higher AUC = better)")):
        axis.set_title(f"{name}\n{side} side, {polarity}, {baseline} baseline", fontsize=9)
        axis.set_xlabel("fraction of pixels changed")
        axis.set_ylabel("score (cosine)" if polarity == "similar" else "score (-cosine)")
        axis.legend(fontsize=7)
    return _png_tag(figure)


def _grid(out: Path, content: dict, method: str, pairs: list[dict], caption: str) -> str:
    from histoxplain_model.overlay import overlay

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(pairs), 4, figsize=(8, 2.2 * len(pairs)), squeeze=False)
    maps_dir = out / content["maps_dir"]
    for row, pair in zip(axes, pairs):
        with np.load(maps_dir / f"{pair['number']}.npz") as stored:
            query, hit = stored["query"], stored["hit"]
            query_map = stored[f"{method}__query__similar"].astype(np.float32)
            hit_map = stored[f"{method}__retrieved__similar"].astype(np.float32)
        curves = pair["curves"]["query"]["similar"][content["settings"]["baselines"][0]][method]
        panels = [
            (query, f"query {pair['query']['label']}"),
            (overlay(query, query_map), f"del {curves['deletion_auc']:.2f} ins {curves['insertion_auc']:.2f}"),
            (hit, f"hit {pair['hit']['label']} cos {pair['score']:.2f}"),
            (overlay(hit, hit_map), "hit explained"),
        ]
        for axis, (image, title) in zip(row, panels):
            axis.imshow(image)
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    return f"<figure>{_png_tag(figure)}<figcaption>{_esc(caption)}</figcaption></figure>"


def _explanations_section(out: Path, content: dict) -> str:
    settings, summary, pairs = content["settings"], content["summary"], content["pairs"]
    parts = [
        f"<p>{len(pairs)} query/hit pairs (seeded sample of query tiles, each with its top-1 match from another "
        f"group). Methods {_esc(', '.join(settings['methods']))}; polarities {_esc(', '.join(settings['polarities']))}; "
        f"both sides (the query explained against the hit, the hit against the query).</p>",
        "<p><b>Deletion</b>: pixels are replaced by the baseline most-relevant-first and the explained score "
        "(cosine similarity for <i>similar</i>, its negation for <i>dissimilar</i>) is recorded; a faithful map "
        f"makes it fall fast, so <b>lower deletion AUC is better</b>. <b>Insertion</b> starts from the baseline "
        "and restores pixels most-relevant-first; <b>higher insertion AUC is better</b>. "
        f"{settings['steps']} steps per curve; AUC by the trapezoid rule over the fraction of pixels. Baseline "
        "<i>blur</i>: the image blurred with a Gaussian of sigma = 1/10 of the tile side; <i>zero</i>: the "
        "normalisation mean colour. Reference maps: <b>random</b> (uniform noise on the target layer's "
        f"{_esc('x'.join(str(v) for v in settings.get('random_grid', [])))} feature grid, upsampled like GradCAM: "
        "as smooth as a GradCAM map, the chance level), <b>gaussian</b> (centred blob: centre bias) and "
        "<b>random_pixel</b> (independent noise per pixel; deleting scattered pixels destroys texture faster than "
        "any contiguous region, so it is not a fair chance level for smooth maps and is shown for reference only). "
        "A method is only informative where it beats random. 'beats random' is the share of "
        "pairs where the method's AUC is better than the (smooth) random map's on the same pair; 'beats "
        "random_pixel' the same against pixel noise, the chance level of pixel-level maps such as SmoothGrad's.</p>",
        f"<p>Deletion/insertion images scored with {_esc(settings.get('curve_scorer', 'torch'))}; SmoothGrad with "
        f"{settings['smoothgrad_samples']} noisy samples.</p>",
    ]
    pixel = any("deletion_beats_random_pixel" in r for r in summary["faithfulness"])
    rows = [
        [r["side"], r["polarity"], r["baseline"], r["map"], f"{r['deletion_auc_mean']:.3f} ± {r['deletion_auc_sd']:.3f}",
         r["deletion_beats_random"], *([r["deletion_beats_random_pixel"]] if pixel else []),
         f"{r['insertion_auc_mean']:.3f} ± {r['insertion_auc_sd']:.3f}", r["insertion_beats_random"],
         *([r["insertion_beats_random_pixel"]] if pixel else [])]
        for r in summary["faithfulness"]
    ]
    header = ["side", "polarity", "baseline", "map", "deletion AUC", "del. beats random", *(["del. beats random_pixel"] if pixel else []),
              "insertion AUC", "ins. beats random", *(["ins. beats random_pixel"] if pixel else [])]
    parts.append(_table(header, rows))
    for side in content["settings"]["sides"]:
        for polarity in settings["polarities"]:
            for baseline in settings["baselines"]:
                parts.append(_curves_figure(summary, side, polarity, baseline))
    cascade = settings.get("randomised_cascade") or [settings["randomised_modules"]]
    parts.append(
        "<h3>Sanity check: cascading model randomisation</h3><p>Adebayo et al. 2018: the query-side <i>similar</i> "
        "map is recomputed after re-initialising the encoder's top blocks, one more block per step, from the top "
        "(each step keeps the previous step's random weights). The Spearman rank correlation with the trained "
        "encoder's map should fall; a method whose mean stays above "
        f"{settings['sanity_threshold']} at the last step does not depend enough on the learned weights (an edge "
        "detector, which ignores the model, stays at ~1 at every step).</p><ul>"
        + "".join(f"<li>step {k}: {_esc(', '.join(names))}</li>" for k, names in enumerate(cascade, 1)) + "</ul>"
    )
    n_steps = len(cascade)
    header = ["method", *[f"step {k} Spearman" for k in range(1, n_steps + 1)], "passes (last step)"]
    rows = []
    for method, values in summary["sanity"].items():
        steps = values.get("steps") or [values]
        rows.append([method, *[f"{s['spearman_mean']:.3f} ± {s['spearman_sd']:.3f}" for s in steps], "yes" if values["passes"] else "NO"])
    parts.append(_table(header, rows))
    parts.append("<h3>Runtime</h3><p>Median seconds per explanation call (one image against one reference), per side.</p>")
    parts.append(_table(["method", *settings["sides"]], [[m, *v.values()] for m, v in summary["runtime_median_s"].items()]))
    parts.append("<h3>Best and worst cases</h3><p>Ranked by insertion AUC minus deletion AUC of the query-side <i>similar</i> map.</p>")
    for method in settings["methods"]:
        baseline = settings["baselines"][0]
        ranked = sorted(pairs, key=lambda p: p["curves"]["query"]["similar"][baseline][method]["insertion_auc"]
                        - p["curves"]["query"]["similar"][baseline][method]["deletion_auc"])
        n = min(2, max(1, len(ranked) // 2))
        parts.append(_grid(out, content, method, ranked[::-1][:n], f"{method}: best {n} pairs"))
        parts.append(_grid(out, content, method, ranked[:n], f"{method}: worst {n} pairs"))
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
            + "<h3>Faithfulness</h3>" + _explanations_section(out, content["results"])
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
