"""``histoxplain explain --verify``: each map's faithfulness on its own pair, and how it is printed.

With ``--verify`` every explained map is also scored by deletion and insertion (blur baseline,
``VERIFY_STEPS`` steps) against a smooth random map of its own grid on the same image
(``histoxplain_model.faithfulness.verify_explanation``): a map whose deletion AUC is below the
random map's and whose insertion AUC is above it beat chance on this very pair.
"""

from __future__ import annotations

import argparse
import json

from histoxplain_model.limits import VERIFY_FORWARD_PASSES_PER_MAP, VERIFY_STEPS
from histoxplain_model.results import Faithfulness
from histoxplain_service.domain.types import ExplainedSearch

__all__ = ["add_verify_argument", "faithfulness_json", "print_faithfulness"]


def add_verify_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verify", action="store_true",
                        help=f"also measure each map's deletion and insertion AUC ({VERIFY_STEPS} steps, blur baseline) "
                             f"against a random map of the same smoothness on the same pair "
                             f"({VERIFY_FORWARD_PASSES_PER_MAP} forward passes per map)")


def _curves(verified: Faithfulness | None) -> dict | None:
    if verified is None:
        return None
    return {
        "deletion_auc": round(verified.deletion_auc, 6), "random_deletion_auc": round(verified.random_deletion_auc, 6),
        "insertion_auc": round(verified.insertion_auc, 6), "random_insertion_auc": round(verified.random_insertion_auc, 6),
        "deletion_difference": round(verified.deletion_difference, 6),
        "insertion_difference": round(verified.insertion_difference, 6),
        "beats_random": verified.deletion_difference < 0 < verified.insertion_difference,
    }


def faithfulness_json(search: ExplainedSearch) -> list[dict]:
    """One entry per hit: its rank and the verify result of its query and hit maps."""
    return [
        {"rank": rank, "query_map": _curves(hit.query_faithfulness), "hit_map": _curves(hit.hit_faithfulness)}
        for rank, hit in enumerate(search.hits, start=1)
    ]


def print_faithfulness(search: ExplainedSearch, *, as_json: bool) -> None:
    """Print every map's verify result (nothing when verify was not asked)."""
    rows = faithfulness_json(search)
    if not any(row["query_map"] or row["hit_map"] for row in rows):
        return
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        for name in ("query_map", "hit_map"):
            curves = row[name]
            if curves is not None:
                print(
                    f"hit {row['rank']} {name.replace('_', ' ')}: deletion {curves['deletion_auc']:.3f} "
                    f"(random {curves['random_deletion_auc']:.3f}), insertion {curves['insertion_auc']:.3f} "
                    f"(random {curves['random_insertion_auc']:.3f}): "
                    + ("beats random" if curves["beats_random"] else "does not beat random on both curves")
                )
