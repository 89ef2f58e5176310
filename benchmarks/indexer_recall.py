"""Indexer speed and recall on synthetic vectors: build, open, query latency, recall@k vs exact search.

    .venv/bin/python benchmarks/indexer_recall.py --items 100000 --dim 512 --trees 30 --k 50

The vectors are clustered, non-negative and L2-normalised like GeM features (`--data gaussian`
gives isotropic noise instead: the worst case for any tree index, with no structure to find).
Queries are fresh vectors from the same distribution, not indexed ones. Recall@k is the share of
the exact top k (brute-force cosine, or the metric's distance) that the index returns.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from cbir.bundle import DEFAULT_K, open_bundle, write_bundle
from cbir.v1 import common_pb2
from services.indexer.index import SearchIndex


def make_data(kind: str, n: int, d: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    if kind == "gaussian":
        return rng.standard_normal((n, d)).astype(np.float32)
    x = np.abs(centers[rng.integers(0, len(centers), n)] + 0.35 * rng.standard_normal((n, d)))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top_k(metric: str, base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(queries), k), dtype=np.int64)
    if metric == "angular":
        unit = base / np.linalg.norm(base, axis=1, keepdims=True)
    for i, q in enumerate(queries):
        if metric == "angular":
            d = -(unit @ (q / np.linalg.norm(q)))
        elif metric == "euclidean":
            d = ((base - q) ** 2).sum(axis=1)
        else:
            d = np.abs(base - q).sum(axis=1)
        top = np.argpartition(d, k)[:k]
        out[i] = top[np.argsort(d[top])]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--trees", type=int, default=30)
    parser.add_argument("--metric", default="angular", choices=["angular", "euclidean", "manhattan"])
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--pca", type=int, default=0, help="PCA dimension (0 = none)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--data", default="clustered", choices=["clustered", "gaussian"])
    parser.add_argument("--search-k", type=int, nargs="*", default=[], help="also try these search_k values")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((2000, args.dim)) * (rng.random(args.dim) ** 2)  # uneven variance per axis
    base = make_data(args.data, args.items, args.dim, rng, centers)
    queries = make_data(args.data, args.queries, args.dim, rng, centers)
    model = common_pb2.ModelInfo(name="synthetic", feature=args.data, dimension=args.dim, fingerprint="bench")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_bundle(
            f"{tmp}/bench", ids=[f"i{i}" for i in range(args.items)], urls=[""] * args.items, vectors=base,
            model=model, metric=args.metric, trees=args.trees, pca_dimension=args.pca,
        )
        print(f"build: {time.perf_counter() - start:.1f}s ({args.items} x {args.dim}, {args.metric}, {args.trees} trees"
              f"{f', PCA {args.pca}' if args.pca else ''})")
        start = time.perf_counter()
        bundle = open_bundle(f"{tmp}/bench", verify_checksums=True)
        print(f"open with checksums: {time.perf_counter() - start:.2f}s")
        index = SearchIndex(bundle, max_k=max(1000, args.k))
        if args.pca:  # recall against exact search in the space the index searches
            exact = exact_top_k(args.metric, bundle.project(base), bundle.project(queries), args.k)
        else:
            exact = exact_top_k(args.metric, base, queries, args.k)
        default = bundle.manifest.default_search_k
        print(f"default_search_k = {default}; Annoy's own default (trees * k) = {args.trees * args.k}")
        print("query = SearchIndex.query_vector (PCA, ANN, id lookup), one thread, no gRPC")

        def run(search_k: int, label: str) -> None:
            latencies, ann, recalls = [], [], []
            projected = bundle.project(queries)
            effective = index._search_k(args.k, search_k)
            for q, p, truth in zip(queries, projected, exact):
                t = time.perf_counter()
                hits = index.query_vector(q, k=args.k, search_k=search_k)
                latencies.append(time.perf_counter() - t)
                t = time.perf_counter()
                bundle.index.search(p, args.k, effective)
                ann.append(time.perf_counter() - t)
                got = {int(h.item_id[1:]) for h in hits}
                recalls.append(len(got & set(truth.tolist())) / args.k)
            ms, ann_ms = np.array(latencies) * 1e3, np.array(ann) * 1e3
            print(f"{label:>24}: recall@{args.k} {np.mean(recalls):.3f}   query p50 {np.median(ms):.2f} ms "
                  f"p99 {np.percentile(ms, 99):.2f} ms   (Annoy alone p50 {np.median(ann_ms):.2f} ms)")

        run(args.trees * args.k, f"search_k={args.trees * args.k} (Annoy)")
        run(0, f"search_k=0 -> {default}")
        for search_k in args.search_k:
            run(search_k, f"search_k={search_k}")
        index.close()


if __name__ == "__main__":
    main()
