"""Index variants for the evaluation: real bundles (`cbir.bundle.write_bundle`: PCA, Annoy, item
table) in a scratch folder, opened and searched with the indexer's `SearchIndex`, plus the recall
of the index against exact search over the same vectors."""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Iterable, Mapping, Sequence

import numpy as np

from apps.eval import metrics


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    """How the bundle is built: `cbir index build --metric --trees --pca [--pca-whiten]`."""

    metric: str = "angular"
    trees: int = 30
    pca: int = 0
    whiten: bool = False
    verify_top: int = 100  # the indexer's CBIR_INDEXER_VERIFY_TOP (used when the model has local features)
    region_k: int = 10  # the indexer's CBIR_INDEXER_VERIFY_REGION_K

    @property
    def label(self) -> str:
        pca = f", pca {self.pca}{' whitened' if self.whiten else ''}" if self.pca else ""
        return f"{self.metric}, {self.trees} trees{pca}, verify top {self.verify_top}, region k {self.region_k}"


class BuiltIndex:
    """A real bundle written to a scratch folder and opened with the indexer's SearchIndex."""

    def __init__(self, root: pathlib.Path, ids: list[str], vectors: np.ndarray, model_info, spec: IndexSpec,
                 local: Mapping[str, tuple[bytes, ...]] | None = None,
                 regions: Mapping[str, np.ndarray] | None = None):
        """`local`: key -> (an item's local features, then a query's and its mirror's) of the gallery items and
        of the queries, when the model has them: the bundle stores the first, `search` sends the others (as the
        gateway does), with the queries' `regions` (key -> region vectors)."""
        from cbir.bundle import open_bundle, write_bundle
        from services.indexer.index import SearchIndex
        from services.indexer.verification import Verification

        self.spec = spec
        self.root = root
        self.local = local if local and model_info.local_features else None
        self.regions = regions or {}
        stored = {} if self.local is None else dict(
            local_features=[self.local.get(i, (b"",))[0] for i in ids], local_features_kind=model_info.local_features)
        started = time.perf_counter()
        self.version_path = write_bundle(
            root, ids=ids, urls=[f"eval:{i}" for i in ids], vectors=vectors, model=model_info,
            metric=spec.metric, trees=spec.trees, pca_dimension=spec.pca, pca_whiten=spec.whiten, source="cbir eval",
            **stored,
        )
        self.build_seconds = time.perf_counter() - started
        self.bundle = open_bundle(root)  # checks the bundle as the indexer does
        self.index = SearchIndex(self.bundle, max_k=max(1000, len(ids)), verification=Verification(top=spec.verify_top, region_k=spec.region_k))
        self.item_count = len(ids)
        self.last_hits: list = []
        self.row_of = {item_id: row for row, item_id in enumerate(ids)}
        manifest = self.bundle.manifest
        self.index_bytes = manifest.files["index.ann"].bytes
        self.default_search_k = manifest.default_search_k

    def search(self, vectors: np.ndarray, k: int, search_k: int = 0, keys: Sequence[str] | None = None
               ) -> tuple[list[list[str]], list[float]]:
        """Ranked item ids per query vector (through PCA, Annoy and, given the queries' `keys`, geometric
        verification, as the indexer does) and seconds per query; the hits themselves (score, inliers,
        match class) stay in `last_hits`."""
        from cbir.local_features import from_bytes

        ranked, seconds = [], []
        self.last_hits = []
        k = min(k, self.item_count)
        for i, vector in enumerate(vectors):
            blobs = self.local.get(keys[i], ())[1:] if self.local is not None and keys is not None else ()
            started = time.perf_counter()
            local = [from_bytes(blob) for blob in blobs if blob]
            regions = self.regions.get(keys[i], ()) if keys is not None else ()
            hits = self.index.query_vector(vector, k=k, search_k=search_k, local=local, regions=regions)
            seconds.append(time.perf_counter() - started)
            ranked.append([hit.item_id for hit in hits])
            self.last_hits.append(hits)
        return ranked, seconds

    def effective_search_k(self, k: int, search_k: int) -> int:
        """The candidates Annoy inspects for this k and search_k (0 = the bundle default), as the indexer decides."""
        return int(self.index._search_k(min(k, self.item_count), search_k))

    def close(self) -> None:
        self.index.close(timeout=5)


def ann_recall_rows(built: BuiltIndex, queries: np.ndarray, *, k: int, search_ks: Iterable[int]) -> list[dict]:
    """Recall@k of the index against exact search over the same (projected) vectors, and the
    latency of a query (PCA + Annoy + item lookup, as in the indexer), for each search effort."""
    bundle = built.bundle
    base = bundle.project(np.asarray(bundle.features()))
    projected = bundle.project(np.asarray(queries, dtype=np.float32))
    k = min(k, built.item_count)
    exact = metrics.exact_neighbours(base, projected, bundle.metric, k)
    rows = []
    for search_k in search_ks:
        ranked, seconds = built.search(queries, k, search_k)
        found = [[built.row_of[item_id] for item_id in ranking] for ranking in ranked]
        rows.append({
            "search_k": int(search_k), "effective_search_k": built.effective_search_k(k, search_k),
            "is_default": search_k == 0, "k": k, "queries": len(queries),
            "ann_recall": metrics.ann_recall(found, exact),
            "p50_ms": metrics.percentile_ms(seconds, 50), "p95_ms": metrics.percentile_ms(seconds, 95),
        })
    return rows




def search_queries(built: BuiltIndex, query_vectors: np.ndarray, k: int, search_k: int = 0,
                   keys: Sequence[str] | None = None) -> tuple[list[list[str]], list[float]]:
    """THE query path of every evaluation protocol: ranked item ids per query and seconds per query.

    Every ranking the reports score goes through here (groups, copies, compare, gallery sizes), so a
    later stage of the search (re-ranking by geometric verification, query expansion) is plugged in
    once, here, and measured everywhere.
    """
    return built.search(query_vectors, k, search_k, keys)


def gallery_levels(core: list[str], extra: list[str], sizes, seed: int) -> list[tuple[str, int, list[str]]]:
    """Galleries of growing size for "quality at gallery size": `core` (what the queries must find) plus
    the first n of ONE seeded permutation of `extra` (distractors) for each n in `sizes` (an int, or
    "all"), so the galleries are nested. Sizes at or above len(extra) collapse into "all"; returns
    (label, number of distractors, ids) in increasing size, without repeats."""
    order = [extra[i] for i in np.random.default_rng(seed).permutation(len(extra))]
    counts = []
    for size in sizes:
        n = len(extra) if size in ("all", None) else min(int(size), len(extra))
        if n not in counts:
            counts.append(n)
    return [(("all" if n == len(extra) else f"{n:,}"), n, core + order[:n]) for n in sorted(counts)]
