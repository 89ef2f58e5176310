"""Exact nearest neighbours among a given set of items, from their stored vectors: what a filtered
search uses when the filter allows few items (reading them all costs less than the candidates an
ANN search would inspect to find enough allowed ones), and where an ANN search cannot find enough.

Distances are in the backends' convention (`cbir.bundle.ann`): angular sqrt(2 - 2 cos), euclidean
L2, manhattan L1.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cbir.bundle.ann import Hits
from cbir.bundle.subset import ItemSubset

# Rows read and compared at a time: bounds the memory of a search over many items (16 MB at 512-d).
_CHUNK = 8192
# A filter's items whose vectors take at most this much are kept in memory after their first exact search:
# the next searches with that filter compare in place instead of gathering rows from the mapped features
# (measured at 100k x 512, a 10 % filter: ~2 ms less per query).
KEEP_BYTES = 32 * 2**20


def nearest_in(query: np.ndarray, allowed: ItemSubset, vectors_of: Callable[[np.ndarray], np.ndarray], metric: str,
               n: int) -> Hits:
    """`nearest_among` the allowed items, their vectors kept with the subset when they are small enough."""
    ids = allowed.ids
    if not len(ids) or len(ids) * vectors_of(ids[:1]).nbytes > KEEP_BYTES:
        return nearest_among(query, ids, vectors_of, metric, n)
    rows = allowed.kept(lambda: _comparable(np.asarray(vectors_of(ids), dtype=np.float32), metric),
                        len(ids) * vectors_of(ids[:1]).nbytes)
    query = _query(query, metric)
    order = _ranking(rows, query, metric, unit=metric == "angular")
    top = np.argpartition(order, n - 1)[:n] if len(ids) > n else np.arange(len(ids))
    distances = _distances(rows[top], query, metric)
    best = np.argsort(distances, kind="stable")
    return [int(i) for i in ids[top][best]], [float(d) for d in distances[best]]


def _comparable(rows: np.ndarray, metric: str) -> np.ndarray:
    """Rows as the ranking reads them fastest: L2-normalised for angular."""
    if metric == "angular":
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(rows, dtype=np.float32)


def _query(query: np.ndarray, metric: str) -> np.ndarray:
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    return query / max(float(np.linalg.norm(query)), 1e-12) if metric == "angular" else query


def nearest_among(query: np.ndarray, ids: np.ndarray, vectors_of: Callable[[np.ndarray], np.ndarray], metric: str,
                  n: int) -> Hits:
    """The n items of `ids` nearest to the index vector `query`, best first; `vectors_of(ids)` gives their
    index vectors. A fast ranking (one matrix product) picks each chunk's n best, whose distances are then
    computed from the differences, exactly (0 for the query's own vector)."""
    query = _query(query, metric)
    ids = np.asarray(ids, dtype=np.int64)
    best_ids, best = np.zeros(0, np.int64), np.zeros(0, np.float32)
    for start in range(0, len(ids), _CHUNK):
        part = ids[start:start + _CHUNK]
        rows = np.asarray(vectors_of(part), dtype=np.float32)
        if len(part) > n:
            top = np.argpartition(_ranking(rows, query, metric), n - 1)[:n]
            part, rows = part[top], rows[top]
        best_ids = np.concatenate([best_ids, part])
        best = np.concatenate([best, _distances(rows, query, metric)])
        order = np.argsort(best, kind="stable")[:n]
        best_ids, best = best_ids[order], best[order]
    return [int(i) for i in best_ids], [float(d) for d in best]


def _ranking(rows: np.ndarray, query: np.ndarray, metric: str, unit: bool = False) -> np.ndarray:
    """Values that order the rows as their distances to `query` do (smaller = nearer), by dot products.

    einsum, not `rows @ query`: a matrix-vector product goes to BLAS, which spreads it over every core; the
    indexer runs many queries at once, and on 2 busy cores that measured 7 ms instead of 0.8 ms (10k x 512).
    `unit`: the rows are L2-normalised already."""
    products = np.einsum("ij,j->i", rows, query)
    if metric == "angular" and unit:
        return -products
    if metric == "angular":
        return -products / np.maximum(np.sqrt(np.einsum("ij,ij->i", rows, rows)), 1e-12)
    if metric == "euclidean":
        return np.einsum("ij,ij->i", rows, rows) - 2.0 * products
    return np.abs(rows - query).sum(axis=1)


def distances(query: np.ndarray, rows: np.ndarray, metric: str) -> np.ndarray:
    """Exact distances, in the backends' convention, from the index vector `query` to each of `rows`."""
    return _distances(np.asarray(rows, dtype=np.float32), _query(query, metric), metric)


def _distances(rows: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    if metric == "manhattan":
        return np.abs(rows - query).sum(axis=1).astype(np.float32)
    if metric == "angular":
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return np.linalg.norm(rows - query, axis=1).astype(np.float32)
