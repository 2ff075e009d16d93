"""Retrieval metrics with leakage control: precision@k, mAP@k, majority-vote accuracy@k.

Definitions (per query q with label y_q and group g_q; the gallery is every item whose group
differs from g_q, so the query itself and everything from its slide / image is excluded):

- ranking: gallery items by descending cosine similarity, ties broken by gallery index;
- rel_r = 1 if the item at rank r has label y_q; R = relevant items in q's gallery;
- precision@k = (sum_{r<=k} rel_r) / k   (k in the denominator even if the gallery is smaller);
- AP@k = (1 / min(k, R)) * sum_{r<=k} precision@r * rel_r   ("min(k, R)" normalisation, so a
  perfect top-k scores 1 even when R > k); queries with R = 0 have no AP and are left out of
  mAP@k (their count is reported as ``queries_without_relevant``);
- majority-vote accuracy@k: the predicted label is the most frequent label among the top k;
  a tie goes to the tied label whose best-ranked item comes first.

Every metric is reported overall (mean over queries) and per class (mean over the queries of
that class).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["DEFAULT_KS", "average_precision_at_k", "majority_label", "rank_gallery", "ranking_metrics"]

DEFAULT_KS = (1, 5, 10)


def average_precision_at_k(relevant: Sequence[bool], n_relevant: int, k: int) -> float | None:
    """AP@k of one ranked list (``relevant[r]`` for ranks 0..); None when ``n_relevant`` is 0."""
    if n_relevant <= 0:
        return None
    hits = 0
    total = 0.0
    for rank, is_relevant in enumerate(relevant[:k], start=1):
        if is_relevant:
            hits += 1
            total += hits / rank
    return total / min(k, n_relevant)


def majority_label(ranked_labels: Sequence[str]) -> str | None:
    """Most frequent label; ties go to the label seen first in rank order."""
    if len(ranked_labels) == 0:
        return None
    counts = Counter(ranked_labels)
    best = max(counts.values())
    return next(label for label in ranked_labels if counts[label] == best)


def rank_gallery(similarity_rows: np.ndarray, query_groups: np.ndarray, gallery_groups: np.ndarray, k: int) -> np.ndarray:
    """Top-k gallery indices per query row, same-group items excluded; -1 pads short galleries.

    ``similarity_rows`` (Q, G) float; groups are integer codes. Returns (Q, k) int64.
    """
    scores = np.array(similarity_rows, dtype=np.float64, copy=True)
    same_group = query_groups[:, None] == gallery_groups[None, :]
    scores[same_group] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    valid = np.take_along_axis(~same_group, order, axis=1)
    ranked = np.where(valid, order, -1)
    if ranked.shape[1] < k:
        ranked = np.pad(ranked, ((0, 0), (0, k - ranked.shape[1])), constant_values=-1)
    return ranked


def ranking_metrics(
    similarity: Callable[[int, int], np.ndarray],
    labels: Sequence[str],
    groups: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
    chunk: int = 512,
) -> dict:
    """Metrics of a self-retrieval (every item queries all others).

    ``similarity(start, stop)`` returns rows start..stop of the (N, N) similarity matrix, so
    large sets never hold the whole matrix. Returns ``{"n_queries", "overall", "per_class",
    "queries_without_relevant"}``; metric keys are ``precision@k``, ``map@k``, ``accuracy@k``.
    """
    labels_array = np.asarray(labels)
    group_names, group_codes = np.unique(np.asarray(groups), return_inverse=True)
    n = len(labels_array)
    k_max = max(ks)
    per_label = Counter(labels_array.tolist())
    per_label_group = Counter(zip(labels_array.tolist(), group_codes.tolist()))
    per_query: list[dict[str, float | None]] = []
    without_relevant = 0
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        ranked = rank_gallery(similarity(start, stop), group_codes[start:stop], group_codes, k_max)
        for offset, row in enumerate(ranked):
            query = start + offset
            label = labels_array[query]
            n_relevant = per_label[label] - per_label_group[(label, group_codes[query])]
            without_relevant += n_relevant == 0
            ranked_labels = [labels_array[index] for index in row if index >= 0]
            relevant = [item == label for item in ranked_labels]
            values: dict[str, float | None] = {}
            for k in ks:
                values[f"precision@{k}"] = sum(relevant[:k]) / k
                values[f"map@{k}"] = average_precision_at_k(relevant, n_relevant, k)
                values[f"accuracy@{k}"] = float(majority_label(ranked_labels[:k]) == label)
            per_query.append(values)
    return {
        "n_queries": n,
        "n_groups": len(group_names),
        "queries_without_relevant": int(without_relevant),
        "overall": _mean_metrics(per_query),
        "per_class": {
            label: {"n_queries": count, **_mean_metrics([per_query[i] for i in np.flatnonzero(labels_array == label)])}
            for label, count in sorted(per_label.items())
        },
    }


def _mean_metrics(per_query: list[dict[str, float | None]]) -> dict[str, float | None]:
    if not per_query:
        return {}
    means: dict[str, float | None] = {}
    for key in per_query[0]:
        values = [query[key] for query in per_query if query[key] is not None]
        means[key] = float(np.mean(values)) if values else None
    return means
