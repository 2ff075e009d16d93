"""The evaluation's statistics against known values: Wilcoxon (scipy and a hand-worked table),
Holm on a textbook example, rank-biserial by hand, the cluster bootstrap's coverage in
simulation, and the verdict read off an interval."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from histoxplain_service.evaluation.statistics import (
    cluster_bootstrap_interval,
    compare_paired,
    holm,
    rank_biserial,
    verdict,
    wilcoxon_p,
)


def test_wilcoxon_exact_against_the_table() -> None:
    # n = 8, every difference positive: W- = 0, the exact two-sided p is 2 / 2^8 = 0.0078125
    # (the smallest entry of the signed-rank table for n = 8).
    assert wilcoxon_p([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]) == pytest.approx(2 / 2**8)
    # W- = 1 (only rank 1 negative): P(W <= 1) = 2 / 256 per tail -> p = 4 / 256.
    assert wilcoxon_p([-0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]) == pytest.approx(4 / 2**8)


def test_wilcoxon_matches_scipy_and_is_none_without_differences() -> None:
    differences = np.random.default_rng(1).normal(0.1, 1.0, 60)
    assert wilcoxon_p(differences) == pytest.approx(stats.wilcoxon(differences).pvalue)
    assert wilcoxon_p([0.0, 0.0]) is None


def test_holm_on_a_known_example() -> None:
    # Holm (1979) step-down: sorted p 0.01, 0.02, 0.03, 0.04 -> 0.04, 0.06, 0.06, 0.06.
    assert holm([0.04, 0.01, 0.03, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, None, 0.9]) == [pytest.approx(1.0), None, pytest.approx(1.0)]


def test_rank_biserial_by_hand() -> None:
    # |d| ranks 1..4; negatives have ranks 1 and 3: W+ = 6, W- = 4 -> (6 - 4) / 10.
    assert rank_biserial([-0.1, 0.2, -0.3, 0.4]) == pytest.approx(0.2)
    assert rank_biserial([0.1, 0.2, 0.0]) == pytest.approx(1.0)
    assert rank_biserial([0.0]) is None


@pytest.mark.parametrize(
    ("low", "high", "lower_is_better", "expected"),
    [
        (-0.3, -0.1, True, "better than random"),
        (-0.3, -0.1, False, "worse than random"),
        (0.1, 0.3, True, "worse than random"),
        (0.1, 0.3, False, "better than random"),
        (-0.1, 0.1, True, "no different"),
        (0.0, 0.2, False, "no different"),
    ],
)
def test_verdict_is_read_off_the_interval(low: float, high: float, lower_is_better: bool, expected: str) -> None:
    assert verdict(low, high, lower_is_better, clusters=5) == expected


def test_one_cluster_is_never_evidence() -> None:
    assert verdict(0.1, 0.2, False, clusters=1) == "no different"


def test_cluster_bootstrap_covers_the_mean_in_simulation() -> None:
    # 12 clusters of 5 pairs with a shared cluster effect (intra-class correlation 0.5): the
    # cluster bootstrap must cover the true mean about 95 % of the time; a pair bootstrap that
    # ignores the clusters would be too narrow (checked below).
    rng = np.random.default_rng(0)
    covered, naive_covered, runs = 0, 0, 300
    clusters = np.repeat(np.arange(12), 5)
    for run in range(runs):
        values = 0.2 + rng.normal(0, 1, 12)[clusters] + rng.normal(0, 1, clusters.size)
        low, high = cluster_bootstrap_interval(values, clusters, resamples=1000, seed=run)
        covered += low <= 0.2 <= high
        low, high = cluster_bootstrap_interval(values, np.arange(clusters.size), resamples=1000, seed=run)
        naive_covered += low <= 0.2 <= high
    assert 0.88 <= covered / runs <= 0.99
    assert naive_covered / runs < 0.85


def test_compare_paired_reports_wins_and_clusters() -> None:
    method, random = np.array([0.1, 0.2, 0.15, 0.12]), np.array([0.3, 0.35, 0.4, 0.2])
    compared = compare_paired(method, random, ["a", "a", "b", "c"], lower_is_better=True, resamples=500)
    assert compared.clusters == 3 and compared.pairs == 4 and compared.wins == 1.0
    assert compared.mean_difference == pytest.approx(float(np.mean(method - random)))
    assert compared.verdict == "better than random"
    assert compared.rank_biserial == pytest.approx(-1.0)
