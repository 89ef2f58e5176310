"""The one interface every index backend of a bundle offers (`AnnIndex`), whatever is behind it:
Annoy's trees (`cbir.bundle.annoy_index`) or a faiss index (`cbir.bundle.faiss_index`: HNSW,
HNSW over 8-bit scalar-quantised vectors, IVF-PQ with an exact re-rank). The backend is chosen at
build time (`write_bundle(index_type=...)`), recorded in the manifest (`index_type`), and opened by
`open_bundle`, which puts it in `Bundle.index`.

Conventions every backend keeps, so that the indexer never needs to know which one it serves:

- vectors given to `search` are index vectors (after the bundle's PCA, if any), float32;
- distances are Annoy's: for angular, sqrt(2 - 2 cos) of the L2-normalised vectors; for
  euclidean, the L2 distance (not squared); for manhattan (Annoy only), the L1 distance. So
  `services.indexer.index.score()` turns any backend's distance into the same similarity;
- `effort` is a request's `search_k`: 0 = the bundle's default (the manifest's `default_search_k`),
  otherwise Annoy's candidate count, HNSW's efSearch or IVF's nprobe. A backend reads it per call:
  concurrent queries with different efforts never share a setting;
- `hidden` item ids never come back, and a search still returns n hits when the index has n
  others (Annoy asks for more neighbours; faiss leaves them out inside the search);
- with `allowed` (`cbir.bundle.subset.ItemSubset`: the items a metadata filter allows, less the
  hidden ones), only those items come back, n of them when there are n: faiss searches within them
  (an IDSelectorBitmap), Annoy asks for more neighbours; both search the allowed items exactly, from
  the stored vectors, when they are fewer than the vectors the ANN search would compare;
- queries run concurrently from many threads on one opened index, and release the GIL.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from cbir.bundle.layout import FAISS_INDEX_TYPES, FAISS_METRICS, INDEX_TYPES, MILVUS_METRICS
from cbir.bundle.subset import ItemSubset

Hits = tuple[list[int], list[float]]  # (item numbers, distances), best first


class AnnIndex(Protocol):
    """An opened, read-only nearest-neighbour index over items 0..count-1 (item i = row i of the
    bundle's `features.npy` = Annoy id i in the item table)."""

    index_type: str  # "annoy", "hnsw", "hnsw-sq8" or "ivfpq"

    @property
    def count(self) -> int:
        """The items the index holds."""
        ...

    def effort(self, n: int, requested: int) -> int:
        """The effort a search for n neighbours spends when `requested` (>= 0; 0 = the bundle's default)
        is asked: what the search really uses (never less than it needs to return n)."""
        ...

    def search(self, vector: np.ndarray, n: int, effort: int = 0, hidden: frozenset[int] = frozenset(),
               allowed: ItemSubset | None = None) -> Hits:
        """The n items nearest to the index vector `vector`, best first, none of them in `hidden`, all of them
        in `allowed` when given (fewer only when the index holds fewer such items)."""
        ...

    def search_by_item(self, item: int, n: int, effort: int = 0, hidden: frozenset[int] = frozenset(),
                       exclude_self: bool = False, allowed: ItemSubset | None = None) -> Hits:
        """The n items nearest to item `item` (itself first at distance 0, unless `exclude_self` or not `allowed`)."""
        ...

    def item_vector(self, item: int) -> np.ndarray | None:
        """The vector the index stores for `item` (L2-normalised for a faiss angular index,
        approximate for a quantised one), or None where the index cannot give it back (IVF-PQ)."""
        ...

    def holds(self, item: int, expected: np.ndarray) -> bool:
        """Whether the index stores item `item` as the index vector `expected` (within its
        quantisation): what `open_bundle` checks so that item i of the index is row i of the features."""
        ...

    def close(self) -> None:
        """Release the index (unmap its file). No search may be running or start afterwards."""
        ...


# `auto`, the build's default: Annoy below a million items, IVF-PQ from there (BENCHMARKS.md, "Index backends at
# 1M and 10M"): at 1M IVF-PQ answers in 0.4x Annoy's time with a 31x smaller index file, and at 10M Annoy's
# index (24 GB, all of it needed in RAM) cannot stay within 8 GiB; below, Annoy's recall on real GeM vectors is
# the higher one and its latency a few ms. Metrics faiss lacks (manhattan) stay with Annoy.
AUTO = "auto"
AUTO_IVFPQ_ITEMS = 1_000_000


def resolve_index_type(index_type: str, item_count: int, metric: str) -> str:
    """The index type a build uses: `index_type` itself, or for "auto" annoy or ivfpq by the collection's size."""
    if index_type != AUTO:
        return index_type
    return "ivfpq" if item_count >= AUTO_IVFPQ_ITEMS and metric in FAISS_METRICS else "annoy"


def index_choice_problem(index_type: str, metric: str) -> str:
    """Why this index type cannot serve this metric, in words ("" when it can)."""
    if index_type == AUTO:
        return ""
    if index_type not in INDEX_TYPES:
        return f"index type {index_type!r} is not one of {', '.join(INDEX_TYPES)}"
    if index_type == "milvus" and metric not in MILVUS_METRICS:
        return (
            f"the {metric} metric is only available with the annoy index: a milvus index compares "
            f"vectors by {' or '.join(MILVUS_METRICS)} distance. Build with --index annoy, or choose --metric angular"
        )
    if index_type in FAISS_INDEX_TYPES and metric not in FAISS_METRICS:
        return (
            f"the {metric} metric is only available with the annoy index: faiss indexes ({index_type}) compare "
            f"vectors by {' or '.join(FAISS_METRICS)} distance. Build with --index annoy, or choose --metric angular"
        )
    return ""
