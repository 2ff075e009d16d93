"""The report's explanation section: comparison table, forest plots, mean curves, sanity, examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histoxplain_service.evaluation.report_html import escape, png_tag, table
from histoxplain_service.evaluation.summary import curve_title

__all__ = ["explanations_section", "gain", "signed_interval"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def gain(row: dict) -> float:
    """The mean difference signed so that positive = better than random on any curve."""
    return -row["mean_difference"] if row["lower_is_better"] else row["mean_difference"]


def signed_interval(row: dict) -> tuple[float, float]:
    low, high = row["ci95"]
    return (-high, -low) if row["lower_is_better"] else (low, high)


def _forest(rows: list[dict], title: str) -> str:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 0.28 * len(rows) + 1.2))
    colours = {"better than random": "tab:green", "no different": "tab:gray", "worse than random": "tab:red"}
    for y, row in enumerate(rows):
        low, high = signed_interval(row)
        axis.plot([low, high], [y, y], color=colours[row["verdict"]], linewidth=2)
        axis.plot([gain(row)], [y], "o", color=colours[row["verdict"]])
    axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(rows)), [f"{r['map']} · {r['curve_title']}" for r in rows], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("AUC gain over the random map (positive = better than random), 95 % cluster-bootstrap interval", fontsize=8)
    axis.set_title(title, fontsize=9)
    return png_tag(figure)


def _curves_figure(summary: dict, side: str, polarity: str, perturbation: str) -> str:
    plt = _pyplot()
    rows = [r for r in summary["faithfulness"] if (r["side"], r["polarity"], r["perturbation"]) == (side, polarity, perturbation)]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for row in rows:
        x = np.linspace(0, 1, len(row["mean_deletion_curve"]))
        style = "--" if row["map"].startswith(("random", "gaussian")) else "-"
        axes[0].plot(x, row["mean_deletion_curve"], style, label=f"{row['map']} ({row['deletion_auc_mean']:.3f})")
        axes[1].plot(x, row["mean_insertion_curve"], style, label=f"{row['map']} ({row['insertion_auc_mean']:.3f})")
    for axis, curve, better in zip(axes, ("deletion", "insertion"), ("lower", "higher")):
        axis.set_title(f"{curve_title(perturbation, curve)} ({better} AUC = better)\n{side} side, {polarity}", fontsize=9)
        axis.set_xlabel("fraction of pixels changed")
        axis.set_ylabel("score (cosine)" if polarity == "similar" else "score (-cosine)")
        axis.legend(fontsize=6)
    return png_tag(figure)


def _grid(out: Path, content: dict, name: str, pairs: list[dict], caption: str) -> str:
    from histoxplain_model.overlay import overlay

    plt = _pyplot()
    figure, axes = plt.subplots(len(pairs), 4, figsize=(8, 2.2 * len(pairs)), squeeze=False)
    maps_dir = out / content["maps_dir"]
    perturbation = content["settings"]["perturbations"][0]
    for row, pair in zip(axes, pairs):
        with np.load(maps_dir / f"{pair['number']}.npz") as stored:
            query, hit = stored["query"], stored["hit"]
            query_map = stored[f"{name}__query__similar"].astype(np.float32)
            hit_map = stored[f"{name}__retrieved__similar"].astype(np.float32)
        curves = pair["curves"]["query"]["similar"][perturbation][name]
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
    return f"<figure>{png_tag(figure)}<figcaption>{escape(caption)}</figcaption></figure>"


def _comparison_rows(comparisons: list[dict]) -> list[list[object]]:
    return [
        [c["side"], c["polarity"], c["curve_title"], c["map"], c["against"],
         f"{c['mean_difference']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]", f"{c['median_difference']:+.3f}",
         c["rank_biserial"], c["wins"], c["p_holm"], f"{c['pairs']} / {c['clusters']}", c.get("flat_maps"), c["verdict"]]
        for c in comparisons
    ]


def explanations_section(out: Path, content: dict) -> str:
    settings, summary, pairs = content["settings"], content["summary"], content["pairs"]
    grids = ", ".join(f"{name} {'x'.join(str(v) for v in grid)}" for name, grid in settings["random_grids"].items())
    parts = [
        f"<p>{len(pairs)} query/hit pairs (a seeded sample of query tiles, each with its top-1 match from another "
        f"group). Variants {escape(', '.join(v['name'] for v in settings['variants']))}; polarities "
        f"{escape(', '.join(settings['polarities']))}; both sides (the query explained against the hit, the hit against "
        "the query).</p>",
        "<p><b>Deletion</b> replaces pixels by the baseline most-relevant-first and records the cosine (its negation "
        "for <i>dissimilar</i>): lower AUC is better. <b>Insertion</b> restores pixels into the baseline most-relevant-"
        f"first: higher AUC is better ({settings['steps']} steps). <b>ROAD</b> (Rong et al. 2022) removes pixels and "
        "imputes them from their neighbours (noisy linear imputation, noise "
        f"{settings['road_noise']}), so the perturbation does not reward a map for finding where a blur hurts: "
        f"<b>MoRF</b> removes the most relevant first (lower AUC better), <b>LeRF</b> the least relevant first "
        f"(higher AUC better) ({settings['road_steps']} steps). Each variant is compared pair by pair with the smooth "
        f"random map on its own grid ({escape(grids)}): the chance level.</p>",
        "<p><b>Intervals</b>: 95 % percentile bootstrap of the mean paired difference, resampling query groups "
        f"({settings['bootstrap_resamples']} resamples); <b>verdict</b> read off the interval (excludes 0 on the faithful "
        "side: better than random; on the other: worse; else no different). p: two-sided Wilcoxon signed-rank, Holm-"
        "corrected over the variants of one side, polarity and curve (pairs treated as independent: a guide, not the "
        "verdict). r: matched-pairs rank-biserial correlation (positive = the variant's AUC above random's). wins: "
        "share of pairs on the faithful side of random. empty maps: share of pairs whose map is constant (nothing to show; "
        "its pixels are then ranked by the seeded tie-break alone, i.e. like pixel noise).</p>",
    ]
    if settings.get("skipped_variants"):
        parts.append("<p>Not evaluated: " + escape("; ".join(f"{k} ({v})" for k, v in settings["skipped_variants"].items())) + "</p>")
    header = ["side", "polarity", "curve", "map", "vs", "mean diff [95 % CI]", "median diff", "r", "wins", "p (Holm)",
              "pairs / groups", "empty maps", "verdict"]
    parts.append(table(header, _comparison_rows(summary["comparisons"])))
    for side in settings["sides"]:
        for polarity in settings["polarities"]:
            rows = [c for c in summary["comparisons"] if (c["side"], c["polarity"]) == (side, polarity)]
            if rows:
                parts.append(_forest(rows, f"{side} side, {polarity}"))
    parts.append("<h3>Mean curves</h3>")
    for side in settings["sides"]:
        for polarity in settings["polarities"]:
            for perturbation in settings["perturbations"]:
                parts.append(_curves_figure(summary, side, polarity, perturbation))
    cascade = settings.get("randomised_cascade") or []
    if summary["sanity"]:
        parts.append(
            "<h3>Sanity check: cascading model randomisation</h3><p>Adebayo et al. 2018: the query-side <i>similar</i> "
            "map is recomputed after re-initialising the encoder's top blocks, one more block per step. A method whose "
            f"mean Spearman correlation with the trained map stays above {settings['sanity_threshold']} at the last step "
            "does not depend enough on the learned weights.</p><ul>"
            + "".join(f"<li>step {k}: {escape(', '.join(names))}</li>" for k, names in enumerate(cascade, 1)) + "</ul>"
        )
        rows = [
            [name, *[f"{s['spearman_mean']:.3f} ± {s['spearman_sd']:.3f}" for s in values["steps"]], "yes" if values["passes"] else "NO"]
            for name, values in summary["sanity"].items()
        ]
        parts.append(table(["method", *[f"step {k} Spearman" for k in range(1, len(cascade) + 1)], "passes (last step)"], rows))
    parts.append("<h3>Runtime</h3><p>Median seconds per explanation call (one image against one reference), per side.</p>")
    parts.append(table(["map", *settings["sides"]], [[m, *v.values()] for m, v in summary["runtime_median_s"].items()]))
    parts.append("<h3>Best and worst cases</h3><p>Ranked by insertion minus deletion AUC of the query-side <i>similar</i> map.</p>")
    perturbation = settings["perturbations"][0]
    for variant in settings["variants"]:
        name = variant["name"]
        ranked = sorted(pairs, key=lambda p: p["curves"]["query"]["similar"][perturbation][name]["insertion_auc"]
                        - p["curves"]["query"]["similar"][perturbation][name]["deletion_auc"])
        if ranked and variant["layer"] == "last" and variant["target"] == "cosine":
            n = min(2, max(1, len(ranked) // 2))
            parts.append(_grid(out, content, name, ranked[::-1][:n], f"{name}: best {n} pairs"))
            parts.append(_grid(out, content, name, ranked[:n], f"{name}: worst {n} pairs"))
    return "".join(parts)
