"""Retrieval metrics worked out by hand (precision@k, mAP@k with min(k, R), majority vote)."""

from __future__ import annotations

import numpy as np
import pytest

from histoxplain_service.evaluation.metrics import (
    average_precision_at_k,
    majority_label,
    rank_gallery,
    ranking_metrics,
)


def test_average_precision_by_hand() -> None:
    # ranks: R N R N R ; R = 4 relevant in the gallery
    relevant = [True, False, True, False, True]
    # AP@5 = (1/1 + 2/3 + 3/5) / min(5, 4) = 2.2666.../4
    assert average_precision_at_k(relevant, 4, 5) == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    # AP@3 = (1/1 + 2/3) / min(3, 4) = 0.5555...
    assert average_precision_at_k(relevant, 4, 3) == pytest.approx((1 + 2 / 3) / 3)
    # R < k: a single relevant item found at rank 2 -> (1/2) / min(5, 1) = 0.5
    assert average_precision_at_k([False, True, False], 1, 5) == pytest.approx(0.5)
    assert average_precision_at_k([True, True], 2, 10) == pytest.approx(1.0)
    assert average_precision_at_k([False, False], 0, 2) is None


def test_majority_vote_tie_goes_to_best_ranked_label() -> None:
    assert majority_label(["b", "a", "a", "b"]) == "b"
    assert majority_label(["c", "a", "a"]) == "a"
    assert majority_label([]) is None


def test_rank_gallery_excludes_same_group_and_pads() -> None:
    similarity = np.array([[1.0, 0.9, 0.5, 0.7]])
    ranked = rank_gallery(similarity, np.array([0]), np.array([0, 0, 1, 2]), k=3)
    assert ranked.tolist() == [[3, 2, -1]]


def test_ranking_metrics_hand_computed() -> None:
    # 5 items; item 0 and item 1 share a group (same slide) so they never match each other.
    labels = ["A", "A", "A", "B", "B"]
    groups = ["s1", "s1", "s2", "s3", "s4"]
    similarity = np.array(
        [
            [1.0, 0.99, 0.2, 0.8, 0.1],  # q0 gallery {2,3,4}: 3(B) 2(A) 4(B)
            [0.99, 1.0, 0.9, 0.3, 0.4],  # q1 gallery {2,3,4}: 2(A) 4(B) 3(B)
            [0.2, 0.9, 1.0, 0.5, 0.6],  # q2 gallery {0,1,3,4}: 1(A) 4(B) 3(B) 0(A)
            [0.8, 0.3, 0.5, 1.0, 0.7],  # q3 gallery {0,1,2,4}: 0(A) 4(B) 2(A) 1(A)
            [0.1, 0.4, 0.6, 0.7, 1.0],  # q4 gallery {0,1,2,3}: 3(B) 2(A) 1(A) 0(A)
        ]
    )
    result = ranking_metrics(lambda a, b: similarity[a:b], labels, groups, ks=(1, 3), chunk=2)
    # precision@1: q0 0, q1 1, q2 1, q3 0, q4 1 -> 3/5
    assert result["overall"]["precision@1"] == pytest.approx(3 / 5)
    # precision@3: q0 1/3, q1 1/3, q2 1/3, q3 1/3, q4 1/3
    assert result["overall"]["precision@3"] == pytest.approx(1 / 3)
    # R: q0 1 (item 2), q1 1, q2 2, q3 1, q4 1
    # AP@3: q0 (1/2)/1, q1 1/1, q2 (1/1)/2, q3 (1/2)/1, q4 1/1 -> mean 0.7
    assert result["overall"]["map@3"] == pytest.approx((0.5 + 1 + 0.5 + 0.5 + 1) / 5)
    # accuracy@3 (majority of top 3): q0 B (wrong), q1 B (wrong), q2 B (wrong), q3 A (wrong), q4 A (wrong)
    assert result["overall"]["accuracy@3"] == pytest.approx(0.0)
    assert result["overall"]["accuracy@1"] == pytest.approx(3 / 5)
    assert result["per_class"]["A"]["precision@1"] == pytest.approx(2 / 3)
    assert result["per_class"]["B"]["map@3"] == pytest.approx(0.75)
    assert result["per_class"]["B"]["n_queries"] == 2
    assert result["queries_without_relevant"] == 0


def test_query_without_relevant_items_is_left_out_of_map() -> None:
    labels = ["A", "B", "B"]
    groups = ["1", "2", "3"]
    similarity = np.eye(3)
    result = ranking_metrics(lambda a, b: similarity[a:b], labels, groups, ks=(1,))
    assert result["queries_without_relevant"] == 1
    # q1 and q2: each other's only relevant item at rank 1 or 2 (ties by index)
    # q1 gallery {0,2} equal scores -> 0 first -> AP@1 = 0 ; q2 gallery {0,1} -> 0 first -> 0
    assert result["overall"]["map@1"] == pytest.approx(0.0)
    assert result["per_class"]["A"]["map@1"] is None
