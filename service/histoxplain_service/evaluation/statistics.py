"""Paired comparison of a method with the random map: intervals, tests, effect sizes, verdicts.

Each pair gives one difference d = AUC(method) - AUC(random map of the method's own grid) on
the same image and curve. Pairs whose query tiles come from the same group (the same slide,
photo or source region) are not independent, so the 95 % interval of the mean difference is a
**cluster bootstrap** (Field & Welsh 2007): whole query groups are resampled with replacement
and the mean is taken over every pair of the drawn groups; the percentile interval is read off
``resamples`` draws. The verdict is read off that interval (:func:`verdict`).

The Wilcoxon signed-rank test (two-sided, zeros dropped; exact null distribution up to 50 pairs
without ties, the normal approximation with tie correction above; scipy's implementation)
treats pairs as independent, so its p-value is reported beside the interval, Holm-corrected
over the methods compared on the same side, polarity, perturbation and curve (Holm 1979), and
never used for the verdict. Effect sizes: the median difference and the matched-pairs
rank-biserial correlation r = (W+ - W-) / (W+ + W-) (Kerby 2014), in [-1, 1]: +1 when every
pair's difference is positive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "VERDICTS",
    "PairedComparison",
    "cluster_bootstrap_interval",
    "compare_paired",
    "holm",
    "rank_biserial",
    "verdict",
    "wilcoxon_p",
]

BETTER, NO_DIFFERENT, WORSE = "better than random", "no different", "worse than random"
VERDICTS = (BETTER, NO_DIFFERENT, WORSE)


def cluster_bootstrap_interval(
    values: Sequence[float], clusters: Sequence[object], level: float = 0.95, resamples: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the mean of ``values``, resampling whole ``clusters`` with replacement.

    With one value per cluster this is the ordinary (pair) bootstrap. A single cluster gives a
    zero-width interval at the mean: there is nothing to resample, and :func:`verdict` must not
    read it as evidence, so callers report the number of clusters next to it.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no values to bootstrap")
    labels, cluster_of = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    sums = np.bincount(cluster_of, weights=values, minlength=labels.size)
    counts = np.bincount(cluster_of, minlength=labels.size).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, labels.size, size=(resamples, labels.size))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def wilcoxon_p(differences: Sequence[float]) -> float | None:
    """Two-sided p-value of the Wilcoxon signed-rank test of ``differences`` against 0.

    None when every difference is 0 (or there are none): the test is undefined.
    """
    differences = np.asarray(differences, dtype=np.float64)
    if not np.any(differences != 0):
        return None
    return float(stats.wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; None stays None."""
    present = [(p, i) for i, p in enumerate(p_values) if p is not None]
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    count = len(present)
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (count - rank) * p))
        adjusted[i] = running
    return adjusted


def rank_biserial(differences: Sequence[float]) -> float | None:
    """Matched-pairs rank-biserial correlation (W+ - W-) / (W+ + W-) over the nonzero differences."""
    differences = np.asarray(differences, dtype=np.float64)
    nonzero = differences[differences != 0]
    if nonzero.size == 0:
        return None
    ranks = stats.rankdata(np.abs(nonzero))
    positive, negative = ranks[nonzero > 0].sum(), ranks[nonzero < 0].sum()
    return float((positive - negative) / (positive + negative))


def verdict(low: float, high: float, lower_is_better: bool, clusters: int) -> str:
    """"better than random" / "worse than random" when the interval excludes 0 on that side,
    "no different" when it contains 0 or rests on fewer than 2 clusters."""
    if clusters < 2 or low <= 0.0 <= high:
        return NO_DIFFERENT
    below = high < 0.0
    return BETTER if below == lower_is_better else WORSE


@dataclass(frozen=True)
class PairedComparison:
    """A method against the random map on one curve, over ``pairs`` pairs from ``clusters`` groups."""

    pairs: int
    clusters: int
    mean_difference: float
    interval: tuple[float, float]
    median_difference: float
    rank_biserial: float | None
    wins: float
    p_value: float | None
    verdict: str

    def to_json(self, p_holm: float | None) -> dict:
        return {
            "pairs": self.pairs,
            "clusters": self.clusters,
            "mean_difference": self.mean_difference,
            "ci95": list(self.interval),
            "median_difference": self.median_difference,
            "rank_biserial": self.rank_biserial,
            "wins": self.wins,
            "p_wilcoxon": self.p_value,
            "p_holm": p_holm,
            "verdict": self.verdict,
        }


def compare_paired(
    method: Sequence[float], random: Sequence[float], clusters: Sequence[object], lower_is_better: bool,
    resamples: int = 4000, seed: int = 0,
) -> PairedComparison:
    """Paired differences method - random with their interval, test, effect sizes and verdict.

    ``wins``: the share of pairs where the method is on the faithful side of the random map.
    """
    differences = np.asarray(method, dtype=np.float64) - np.asarray(random, dtype=np.float64)
    low, high = cluster_bootstrap_interval(differences, clusters, resamples=resamples, seed=seed)
    n_clusters = len({str(c) for c in clusters})
    wins = differences < 0 if lower_is_better else differences > 0
    return PairedComparison(
        pairs=int(differences.size),
        clusters=n_clusters,
        mean_difference=float(differences.mean()),
        interval=(low, high),
        median_difference=float(np.median(differences)),
        rank_biserial=rank_biserial(differences),
        wins=float(wins.mean()),
        p_value=wilcoxon_p(differences),
        verdict=verdict(low, high, lower_is_better, n_clusters),
    )
