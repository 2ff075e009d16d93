"""``histoxplain explain``'s target and correspondence flags, and how the matched regions are printed.

``--target cosine|projection`` chooses what the maps explain (``histoxplain_model.saliency.targets``);
``--correspondences N`` asks for the N best-matched region pairs of each hit
(``histoxplain_model.saliency.correspondences``), printed as text (or ``--json``) and drawn as
numbered outlines in the report.
"""

from __future__ import annotations

import argparse
import json

from histoxplain_model.limits import MAX_CORRESPONDENCES
from histoxplain_model.vocabulary import DEFAULT_TARGET, TARGETS
from histoxplain_service.domain.types import ExplainedSearch

__all__ = ["add_correspondence_arguments", "correspondences_json", "print_correspondences"]


def add_correspondence_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", choices=TARGETS, default=DEFAULT_TARGET,
                        help="what the maps explain: the cosine similarity (default) or the projection e . r_hat "
                             "of the explained image's embedding on the other's direction (additive over regions; "
                             "on the query side it ranks the hits as the cosine does)")
    parser.add_argument("--correspondences", type=int, default=0, metavar="N",
                        help=f"also find the N best-matched region pairs (query cell <-> hit cell) of each hit, "
                             f"1 to {MAX_CORRESPONDENCES} (default 0: none); mean-pooled encoders only")
    parser.add_argument("--json", action="store_true", help="print the matched regions as JSON")


def correspondences_json(search: ExplainedSearch) -> list[dict]:
    """One entry per hit: its rank, cosine and matched pairs (boxes as x, y, width, height in
    pixels of the query and of the hit's tile)."""
    return [
        {
            "rank": rank,
            "similarity": round(float(hit.similarity), 6),
            "correspondences": [
                {"rank": pair.rank, "query_box": list(pair.query_box), "hit_box": list(pair.reference_box),
                 "share": round(pair.share, 6)}
                for pair in hit.correspondences
            ],
        }
        for rank, hit in enumerate(search.hits, start=1)
    ]


def print_correspondences(search: ExplainedSearch, *, as_json: bool) -> None:
    """Print the matched regions of every hit (nothing when none were asked)."""
    rows = correspondences_json(search)
    if not any(row["correspondences"] for row in rows):
        return
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print(f"hit {row['rank']}: cosine {row['similarity']:.4f}")
        for pair in row["correspondences"]:
            query, hit = (", ".join(str(value) for value in box) for box in (pair["query_box"], pair["hit_box"]))
            print(f"  {pair['rank']:2d}. query ({query}) <-> hit ({hit})  share {pair['share']:+.4f}")
