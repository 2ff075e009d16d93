"""The explanation evaluation's comparisons as a Markdown table (docs/EVALUATION.md is written from it).

    .venv/bin/python -m histoxplain_service.evaluation.markdown OUT/explanations.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["comparisons_markdown"]

_MARK = {"better than random": "**better**", "worse than random": "worse", "no different": "n.d."}
_COLUMNS = (("blur", "deletion"), ("blur", "insertion"), ("road", "deletion"), ("road", "insertion"))
_TITLES = {
    ("blur", "deletion"): "deletion (blur) Δ, lower better",
    ("blur", "insertion"): "insertion (blur) Δ, higher better",
    ("road", "deletion"): "ROAD MoRF Δ, lower better",
    ("road", "insertion"): "ROAD LeRF Δ, higher better",
}


def comparisons_markdown(results: dict) -> str:
    """One row per side, polarity and variant; per curve the mean difference from the random map
    with its 95 % cluster-bootstrap interval, the verdict and the share of pairs won."""
    rows: dict[tuple[str, str, str], dict] = {}
    for c in results["summary"]["comparisons"]:
        rows.setdefault((c["side"], c["polarity"], c["map"]), {})[(c["perturbation"], c["curve"])] = c
    columns = [column for column in _COLUMNS if any(column in cells for cells in rows.values())]
    lines = [
        "| side | polarity | map | " + " | ".join(_TITLES[column] for column in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for (side, polarity, name), cells in rows.items():
        values = []
        for column in columns:
            c = cells.get(column)
            values.append(
                "" if c is None else
                f"{c['mean_difference']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] {_MARK[c['verdict']]} ({c['wins']:.0%})"
            )
        lines.append(f"| {side} | {polarity} | {name} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(comparisons_markdown(json.loads(Path(sys.argv[1]).read_text())["results"]), end="")
