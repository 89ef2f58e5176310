"""Retrieval metrics over ranked lists of item ids.

Definitions (the ones the reports use):

- **AP** (average precision) of one query: the mean, over its relevant items, of the precision at
  the rank where each is found; relevant items that are not in the ranked list count as 0, so a
  list truncated at k gives AP@k divided by *all* relevant items (never flattering). mAP is the
  mean over queries.
- **recall@k** of a query: 1 when at least one relevant item is among the first k results, else 0
  (the usual definition for instance retrieval; with one relevant item, as in copy detection,
  it is simply "the original is in the top k").
- **N-S score** (Nistér & Stewénius, UKBench): the number of the query's group (the query
  included) among the first 4 results of a search over the whole collection, where the query
  itself, being indexed, is its own first hit. Here the query is left out of its ranking, so
  N-S = 1 + (group mates among the first 3 of the rest); 4 is perfect for groups of 4.
- **ANN recall@k**: the share of the exact k nearest neighbours (brute force over the same
  vectors, in the index's metric) that the approximate index returns among its k.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def average_precision(ranked: Sequence[str], relevant: Iterable[str]) -> float:
    relevant = set(relevant)
    if not relevant:
        raise ValueError("average precision needs at least one relevant item")
    hits = 0
    total = 0.0
    for rank, item in enumerate(ranked, start=1):
        if item in relevant:
            hits += 1
            total += hits / rank
    return total / len(relevant)


def recall_at(ranked: Sequence[str], relevant: Iterable[str], k: int) -> float:
    relevant = set(relevant)
    return 1.0 if any(item in relevant for item in ranked[:k]) else 0.0


def first_rank(ranked: Sequence[str], relevant: Iterable[str]) -> int | None:
    """1-based rank of the first relevant item, None when none is in the list."""
    relevant = set(relevant)
    for rank, item in enumerate(ranked, start=1):
        if item in relevant:
            return rank
    return None


def ns_score(ranked_rest: Sequence[str], mates: Iterable[str]) -> float:
    """UKBench N-S of one query: 1 (the query itself) + its group mates among the first 3 of the rest."""
    mates = set(mates)
    return 1.0 + sum(1 for item in ranked_rest[:3] if item in mates)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def stderr(values: Iterable[float]) -> float:
    """Standard error of the mean (0 for fewer than two values)."""
    values = np.asarray(list(values), dtype=np.float64)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def exact_neighbours(base: np.ndarray, queries: np.ndarray, metric: str, k: int) -> np.ndarray:
    """(len(queries), k) row indices of the exact k nearest rows of `base`, nearest first.

    angular compares directions (cosine), as Annoy does; euclidean and manhattan the distances.
    Ties are broken by row index (a stable sort), like a brute-force search would.
    """
    base = np.asarray(base, dtype=np.float64)
    queries = np.asarray(queries, dtype=np.float64)
    k = min(k, len(base))
    out = np.empty((len(queries), k), dtype=np.int64)
    if metric == "angular":
        unit = base / np.maximum(np.linalg.norm(base, axis=1, keepdims=True), 1e-30)
    for start in range(0, len(queries), 256):
        chunk = queries[start:start + 256]
        if metric == "angular":
            q = chunk / np.maximum(np.linalg.norm(chunk, axis=1, keepdims=True), 1e-30)
            distance = -(q @ unit.T)
        elif metric == "euclidean":
            distance = (chunk**2).sum(1)[:, None] - 2 * chunk @ base.T + (base**2).sum(1)[None, :]
        elif metric == "manhattan":  # one query at a time: no (queries x items x dimension) array
            distance = np.stack([np.abs(base - row).sum(axis=1) for row in chunk])
        else:
            raise ValueError(f"unknown metric {metric!r}")
        out[start:start + len(chunk)] = np.argsort(distance, axis=1, kind="stable")[:, :k]
    return out


def ann_recall(found: Sequence[Sequence[int]], exact: np.ndarray) -> float:
    """Mean share of each query's exact neighbours (rows of `exact`) that the index found."""
    if len(found) == 0:
        return float("nan")
    k = exact.shape[1]
    return float(np.mean([len(set(f[:k]) & set(e.tolist())) / k for f, e in zip(found, exact)]))


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000.0, q)) if len(seconds) else float("nan")


def group_weighted_mean(values: Sequence[float], groups: Sequence[str]) -> float:
    """The mean over groups of the mean over each group's queries: every group counts once, however many
    images it holds (query-weighted means let the few large groups dominate)."""
    by_group: dict[str, list[float]] = {}
    for value, group in zip(values, groups):
        by_group.setdefault(group, []).append(float(value))
    return float(np.mean([np.mean(v) for v in by_group.values()])) if by_group else float("nan")


def bootstrap_interval(differences: Sequence[float], clusters: Sequence[str], *, weighting: str = "query",
                       resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired per-query differences and its `level` interval from a bootstrap over clusters
    (groups, or the originals of copy detection): queries of one cluster are not independent, so whole
    clusters are resampled. `weighting`: "query" (mean over queries) or "group" (mean of cluster means)."""
    differences = np.asarray(differences, dtype=np.float64)
    if len(differences) == 0:
        return float("nan"), float("nan"), float("nan")
    names = sorted(set(clusters))
    index = {name: i for i, name in enumerate(names)}
    of = np.array([index[c] for c in clusters])
    sums = np.bincount(of, weights=differences, minlength=len(names))
    counts = np.bincount(of, minlength=len(names)).astype(np.float64)

    def estimate(weights: np.ndarray) -> np.ndarray:  # weights: (resamples, clusters) multiplicities
        if weighting == "group":
            return (weights @ (sums / counts)) / weights.sum(axis=1)
        return (weights @ sums) / (weights @ counts)

    point = float(estimate(np.ones((1, len(names))))[0])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(names), size=(resamples, len(names)))
    weights = np.zeros((resamples, len(names)))
    np.add.at(weights, (np.arange(resamples)[:, None], draws), 1.0)
    values = estimate(weights)
    tail = (1 - level) / 2 * 100
    return point, float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))
