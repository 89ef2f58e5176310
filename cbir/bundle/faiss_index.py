"""The faiss index types of a bundle, in `index.faiss` (faiss.write_index), served through the
bundle's index interface (`cbir.bundle.ann.AnnIndex`) by `FaissBackend`:

- `hnsw`: IndexHNSWFlat, M = 32 links per node, efConstruction = 200; float32 vectors, so its
  distances are exact. Effort = efSearch (default `HNSW_EF_SEARCH`).
- `hnsw-sq8`: IndexHNSWSQ, the same graph over vectors quantised to 8 bits per dimension (1/4 of
  the size); its `rerank` x n best candidates are re-ranked exactly. Effort = efSearch.
- `ivfpq`: IndexIVFPQ, nlist ~ 4 sqrt(n) inverted lists (k-means over a seeded sample) and product
  quantisation (pq_m codes of 8 bits: 64 bytes per 512-d vector); `rerank` x n candidates are
  re-ranked exactly. Effort = nprobe, the lists visited (default `IVF_NPROBE`). IVF-PQ's own
  distances are coarse: the exact re-rank is what makes it usable.

The exact re-rank reads the candidates' rows of the bundle's input vectors (`features.npy`,
memory-mapped; PCA-projected when the bundle has PCA). Metric angular compares L2-normalised
vectors (stored normalised) by L2 distance, which ranks exactly as their inner product does and is
Annoy's angular distance itself, sqrt(2 - 2 cos); the inner-product metric ranked the same but
trained worse IVF-PQ codes (recall@10 after the re-rank 0.76 against 0.98 for L2 on 12k clustered
64-d vectors). Euclidean is the L2 distance (faiss's squared distances are square-rooted);
manhattan is Annoy's alone.

Memory: the index file is opened with `faiss.IO_FLAG_MMAP_IFC` (faiss >= 1.11; checked with the
pinned 1.15.1): the vectors or codes, the HNSW graph's links and the IVF lists and ids are mapped
from the file, not copied, so indexer processes on one host share them through the page cache like
Annoy's file. Each process copies only small tables: for HNSW the per-item levels and offsets
(measured: 11 bytes per item, ~110 MB at 10M items), for IVF-PQ its codebooks and list headers
(~100 KB). The older `IO_FLAG_MMAP` maps only IVF lists and copies an HNSW index into every process.
IVF-PQ's precomputed distance tables are skipped (`IO_FLAG_SKIP_PRECOMPUTE_TABLE`): they would be
nlist x pq_m x 256 floats per process (83 MB at 100k 512-d items, 830 MB at 10M).

Threads: faiss searches release the GIL and are safe from many threads on one index; the effort
and the hidden items (or a metadata filter's allowed items: an IDSelectorBitmap) travel in per-call
SearchParameters, never in attributes of the shared index.
`set_query_threads(1)` (the indexer does it) makes each searching thread run its query alone:
concurrency comes from gRPC's threads, and an OpenMP team per query would only oversubscribe the
cores. OpenMP's thread count is a per-thread setting, so it is applied in each thread that searches.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cbir.bundle.ann import Hits
from cbir.bundle.exact import nearest_in
from cbir.bundle.inputs import InvalidBundleInput
from cbir.bundle.layout import REBUILD
from cbir.bundle.search_k import HNSW_EF_SEARCH, IVF_NPROBE
from cbir.bundle.subset import ItemSubset
from cbir.errors import BundleError

log = logging.getLogger(__name__)

FAISS_SEED = 20261124  # seeds the training sample and faiss's k-means
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
SQ8_RERANK = 2
# Candidates re-ranked exactly, per hit asked: PQ codes order the nearest few hundred poorly, and the worse the
# denser the collection. Clustered 512-d vectors, recall@50 (BENCHMARKS.md, "1M and 10M"): at 1M 0.947 with
# 4 x k, 0.999 with 8 x k; at 10M 0.696 / 0.852 / 0.955 / 0.994 with 4 / 8 / 16 / 32 x k.
IVFPQ_RERANK = 8
IVFPQ_RERANK_LARGE = 16
IVFPQ_LARGE_ITEMS = 4_000_000
PQ_BITS = 8
# k-means wants 39 training vectors per centroid (faiss warns below that), and the product quantiser
# trains 2^8 = 256 centroids per sub-vector: fewer items than this cannot train IVF-PQ (9,984).
IVFPQ_MIN_ITEMS = 39 * 2**PQ_BITS
_MAX_NLIST = 65536
_KMEANS_ITERATIONS = 10
_MIN_TRAIN = 65536
_ADD_BATCH = 65536
_INT32_MAX = 2**31 - 1  # efSearch is a C int: a request's effort is capped below it

# Per index type: the build parameters recorded in the manifest's index_params (a build may set them),
# and the parameter that sets the default effort (recorded as default_search_k).
_PARAMS = {
    "hnsw": ("m", "ef_construction"),
    "hnsw-sq8": ("m", "ef_construction", "rerank", "train_size", "seed"),
    "ivfpq": ("nlist", "pq_m", "pq_bits", "rerank", "train_size", "seed"),
}
_EFFORT_PARAM = {"hnsw": "ef_search", "hnsw-sq8": "ef_search", "ivfpq": "nprobe"}
_CLASSES = {"hnsw": "IndexHNSWFlat", "hnsw-sq8": "IndexHNSWSQ", "ivfpq": "IndexIVFPQ"}


def _faiss():
    """faiss, imported on first use: Annoy bundles and `cbir --help` never pay for it."""
    import faiss

    return faiss


# ------------------------------------------------------------------------------------------ build


def default_pq_m(dimension: int) -> int:
    """Sub-quantisers: the largest divisor of the dimension that is at most 64 and leaves >= 4
    dimensions per sub-vector (512-d: 64 x 8 bits = 64 bytes per vector)."""
    return max(m for m in range(1, min(64, max(1, dimension // 4)) + 1) if dimension % m == 0)


def default_nlist(item_count: int) -> int:
    """~4 sqrt(n) inverted lists, with at least 39 items per list to train them."""
    return int(max(1, min(round(4 * math.sqrt(item_count)), item_count // 39, _MAX_NLIST)))


def plan(index_type: str, item_count: int, dimension: int, given: Mapping[str, Any] | None) -> tuple[dict[str, int], int]:
    """The parameters to build with (recorded in the manifest's index_params) and the default effort
    (its default_search_k), from the defaults and the ones `given`; InvalidBundleInput, in words, for
    a parameter that does not apply or cannot work, or a collection too small for the index type."""
    given = dict(given or {})
    effort_name = _EFFORT_PARAM[index_type]
    allowed = _PARAMS[index_type] + (effort_name,)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise InvalidBundleInput(
            f"index_params {', '.join(map(repr, unknown))} do not apply to index type {index_type!r} "
            f"(it takes {', '.join(allowed)})"
        )
    for name, value in given.items():
        least = 0 if name == "seed" else 1
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise InvalidBundleInput(f"index_params[{name!r}] must be an integer >= {least}, got {value!r}")
    given = {name: int(value) for name, value in given.items()}
    if index_type == "ivfpq":
        params = {"nlist": default_nlist(item_count), "pq_m": default_pq_m(dimension), "pq_bits": PQ_BITS,
                  "rerank": IVFPQ_RERANK if item_count < IVFPQ_LARGE_ITEMS else IVFPQ_RERANK_LARGE}
    else:
        params = {"m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}
        if index_type == "hnsw-sq8":
            params["rerank"] = SQ8_RERANK
    params |= {k: v for k, v in given.items() if k in params}
    if index_type == "ivfpq":
        _check_ivfpq(params, item_count, dimension)
    if index_type != "hnsw":
        train = given.get("train_size") or max(_MIN_TRAIN, 39 * params.get("nlist", 0))
        params |= {"train_size": min(item_count, train), "seed": given.get("seed", FAISS_SEED)}
    default_effort = given.get(effort_name, IVF_NPROBE if index_type == "ivfpq" else HNSW_EF_SEARCH)
    if index_type == "ivfpq":
        default_effort = min(default_effort, params["nlist"])
    return params, default_effort


def size_problem(index_type: str, item_count: int, params: Mapping[str, int] | None = None) -> str:
    """Why a collection of `item_count` items is too small for this index type, in words ("" when it is not)."""
    if index_type != "ivfpq":
        return ""
    params = params or {}
    needed = 39 * max(2 ** params.get("pq_bits", PQ_BITS), params.get("nlist", 0))
    if item_count >= needed:
        return ""
    return (f"the ivfpq index needs at least {needed:,} items to train its quantisers (39 per centroid), and this "
            f"collection has {item_count:,}: use --index hnsw (exact distances, any size) or --index annoy for it")


def _check_ivfpq(params: dict[str, int], item_count: int, dimension: int) -> None:
    if params["pq_bits"] > 12:
        raise InvalidBundleInput(f"index_params['pq_bits'] must be at most 12, got {params['pq_bits']}")
    problem = size_problem("ivfpq", item_count, params)
    if problem:
        raise InvalidBundleInput(problem)
    if dimension % params["pq_m"]:
        raise InvalidBundleInput(
            f"index_params['pq_m'] {params['pq_m']} must divide the index dimension {dimension} (each code covers "
            f"dimension / pq_m values)"
        )


def missing_params(index_type: str, params: Mapping[str, int]) -> list[str]:
    """The build parameters a manifest of this faiss index type must record but does not."""
    return [name for name in _PARAMS[index_type] if name not in params]


def _metric_type(metric: str) -> int:
    """L2 for both metrics: angular vectors are stored L2-normalised (see the module's docstring)."""
    return _faiss().METRIC_L2


def _prepared(rows: np.ndarray, angular: bool) -> np.ndarray:
    """float32, C-contiguous rows (a copy), L2-normalised for angular (zero rows stay zero)."""
    out = np.array(rows, dtype=np.float32, order="C", copy=True)
    if angular:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
    return out


def write_faiss(path: Path, vectors: np.ndarray, metric: str, index_type: str, params: Mapping[str, int]) -> None:
    """Build an index of `vectors` (row i = item i) of `index_type` with `params` (from `plan`) into `path`."""
    faiss = _faiss()
    n, d = vectors.shape
    angular = metric == "angular"
    metric_type = _metric_type(metric)
    if index_type == "ivfpq":
        quantizer = faiss.IndexFlat(d, metric_type)
        index = faiss.IndexIVFPQ(quantizer, d, params["nlist"], params["pq_m"], params["pq_bits"], metric_type)
        index.cp.seed = index.pq.cp.seed = params["seed"]
        index.cp.niter = index.pq.cp.niter = _KMEANS_ITERATIONS
    elif index_type == "hnsw-sq8":
        index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, params["m"], metric_type)
    else:
        index = faiss.IndexHNSWFlat(d, params["m"], metric_type)
    if index_type != "ivfpq":
        index.hnsw.efConstruction = params["ef_construction"]
    if "train_size" in params:
        log.info("training the %s index on %d of %d vectors", index_type, params["train_size"], n)
        rng = np.random.default_rng(params["seed"])
        rows = np.sort(rng.choice(n, size=params["train_size"], replace=False))
        index.train(_prepared(vectors[rows], angular))
    log.info("adding %d vectors to the %s index (%s)", n, index_type, params)
    for start in range(0, n, _ADD_BATCH):
        index.add(_prepared(vectors[start:start + _ADD_BATCH], angular))
    faiss.write_index(index, str(path))


# ------------------------------------------------------------------------------------------ serve

_threads = threading.local()
_query_threads = 0  # 0: leave OpenMP's thread count alone


def set_query_threads(threads: int) -> None:
    """OpenMP threads per faiss query from now on, in every thread that searches (the indexer: 1)."""
    global _query_threads
    _query_threads = int(threads)


def _limit_threads(faiss) -> None:
    if _query_threads and getattr(_threads, "count", 0) != _query_threads:
        faiss.omp_set_num_threads(_query_threads)  # a per-thread setting: once in each thread
        _threads.count = _query_threads


def load_faiss(path: Path, *, index_type: str, metric: str, dimension: int, params: Mapping[str, int],
               default_effort: int, reference: Callable[[np.ndarray], np.ndarray]) -> FaissBackend:
    """The index at `path`, mmapped; BundleError when faiss cannot read it or it is not the index the
    manifest describes. `reference(ids)` gives the exact index vectors of items (for the re-rank)."""
    faiss = _faiss()
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    if index_type == "ivfpq":
        flags |= faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE  # anonymous memory in every process (module docstring)
    try:
        index = faiss.read_index(str(path), flags)
    except (RuntimeError, MemoryError) as error:
        raise BundleError(f"faiss cannot read {path} as an index: {_faiss_reason(error)}; {REBUILD}") from None
    kind = type(index).__name__
    if kind != _CLASSES[index_type]:
        raise BundleError(
            f"{path} holds a faiss {kind}, but the manifest says index_type {index_type!r} ({_CLASSES[index_type]}): "
            f"the index does not belong to this manifest; {REBUILD}"
        )
    if index.d != dimension or index.metric_type != _metric_type(metric):
        raise BundleError(
            f"{path} is a {index.d}-d index with faiss metric {index.metric_type}, but the manifest says "
            f"{dimension}-d {metric} (faiss metric {_metric_type(metric)}): the index does not belong to this "
            f"manifest; {REBUILD}"
        )
    if index_type == "ivfpq":
        index.use_precomputed_table = -1  # before any query: tables were skipped at load
    return FaissBackend(index, index_type=index_type, metric=metric, params=params, default_effort=default_effort,
                        reference=reference)


def _faiss_reason(error: BaseException) -> str:
    """faiss's message without its C++ source location ("Error in ... at file.cpp:123: why")."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    head, sep, tail = text.rpartition(": ")
    return tail if sep and ".cpp:" in head else text


def _bitmap_selector(allowed: ItemSubset):
    """A faiss IDSelector that keeps only the allowed items (made per search: it only points at their bitmap)."""
    faiss = _faiss()
    bitmap = allowed.bitmap
    selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
    selector.referenced = bitmap  # the selector keeps a pointer: keep the bitmap alive with it
    return selector


class FaissBackend:
    """A faiss index of a bundle behind the bundle's index interface (`cbir.bundle.ann.AnnIndex`)."""

    def __init__(self, index: Any, *, index_type: str, metric: str, params: Mapping[str, int], default_effort: int,
                 reference: Callable[[np.ndarray], np.ndarray]):
        self.index_type = index_type
        self.faiss = index
        self._metric = metric
        self._angular = metric == "angular"
        self._count = int(index.ntotal)
        self._graph = index_type != "ivfpq"
        self._rerank = int(params.get("rerank", 1)) if index_type != "hnsw" else 1
        self._nlist = int(params.get("nlist", 0))
        self._links = int(params.get("m", HNSW_M))
        self._default = int(default_effort)
        self._reference = reference
        self._selector_lock = threading.Lock()
        self._selector: tuple[frozenset[int], Any] | None = None

    @property
    def count(self) -> int:
        return self._count

    # -- effort
    def effort(self, n: int, requested: int) -> int:
        """efSearch (at least the candidates fetched) or nprobe (at most nlist); for n >= items, the
        effort of a search over everything (which is then exact)."""
        effort = int(requested) or self._default
        if self._graph:
            candidates = min(n * self._rerank, self._count)
            return int(max(candidates, min(effort, max(self._count, candidates), _INT32_MAX)))
        return self._nlist if n >= self._count else int(min(effort, self._nlist))

    # -- queries
    def search(self, vector: np.ndarray, n: int, effort: int = 0, hidden: frozenset[int] = frozenset(),
               allowed: ItemSubset | None = None) -> Hits:
        query = _prepared(np.asarray(vector).reshape(1, -1), self._angular)
        return self._search(query, n, effort, hidden, drop=None, allowed=allowed)

    def search_by_item(self, item: int, n: int, effort: int = 0, hidden: frozenset[int] = frozenset(),
                       exclude_self: bool = False, allowed: ItemSubset | None = None) -> Hits:
        query = _prepared(self._reference(np.array([item])), self._angular)
        return self._search(query, n, effort, hidden, drop=item if exclude_self else None, allowed=allowed)

    def _search(self, query: np.ndarray, n: int, effort: int, hidden: frozenset[int], drop: int | None,
                allowed: ItemSubset | None = None) -> Hits:
        """With `allowed` (which leaves the hidden items out already): searches only among those items, inside
        the ANN search (an IDSelectorBitmap, with an effort raised by 1 / their share of the items), or by exact
        search over them when that reads fewer vectors than the ANN search would inspect."""
        faiss = _faiss()
        _limit_threads(faiss)
        wanted = n + (drop is not None)
        available = self._count - len(hidden) if allowed is None else len(allowed)
        fraction = 1.0 if allowed is None else max(allowed.fraction, 1e-12)
        if allowed is not None and (wanted >= available or available <= self._inspected(wanted, effort) / fraction):
            ids, distances = self._exact_among(query, allowed, wanted)
        elif wanted >= available:
            ids, distances = self._exact_all(query, hidden, wanted)  # everything asked for: exact
        else:
            candidates = min(wanted * self._rerank, available)
            selector = self._selector_for(hidden) if allowed is None else _bitmap_selector(allowed)
            most = self.effort(self._count, 0)
            level = min(most, math.ceil(self.effort(wanted, effort) / fraction))
            while True:
                params = faiss.SearchParametersHNSW() if self._graph else faiss.SearchParametersIVF()
                if self._graph:
                    params.efSearch = level
                else:
                    params.nprobe = level
                if selector is not None:
                    params.sel = selector
                scores, found = self.faiss.search(query, candidates, params=params)
                keep = found[0] >= 0
                # Too few found (IVF lists shorter than the candidates asked for, or a graph search among
                # many hidden items): look further, up to everything, rather than return fewer than n.
                if keep.sum() >= candidates or level >= most:
                    break
                level = min(most, 2 * level)
            ids, scores = found[0][keep], scores[0][keep]
            if len(ids) < wanted and allowed is not None:
                ids, distances = self._exact_among(query, allowed, wanted)
            elif len(ids) < wanted:
                ids, distances = self._exact_all(query, hidden, wanted)  # an unreachable part of the graph
            elif self._rerank > 1:
                ids, distances = self._exact(query, ids)
            else:  # squared L2 (of unit vectors for angular: 2 - 2 cos)
                distances = np.sqrt(np.maximum(0.0, scores))
        if drop is not None:
            keep = ids != drop
            ids, distances = ids[keep], distances[keep]
        return [int(i) for i in ids[:n]], [float(d) for d in distances[:n]]

    def _exact(self, query: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`ids` ordered by their exact distance to `query` (from the bundle's stored vectors)."""
        if len(ids) == 0:
            return ids.astype(np.int64), np.zeros(0, np.float32)
        rows = _prepared(self._reference(ids), self._angular)
        distances = np.linalg.norm(rows - query[0], axis=1)  # of unit vectors for angular: sqrt(2 - 2 cos)
        order = np.argsort(distances, kind="stable")
        return np.asarray(ids, dtype=np.int64)[order], distances[order]

    def _exact_all(self, query: np.ndarray, hidden: frozenset[int], n: int) -> tuple[np.ndarray, np.ndarray]:
        """The n nearest items not hidden, by exact search over every stored vector, a chunk at a time."""
        hidden_ids = np.fromiter(hidden, np.int64, len(hidden))
        best_ids, best = np.zeros(0, np.int64), np.zeros(0, np.float32)
        for start in range(0, self._count, _ADD_BATCH):
            ids = np.setdiff1d(np.arange(start, min(start + _ADD_BATCH, self._count)), hidden_ids)
            ids, distances = self._exact(query, ids)
            best_ids, best = np.concatenate([best_ids, ids[:n]]), np.concatenate([best, distances[:n]])
            order = np.argsort(best, kind="stable")[:n]
            best_ids, best = best_ids[order], best[order]
        return best_ids, best

    def _inspected(self, n: int, effort: int) -> int:
        """About the items an unfiltered search for n at this effort compares the query with: a graph search ~M
        neighbours per candidate it keeps, IVF the items of nprobe lists. (IVF-PQ's codes are cheaper to compare
        than vectors, but among a filter's items its ranking needs far more lists to stay as good: measured at 100k
        x 512, a 10 % filter searched within nprobe 160 found recall@50 0.63, the exact search 1.0.)"""
        level = self.effort(n, effort)
        return level * self._links if self._graph else level * self._count // max(1, self._nlist)

    def _exact_among(self, query: np.ndarray, allowed: ItemSubset, n: int) -> tuple[np.ndarray, np.ndarray]:
        found, distances = nearest_in(query[0], allowed, self._reference, self._metric, n)
        return np.asarray(found, dtype=np.int64), np.asarray(distances, dtype=np.float32)

    def _selector_for(self, hidden: frozenset[int]):
        """A faiss IDSelector that leaves `hidden` out, made once per deletion list (not per query)."""
        if not hidden:
            return None
        with self._selector_lock:
            if self._selector is None or not (self._selector[0] is hidden or self._selector[0] == hidden):
                faiss = _faiss()
                ids = np.fromiter(hidden, dtype=np.int64, count=len(hidden))
                batch = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
                selector = faiss.IDSelectorNot(batch)
                selector.referenced = batch  # IDSelectorNot keeps a pointer: keep the batch alive with it
                self._selector = (hidden, selector)
            return self._selector[1]

    # -- stored vectors
    def item_vector(self, item: int) -> np.ndarray | None:
        if not self._graph:
            return None  # IVF-PQ keeps codes in lists without an id -> position map
        return np.asarray(self.faiss.reconstruct(int(item)), dtype=np.float32)

    def holds(self, item: int, expected: np.ndarray) -> bool:
        want = _prepared(np.asarray(expected).reshape(1, -1), self._angular)[0]
        stored = self.item_vector(item) if self._graph else self._ivf_vector(item, want)
        if stored is None:
            return False
        if self.index_type == "hnsw":
            return bool(np.allclose(stored, want, rtol=1e-4, atol=1e-5))
        # quantised: 8-bit scalar codes are within ~1% of the vector, PQ codes within ~half of it
        tolerance = 0.05 if self.index_type == "hnsw-sq8" else 0.5
        return bool(np.linalg.norm(stored - want) <= tolerance * max(float(np.linalg.norm(want)), 1e-12))

    def _ivf_vector(self, item: int, near: np.ndarray) -> np.ndarray | None:
        """Item `item`'s decoded PQ code, looked up in the inverted lists nearest `near` (None if absent)."""
        faiss = _faiss()
        index = self.faiss
        _, lists = index.quantizer.search(near.reshape(1, -1), min(self._nlist, 32))
        invlists = index.invlists
        for list_no in (int(x) for x in lists[0] if x >= 0):
            size = invlists.list_size(list_no)
            if not size:
                continue
            pointer = invlists.get_ids(list_no)
            try:
                offsets = np.flatnonzero(faiss.rev_swig_ptr(pointer, size) == item)
            finally:
                invlists.release_ids(list_no, pointer)
            if offsets.size:
                out = np.empty(index.d, dtype=np.float32)
                index.reconstruct_from_offset(list_no, int(offsets[0]), faiss.swig_ptr(out))
                return out
        return None

    def close(self) -> None:
        """Free the index and unmap its file (and drop the reference to the features)."""
        self._selector = None
        self.faiss = None
        self._reference = None
