"""The Annoy file `index.ann`: built straight into the file with a fixed seed, and loaded read-only
by mmap after a size check that catches a manifest whose metric or dimension does not fit it.
`AnnoyBackend` serves it through the bundle's index interface (`cbir.bundle.ann.AnnIndex`).

A filtered search (`allowed`: the items a metadata filter allows) cannot happen inside Annoy: when the
allowed items are fewer than the candidates Annoy would inspect to find enough of them (search_k
raised by 1 / their share of the items), they are searched exactly from the bundle's stored vectors
(`cbir.bundle.exact`), which is then faster and exact; otherwise Annoy is asked for proportionally
more neighbours (and candidates), the allowed ones kept, twice as many again while too few are left."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from annoy import AnnoyIndex

from cbir.bundle.ann import Hits
from cbir.bundle.exact import nearest_in
from cbir.bundle.layout import REBUILD
from cbir.bundle.subset import ItemSubset
from cbir.errors import BundleError

# Annoy's seed: builds of the same vectors with the same number of threads give the same trees.
ANNOY_SEED = 20261124
_INT32_MAX = 2**31 - 1
# Annoy cannot leave items out of a search. Up to this many hidden (deleted) items, a search asks for
# n + hidden neighbours at once; beyond it, 2n first and twice as many again while too few are left.
_MAX_OVERFETCH = 4096


def write_annoy(path: Path, vectors: np.ndarray, metric: str, trees: int) -> None:
    """Build an index of `vectors` (row i = Annoy id i) into the file `path`."""
    index = AnnoyIndex(vectors.shape[1], metric)
    index.set_seed(ANNOY_SEED)
    # Build straight into the file: the index never needs to fit in memory twice.
    if not index.on_disk_build(str(path)):
        raise OSError(f"Annoy cannot build into {path}")
    for i, row in enumerate(vectors):
        index.add_item(i, row)
    index.build(trees, n_jobs=-1)
    index.unload()


def _node_bytes(metric: str, dimension: int) -> int:
    # annoylib.h: angular nodes are {int32 n_descendants, int32 children[2], float v[f]};
    # euclidean and manhattan nodes add a float offset `a`.
    return (12 if metric == "angular" else 16) + 4 * dimension


def load_annoy(path: Path, metric: str, dimension: int, *, prefault: bool) -> AnnoyIndex:
    """The index at `path`, mmapped; BundleError when its size cannot be an index of this metric and
    dimension (Annoy itself would load it and answer nonsense)."""
    node = _node_bytes(metric, dimension)
    size = path.stat().st_size
    if size == 0 or size % node:
        raise BundleError(
            f"{path} ({size} bytes) is not an Annoy {metric} index of dimension "
            f"{dimension} (its size must be a multiple of {node} bytes): the manifest's "
            f"metric or dimension does not match the file; {REBUILD}"
        )
    index = AnnoyIndex(dimension, metric)
    try:
        index.load(str(path), prefault=prefault)
    except OSError as error:
        raise BundleError(f"Annoy cannot load {path}: {error}; {REBUILD}") from error
    return index


class AnnoyBackend:
    """An mmapped Annoy index behind the bundle's index interface (`cbir.bundle.ann.AnnIndex`).

    effort = Annoy's search_k, the candidates it inspects; 0 = the bundle's default, which is at
    least trees * n. Annoy queries release the GIL and may run concurrently on the read-only index.
    """

    index_type = "annoy"

    def __init__(self, index: AnnoyIndex, trees: int, default_search_k: int, *, metric: str,
                 reference: Callable[[np.ndarray], np.ndarray]):
        self.annoy = index  # the AnnoyIndex itself, for tools that measure Annoy alone
        self._metric = metric
        self._reference = reference  # item numbers -> their index vectors (the bundle's features, projected)
        self._trees = trees
        self._default = default_search_k
        self._count = index.get_n_items()
        # Annoy may find more roots than trees were asked for in tiny indexes; a search that
        # inspects roots * items candidates has visited every leaf of every tree.
        self._exhaustive = min(max(trees, index.get_n_trees()) * self._count, _INT32_MAX)

    @property
    def count(self) -> int:
        return self._count

    def effort(self, n: int, requested: int) -> int:
        """search_k: the bundle default (at least trees * n) for 0; everything when n >= items."""
        if n >= self._count:
            return self._exhaustive  # asked for every item: make sure Annoy visits them all
        if requested == 0:
            requested = max(self._default, self._trees * n)
        return int(min(requested, self._exhaustive))

    def search(self, vector: np.ndarray, n: int, effort: int = 0, hidden: frozenset[int] = frozenset(),
               allowed: ItemSubset | None = None) -> Hits:
        if allowed is not None:
            return self._among(np.asarray(vector, dtype=np.float32), n, effort, allowed)
        return self._nearest(
            lambda m, sk: self.annoy.get_nns_by_vector(vector, m, search_k=sk, include_distances=True),
            n, effort, hidden)

    def search_by_item(self, item: int, n: int, effort: int = 0, hidden: frozenset[int] = frozenset(),
                       exclude_self: bool = False, allowed: ItemSubset | None = None) -> Hits:
        if allowed is not None:
            return self._among(self.item_vector(item), n, effort, allowed, drop=item if exclude_self else None)
        if exclude_self:
            hidden = hidden | {item}
        return self._nearest(
            lambda m, sk: self.annoy.get_nns_by_item(item, m, search_k=sk, include_distances=True),
            n, effort, hidden)

    def _nearest(self, fetch, n: int, effort: int, hidden: frozenset[int]) -> Hits:
        """The n nearest (ids, distances) from `fetch(m, search_k)`, without the `hidden` ids: asks for
        more neighbours than n (doubling while too few are left) since Annoy cannot skip them itself."""
        total = self._count
        if not hidden:
            m = min(n, total)
        elif len(hidden) <= _MAX_OVERFETCH:
            m = min(n + len(hidden), total)
        else:
            m = min(2 * n, total)
        while True:
            ids, distances = fetch(m, self.effort(m, effort))
            if hidden:
                kept = [(i, d) for i, d in zip(ids, distances) if i not in hidden]
                ids, distances = [i for i, _ in kept], [d for _, d in kept]
            if len(ids) >= n or m >= total:
                return ids[:n], distances[:n]
            m = min(2 * m, total)

    def _among(self, vector: np.ndarray, n: int, effort: int, allowed: ItemSubset, drop: int | None = None) -> Hits:
        """The n nearest of the `allowed` items (which leave the hidden ones out already), without `drop`."""
        wanted = n + (drop is not None and bool(allowed.mask[drop]))
        fraction = allowed.fraction
        if not len(allowed):
            return [], []
        search_k = min(self._exhaustive, math.ceil(self.effort(wanted, effort) / fraction))
        ids: list[int] = []
        if len(allowed) > search_k and wanted < len(allowed):
            m = min(self._count, math.ceil(2 * wanted / fraction))
            while m < self._count:
                search_k = max(search_k, min(self._exhaustive, self._trees * m))
                found, distances = self.annoy.get_nns_by_vector(vector, m, search_k=search_k, include_distances=True)
                keep = allowed.allows(found) if found else np.zeros(0, dtype=bool)
                if keep.sum() >= wanted:
                    ids = [i for i, k in zip(found, keep) if k]
                    distances = [d for d, k in zip(distances, keep) if k]
                    break
                m, search_k = 2 * m, min(self._exhaustive, 2 * search_k)
        if len(ids) < wanted:  # few allowed items (reading them is cheaper), or Annoy could not find enough
            ids, distances = nearest_in(vector, allowed, self._reference, self._metric, wanted)
        if drop is not None:
            kept = [(i, d) for i, d in zip(ids, distances) if i != drop]
            ids, distances = [i for i, _ in kept], [d for _, d in kept]
        return ids[:n], distances[:n]

    def item_vector(self, item: int) -> np.ndarray:
        return np.asarray(self.annoy.get_item_vector(item), dtype=np.float32)

    def holds(self, item: int, expected: np.ndarray) -> bool:
        return bool(np.allclose(self.item_vector(item), expected, rtol=1e-4, atol=1e-5))

    def close(self) -> None:
        self.annoy.unload()
