"""Summary of the explanation evaluation: means per map, paired comparisons with the random map.

For every side, polarity, perturbation and variant, and for each curve (deletion/insertion for
a baseline; MoRF/LeRF for ROAD, stored under the same two keys), the pairs' AUC differences
variant - random (the random map on the variant's own grid) go through
:func:`.statistics.compare_paired` with the query tile's group as the cluster; the Holm
correction runs over the variants of one (side, polarity, perturbation, curve).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from histoxplain_service.evaluation.sanity import SANITY_THRESHOLD
from histoxplain_service.evaluation.statistics import compare_paired, holm

__all__ = ["CURVES", "curve_title", "summarise"]

#: (key in the pair records, lower AUC is more faithful)
CURVES = (("deletion", True), ("insertion", False))


def curve_title(perturbation: str, curve: str) -> str:
    """How reports name a curve: ROAD's deletion is MoRF, its insertion LeRF."""
    if perturbation == "road":
        return "ROAD MoRF" if curve == "deletion" else "ROAD LeRF"
    return f"{curve} ({perturbation})"


def _cluster(record: dict) -> str:
    return str(record["query"].get("group", record["pair_id"]))


def summarise(records: Sequence[dict], names: Sequence[str], random_of: Mapping[str, str], explanation) -> dict:
    """``names``: the variants; ``random_of``: variant -> its random map's name."""
    faithfulness, comparisons = [], []
    clusters = [_cluster(r) for r in records]
    sides = sorted({side for r in records for side in r["curves"]}, key=("query", "retrieved").index)
    for side in sides:
        for polarity in explanation.polarities:
            for perturbation in explanation.perturbations:
                rows = [r["curves"][side][polarity][perturbation] for r in records]
                maps = [name for name in rows[0]] if rows else []
                for name in maps:
                    deletion = np.array([row[name]["deletion_auc"] for row in rows])
                    insertion = np.array([row[name]["insertion_auc"] for row in rows])
                    faithfulness.append({
                        "side": side, "polarity": polarity, "perturbation": perturbation, "map": name, "pairs": len(rows),
                        "deletion_auc_mean": float(deletion.mean()), "deletion_auc_sd": float(deletion.std()),
                        "insertion_auc_mean": float(insertion.mean()), "insertion_auc_sd": float(insertion.std()),
                        "mean_deletion_curve": np.mean([row[name]["deletion"] for row in rows], axis=0).round(5).tolist(),
                        "mean_insertion_curve": np.mean([row[name]["insertion"] for row in rows], axis=0).round(5).tolist(),
                    })
                for curve, lower_is_better in CURVES:
                    family = []
                    for name in names:
                        if not rows or name not in rows[0]:
                            continue
                        random_name = random_of[name]
                        compared = compare_paired(
                            [row[name][f"{curve}_auc"] for row in rows], [row[random_name][f"{curve}_auc"] for row in rows],
                            clusters, lower_is_better, resamples=explanation.resamples, seed=len(comparisons),
                        )
                        family.append((name, random_name, compared))
                    adjusted = holm([c.p_value for _, _, c in family])
                    for (name, random_name, compared), p_holm in zip(family, adjusted):
                        flat = [f"{name}/{side}/{polarity}" in r["flat_maps"] for r in records if "flat_maps" in r]
                        comparisons.append({
                            "side": side, "polarity": polarity, "perturbation": perturbation, "curve": curve,
                            "curve_title": curve_title(perturbation, curve), "lower_is_better": lower_is_better,
                            "map": name, "against": random_name, **compared.to_json(p_holm),
                            "flat_maps": float(np.mean(flat)) if flat else None,
                        })
    sanity, runtime = {}, {}
    sanity_names = sorted({name for r in records for name in r["sanity_spearman"]}, key=list(names).index)
    for name in sanity_names:
        per_step = np.array([r["sanity_spearman"][name] for r in records]).reshape(len(records), -1)  # (pairs, steps)
        steps = [
            {
                "step": step + 1,
                "spearman_mean": float(per_step[:, step].mean()),
                "spearman_sd": float(per_step[:, step].std()),
                "passes": bool(abs(per_step[:, step].mean()) < SANITY_THRESHOLD),
            }
            for step in range(per_step.shape[1])
        ]
        # The verdict is the deepest step's: the map must have changed once the top blocks are random.
        sanity[name] = {**{k: v for k, v in steps[-1].items() if k != "step"}, "steps": steps}
    for name in names:
        runtime[name] = {side: float(np.median([r["runtime_s"][name][side] for r in records])) for side in sides} if records else {}
    return {"faithfulness": faithfulness, "comparisons": comparisons, "sanity": sanity, "runtime_median_s": runtime}
