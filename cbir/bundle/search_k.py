"""Search effort defaults: the k a search uses when it does not say, and the number of candidates
Annoy inspects by default (`default_search_k`, recorded in each manifest)."""

from __future__ import annotations

# The k a search uses when it does not say (the seed system's k = 50).
DEFAULT_K = 50
# Annoy's own default inspects `n_trees * k` candidates. Over 100k clustered 512-d unit vectors
# with 30 trees (benchmarks/indexer_recall.py, 2 CPU cores) that gives recall@50 0.76 at 0.5 ms;
# 10x more candidates gives 0.97 at 3.8 ms (20x: 0.99 at 7 ms), still far below an embedder's
# time per image, so the bundle default is SEARCH_K_FACTOR = 10 times Annoy's.
SEARCH_K_FACTOR = 10

_INT32_MAX = 2**31 - 1


def default_search_k(trees: int, item_count: int) -> int:
    """Candidates Annoy inspects by default: `trees * DEFAULT_K * SEARCH_K_FACTOR`.

    Capped at `trees * item_count`, which already visits every leaf of every tree (more is
    pointless), and at Annoy's int32 limit.
    """
    return int(max(1, min(trees * DEFAULT_K * SEARCH_K_FACTOR, trees * item_count, _INT32_MAX)))

def search_k_for(manifest, n: int) -> int:
    """The effort of a search for only n candidates (n < DEFAULT_K), where a bundle's default is set for
    DEFAULT_K: Annoy's candidates scale with n by the default's own rule (`trees * n * SEARCH_K_FACTOR`,
    at most the default); 0 (the default) for faiss, whose efforts do not grow with k. What a duplicate
    scan, which asks ~10-20 neighbours of every item, spends per item (BENCHMARKS.md "Duplicate finder")."""
    if manifest.index_type != "annoy":
        return 0
    return int(max(1, min(manifest.trees * n * SEARCH_K_FACTOR, manifest.default_search_k)))


# The faiss index types read a request's search_k as their own effort (0 = the bundle's default,
# recorded as the manifest's default_search_k):
# - hnsw, hnsw-sq8: efSearch, the size of the candidate list the graph search keeps (at least the
#   candidates asked for);
# - ivfpq: nprobe, the inverted lists visited per query (at most nlist).
# Over 100k clustered 512-d unit vectors (benchmarks/index_backends.py, 2 busy CPU cores), recall@50
# at these defaults: hnsw and hnsw-sq8 0.995 (efSearch 128), against Annoy's 0.967 at its default search_k.
# ivfpq's nprobe was set on real GeM vectors (47k global and region vectors of devbench photos): recall@50
# 0.902 at nprobe 16, 0.950 at 32, 0.974 at 64; on 1M clustered vectors its recall does not depend on
# nprobe from 8 on, its re-rank depth decides (faiss_index.IVFPQ_RERANK). BENCHMARKS.md, "1M and 10M".
HNSW_EF_SEARCH = 128
IVF_NPROBE = 32
