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
