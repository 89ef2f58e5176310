"""Retrieval metrics of `cbir eval` against hand-computed values, and exact search against brute force."""

import numpy as np
import pytest

from apps.eval import metrics


def test_average_precision_counts_relevant_items_missing_from_the_list_as_zero():
    """AP = mean over relevant items of precision at their rank; one not retrieved contributes 0."""
    assert metrics.average_precision(["a", "x", "b"], {"a", "b"}) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert metrics.average_precision(["x", "a"], {"a"}) == pytest.approx(0.5)
    # "c" is relevant but not in the (truncated) list: AP is divided by all 3 relevant items
    assert metrics.average_precision(["a", "b", "x"], {"a", "b", "c"}) == pytest.approx(2 / 3)
    assert metrics.average_precision(["x", "y"], {"a"}) == 0.0
    with pytest.raises(ValueError):
        metrics.average_precision(["a"], set())


def test_recall_at_k_first_rank_and_ukbench_ns_score():
    """recall@k is 1 when any relevant item is in the top k; N-S = 1 (the query) + mates in the top 3 of the rest."""
    ranked = ["x", "m1", "y", "m2", "m3"]
    mates = {"m1", "m2", "m3"}
    assert metrics.recall_at(ranked, mates, 1) == 0.0
    assert metrics.recall_at(ranked, mates, 2) == 1.0
    assert metrics.first_rank(ranked, mates) == 2
    assert metrics.first_rank(ranked, {"zz"}) is None
    assert metrics.ns_score(ranked, mates) == 2.0  # query + m1 (m2 is 4th of the rest)
    assert metrics.ns_score(["m1", "m2", "m3"], mates) == 4.0
    assert metrics.ns_score([], mates) == 1.0


@pytest.mark.parametrize("metric", ["angular", "euclidean", "manhattan"])
def test_exact_neighbours_match_a_brute_force_loop(metric):
    """exact_neighbours ranks rows by the metric's distance (cosine for angular), nearest first."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((40, 6)).astype(np.float32)
    queries = rng.standard_normal((5, 6)).astype(np.float32)
    got = metrics.exact_neighbours(base, queries, metric, 7)
    for q, row in zip(queries, got):
        if metric == "angular":
            d = [-(q @ b) / np.linalg.norm(q) / np.linalg.norm(b) for b in base]
        elif metric == "euclidean":
            d = [np.linalg.norm(q - b) for b in base]
        else:
            d = [np.abs(q - b).sum() for b in base]
        assert row.tolist() == np.argsort(d, kind="stable")[:7].tolist()


def test_ann_recall_is_the_share_of_exact_neighbours_found():
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert metrics.ann_recall([[0, 1, 2, 3], [4, 5, 9, 9]], exact) == pytest.approx((1.0 + 0.5) / 2)
    assert metrics.ann_recall([[3, 2, 1, 0], [7, 6, 5, 4]], exact) == 1.0  # order does not matter
