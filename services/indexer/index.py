"""Queries over one opened index bundle, and the one reference to the bundle being served.

`SearchIndex` answers the indexer's questions (nearest items to a vector or to an indexed item,
items by id, what is served) on plain Python/NumPy values; the gRPC servicer only translates.
The nearest-neighbour index is the bundle's backend (`cbir.bundle.ann.AnnIndex`: Annoy, or faiss
HNSW / IVF-PQ, as the bundle was built); its queries release the GIL and are safe to run
concurrently on a read-only index; a request's `search_k` is the backend's effort (Annoy's
search_k, HNSW's efSearch, IVF's nprobe). Item lookups use one read-only SQLite connection per
thread (`cbir.bundle.Bundle`).

With local features (the query's, and the bundle's of every item), the best `Verification.top`
candidates are verified geometrically and re-ranked (`verification`), and each hit gets its inlier
count and match class; `min_score` leaves out weaker hits. A query's region vectors (windows of the
query image) add their `Verification.region_k` nearest items to the verified candidates: such an item
joins the hits only when verification accepts it, ranked by its global score among the verified ones.

Deleted items (the bundle root's deletion list, `set_deleted`) are left out of every answer, and a
query still returns k hits when the bundle has them: Annoy is asked for as many more neighbours as
there are deleted items (doubling when that is not enough); faiss leaves them out inside the
search (an IDSelector). A metadata filter (`cbir.filters`) makes the same promise for the items it
allows (`filtering.AllowedItems`, searched within by the backend: `cbir.bundle.ann`); verification
and region candidates see only those items.

`IndexHolder` is the single place that holds the served `SearchIndex`. Requests `lease()` it for
their duration; `swap()` installs another one (a hot reload), after which the old one can be
`close()`d: that waits until the requests still using it are done, so none is ever dropped and
no query touches an unmapped index.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from cbir import metrics
from cbir.bundle import Bundle, ItemRecord, exact
from cbir.bundle.subset import ItemSubset
from cbir.errors import Incompatible, InvalidRequest, NotFound, NotReady
from cbir.filters import Filter
from cbir.local_features import DESCRIPTION, LocalFeatures
from cbir.v1 import common_pb2
from services.indexer.filtering import AllowedItems
from services.indexer.verification import Verification, count_inliers, stored_features

SERVICE = "indexer"
_MAX_IDS_SHOWN = 5
MAX_REGIONS = 64  # region vectors per query (the embedder sends 9)


@dataclass(frozen=True)
class SearchHit:
    item_id: str
    url: str
    distance: float  # in Annoy's convention, in the bundle's metric (after PCA, if any), whatever the backend
    score: float  # similarity in [0, 1], 1 = identical
    metadata: dict[str, str] = field(default_factory=dict)
    inliers: int = 0  # geometric verification: keypoint matches one model explains (0 = none, or not verified)
    match: str = ""  # "same_image", "copy", "similar" or "" (Verification.match_class)


def score(metric: str, distance: float) -> float:
    """Similarity in [0, 1] from a distance in Annoy's convention (every backend reports those).

    angular: Annoy's distance is sqrt(2 - 2 cos), so the cosine is 1 - d^2 / 2 (clipped to [0, 1]:
    opposite directions score 0); euclidean and manhattan: 1 / (1 + d).
    """
    if metric == "angular":
        return float(min(1.0, max(0.0, 1.0 - distance * distance / 2.0)))
    return float(1.0 / (1.0 + max(0.0, distance)))


class SearchIndex:
    """Nearest-neighbour search and item lookups over one `Bundle`."""

    def __init__(self, bundle: Bundle, *, max_k: int = 1000, verification: Verification = Verification()):
        self.bundle = bundle
        self.max_k = max_k
        self.verification = verification
        self._users = 0
        self._closing = False
        self._idle = threading.Condition()
        self._hidden: frozenset[int] = frozenset()  # Annoy ids of deleted items
        self._hidden_ids: frozenset[str] = frozenset()
        self._allowed = AllowedItems(bundle)  # per metadata filter, the items it allows

    # -- deletions
    def set_deleted(self, item_ids: frozenset[str] | set[str]) -> int:
        """Leave these item ids out of every answer from now on; returns how many are in this bundle."""
        item_ids = frozenset(item_ids)
        present = [r for r in self.bundle.find_items(sorted(item_ids)) if r is not None] if item_ids else []
        hidden = frozenset(r.annoy_id for r in present)
        # One assignment each: a query running meanwhile sees either the old or the new set.
        self._hidden_ids = frozenset(r.item_id for r in present)
        self._hidden = hidden
        return len(hidden)

    @property
    def deleted_count(self) -> int:
        return len(self._hidden)

    def serves(self, record: ItemRecord) -> bool:
        """The item is answered (not on the deletion list)."""
        return record.annoy_id not in self._hidden

    def with_verification(self, verification: Verification) -> SearchIndex:
        """The same bundle and deletions verified with other settings (e.g. fewer candidates). It shares the
        bundle: use it only while this index is open (leased), and never close it."""
        view = SearchIndex(self.bundle, max_k=self.max_k, verification=verification)
        view._hidden, view._hidden_ids = self._hidden, self._hidden_ids
        return view

    @property
    def served_count(self) -> int:
        """Items a query can return: the bundle's minus the deleted ones."""
        return self.item_count - len(self._hidden)

    def warm_up(self, queries: int) -> int:
        """Run `queries` item queries spread over the index (Annoy nodes, item table, this code path)
        so that the first user query is as fast as later ones. Returns the queries run."""
        count = self.item_count
        if queries <= 0 or count == 0:
            return 0
        step = max(1, count // queries)
        k = min(10, count)
        done = 0
        for annoy_id in range(0, count, step)[:queries]:
            ids, _ = self.bundle.index.search_by_item(annoy_id, k)
            self.bundle.items_by_annoy_ids(ids)
            done += 1
        return done

    # -- what is served
    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def input_dimension(self) -> int:
        return self.bundle.input_dimension

    @property
    def item_count(self) -> int:
        return self.bundle.item_count

    @property
    def model_fingerprint(self) -> str:
        return self.bundle.model_fingerprint

    def info(self) -> common_pb2.IndexInfo:
        m = self.bundle.manifest
        return common_pb2.IndexInfo(
            item_count=self.served_count,
            dimension=m.index_dimension,
            input_dimension=m.input_dimension,
            metric=m.metric,
            index_type=m.index_type,
            trees=m.trees,
            model_fingerprint=m.model_fingerprint,
            model=m.model_info(),
            bundle_version=m.version,
            bundle_path=str(self.bundle.path),
            created_at=m.created_at,
            pca_dimension=m.pca.dimension if m.pca else 0,
            pca_whiten=bool(m.pca and m.pca.whiten),
            default_search_k=m.default_search_k,
            local_features=m.local_features,
            verify_top=self.verification.top if self.has_local_features else 0,
        )

    # -- checks
    def check_fingerprint(self, model_fingerprint: str) -> None:
        """Incompatible when a vector's model fingerprint is given and is not the bundle's."""
        if model_fingerprint and model_fingerprint != self.model_fingerprint:
            model = self.bundle.manifest.model
            raise Incompatible(
                f"the query vector was made by model {model_fingerprint!r}, but index bundle {self.version} "
                f"({self.bundle.path}) was built with model {self.model_fingerprint!r} "
                f"({model.get('name', '?')} {model.get('feature', '?')} {model.get('dimension', '?')}-d, "
                f"weights {model.get('weights_fingerprint', '?')!s:.16}): vectors of different models cannot be "
                f"compared. Query through an embedder with the bundle's model, or rebuild the bundle with "
                f"`cbir index build` using the current model"
            )

    def _check_k(self, k: int, min_score: float = 0.0) -> None:
        if not 1 <= k <= self.max_k:
            raise InvalidRequest(f"k must be between 1 and {self.max_k}, got {k}")
        if not 0.0 <= min_score <= 1.0:  # also refuses NaN
            raise InvalidRequest(f"min_score must be between 0 and 1 (scores are similarities), got {min_score}")

    def _search_k(self, k: int, search_k: int) -> int:
        """The effort a search for k spends (the backend's: Annoy's search_k, efSearch, nprobe): the bundle
        default for 0; everything when k >= items. InvalidRequest for a negative search_k."""
        if search_k < 0:
            raise InvalidRequest(
                f"search_k must be >= 0 (0 = the bundle's default, {self.bundle.manifest.default_search_k}), got {search_k}"
            )
        return self.bundle.index.effort(k, search_k)

    # -- queries
    def query_vector(
        self, vector: np.ndarray, *, k: int, search_k: int = 0, model_fingerprint: str = "",
        local: Sequence[LocalFeatures] = (), min_score: float = 0.0, regions: Sequence[np.ndarray] = (),
        conditions: Filter = (),
    ) -> list[SearchHit]:
        """The k items nearest to `vector` (the bundle model's input dimension), best first; re-ranked by
        geometric verification when `local` holds the query's local features (and its mirror's), with the
        nearest items of the query's `regions` (vectors like `vector`) verified too. With metadata filter
        `conditions`, only items meeting them are candidates (k hits when k items do)."""
        self.check_fingerprint(model_fingerprint)
        self._check_k(k, min_score)
        self._search_k(k, search_k)  # refuses a negative search_k
        array = np.asarray(vector, dtype=np.float32).reshape(-1)
        if array.size != self.input_dimension:
            raise InvalidRequest(f"vector has dimension {array.size}, this index expects {self.input_dimension}")
        if not np.isfinite(array).all():
            raise InvalidRequest("vector contains NaN or infinite values")
        if self.bundle.pca is not None:
            with metrics.stage(SERVICE, "pca"):
                array = self.bundle.pca.transform(array)
        allowed = self._allowed.subset(conditions, self._hidden)
        with metrics.stage(SERVICE, "ann_query"):
            ids, distances = self.bundle.index.search(array, self._candidates(k, local), search_k, self._hidden,
                                                      allowed=allowed)
        use_regions = len(regions) and self._verifies(local) and self.verification.region_k > 0
        extra = self._region_candidates(regions, ids, search_k, allowed) if use_regions else []
        if extra:
            ids, distances = list(ids) + extra, list(distances) + self._distances(array, extra)
        return self._hits(ids, distances, k, local, min_score, extra=len(extra))

    def _region_candidates(self, regions: Sequence[np.ndarray], found: Sequence[int], search_k: int,
                           allowed: ItemSubset | None = None) -> list[int]:
        """The `region_k` nearest items of each region vector that are not in `found`, each once."""
        if len(regions) > MAX_REGIONS:
            raise InvalidRequest(f"a query may send at most {MAX_REGIONS} region vectors, got {len(regions)}")
        vectors = np.asarray(regions, dtype=np.float32).reshape(len(regions), -1)
        if vectors.shape[1] != self.input_dimension or not np.isfinite(vectors).all():
            raise InvalidRequest(f"region vectors must be finite and of dimension {self.input_dimension}, "
                                 f"like the query vector; got dimension {vectors.shape[1]}")
        seen, extra = set(found), []
        with metrics.stage(SERVICE, "ann_query"):
            for region in self.bundle.project(vectors):
                ids, _ = self.bundle.index.search(region, self.verification.region_k, search_k, self._hidden,
                                                  allowed=allowed)
                extra += [i for i in ids if i not in seen]
                seen.update(ids)
        return extra

    def _distances(self, array: np.ndarray, ids: Sequence[int]) -> list[float]:
        """Exact distances (Annoy's convention, as `score` reads them) from the index vector `array` to items."""
        rows = self.bundle.project(np.asarray(self.bundle.features()[np.asarray(ids)], dtype=np.float32))
        return [float(d) for d in exact.distances(array, rows, self.bundle.metric)]

    @property
    def has_local_features(self) -> bool:
        """The bundle stores local features of the kind this indexer verifies with."""
        return self.bundle.local is not None and self.bundle.manifest.local_features == DESCRIPTION

    def _verifies(self, local: Sequence[LocalFeatures]) -> bool:
        return bool(local) and self.has_local_features and self.verification.top > 0

    def _candidates(self, k: int, local: Sequence[LocalFeatures]) -> int:
        """Neighbours to fetch: k, or the verified top when that is more."""
        return max(k, self.verification.top) if self._verifies(local) else k

    def query_item(
        self, item_id: str, *, k: int, search_k: int = 0, exclude_self: bool = False, min_score: float = 0.0,
        conditions: Filter = (),
    ) -> list[SearchHit]:
        """The k items nearest to an indexed item, best first; without the item itself if `exclude_self`, only
        items meeting the metadata filter `conditions`. Verified with the item's stored local features when the
        bundle has them."""
        self._check_k(k, min_score)
        if not item_id:
            raise InvalidRequest("item_id is empty: give the id of an indexed item")
        with metrics.stage(SERVICE, "id_lookup"):
            (record,) = self.bundle.find_items([item_id])
        hidden = self._hidden
        if record is None or record.annoy_id in hidden:
            why = "was deleted (it is on the deletion list)" if record is not None else "is not"
            raise NotFound(f"item {item_id!r} {why} in index bundle {self.version}")
        self._search_k(k, search_k)  # refuses a negative search_k
        local = [stored_features(self.bundle.local, record.annoy_id)] if self.has_local_features else []
        allowed = self._allowed.subset(conditions, hidden)
        with metrics.stage(SERVICE, "ann_query"):
            ids, distances = self.bundle.index.search_by_item(
                record.annoy_id, self._candidates(k, local), search_k, hidden, exclude_self=exclude_self,
                allowed=allowed)
        return self._hits(ids, distances, k, local, min_score)

    def _hits(self, ids: Sequence[int], distances: Sequence[float], k: int, local: Sequence[LocalFeatures] = (),
              min_score: float = 0.0, extra: int = 0) -> list[SearchHit]:
        """The first k hits of these candidates (best first) after verification and the min_score cut. The
        last `extra` candidates (region candidates) are verified and kept only when verification accepts them."""
        ids, distances = list(ids), list(distances)
        inliers = [0] * len(ids)
        verified = 0
        if self._verifies(local):
            found = len(ids) - extra
            checked = list(range(min(found, self.verification.top))) + list(range(found, len(ids)))
            with metrics.stage(SERVICE, "verify"):
                counts = count_inliers(local, self.bundle.local, [ids[i] for i in checked],
                                       self.verification.min_matches)
            accepted = [i for i, n in zip(checked, counts) if n >= self.verification.min_inliers]
            count_of = dict(zip(checked, counts))
            # most inliers first: another photo of the same printed design verifies too, with fewer
            accepted.sort(key=lambda i: (-count_of[i], distances[i]))
            rest = [i for i, n in zip(checked, counts) if n < self.verification.min_inliers and i < found]
            verified = len(accepted) + len(rest)
            order = accepted + rest + list(range(len(checked) - extra, found))
            ids, distances = [ids[i] for i in order], [distances[i] for i in order]
            inliers = [count_of.get(i, 0) for i in order]
        scores = [score(self.bundle.metric, d) for d in distances]
        kept = [i for i, similarity in enumerate(scores) if similarity >= min_score][:k]
        with metrics.stage(SERVICE, "id_lookup"):
            records = self.bundle.items_by_annoy_ids([ids[i] for i in kept])
        hits = []
        for i, record in zip(kept, records):
            similarity = scores[i]
            # the first `verified` positions hold the verified candidates, the rest were not verified
            match = self.verification.match_class(similarity, inliers[i], verified=i < verified)
            hits.append(SearchHit(record.item_id, record.url, float(distances[i]), similarity, record.metadata,
                                  inliers[i], match))
        return hits

    def get_items(self, item_ids: Sequence[str]) -> list[ItemRecord]:
        """Items in the order asked; NotFound listing (a few of) the unknown ids."""
        if not item_ids:
            raise InvalidRequest("no item ids given: ask for at least one")
        with metrics.stage(SERVICE, "id_lookup"):
            records = self.bundle.find_items(item_ids)
        hidden = self._hidden
        if hidden:
            records = [None if r is not None and r.annoy_id in hidden else r for r in records]
        missing = list(dict.fromkeys(i for i, r in zip(item_ids, records) if r is None))
        if missing:
            shown = ", ".join(repr(i) for i in missing[:_MAX_IDS_SHOWN])
            more = f" and {len(missing) - _MAX_IDS_SHOWN} more" if len(missing) > _MAX_IDS_SHOWN else ""
            raise NotFound(
                f"{len(missing)} of {len(item_ids)} item ids are not in index bundle {self.version}: {shown}{more}"
            )
        return records  # type: ignore[return-value]

    # -- lifetime: leases taken by IndexHolder, close waits for them
    def _acquire(self) -> None:
        with self._idle:
            if self._closing:
                raise NotReady(f"index bundle {self.version} is being unloaded; retry")
            self._users += 1

    def _release(self) -> None:
        with self._idle:
            self._users -= 1
            if self._users == 0:
                self._idle.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new leases, wait (up to `timeout`) for requests using this index, then close the bundle."""
        with self._idle:
            self._closing = True
            if not self._idle.wait_for(lambda: self._users == 0, timeout):
                return  # still in use: leave it mapped rather than crash a running query
        self.bundle.close()


class IndexHolder:
    """The one reference to the `SearchIndex` being served (None until a bundle is loaded)."""

    def __init__(self, reason: str = "no index bundle loaded yet"):
        self._lock = threading.Lock()
        self._index: SearchIndex | None = None
        self._reason = reason

    @property
    def ready(self) -> bool:
        return self._index is not None

    @property
    def reason(self) -> str:
        """Why there is no index (empty while one is served)."""
        return "" if self._index is not None else self._reason

    def set_reason(self, reason: str) -> None:
        with self._lock:
            self._reason = reason

    @property
    def current(self) -> SearchIndex | None:
        """The index served now (no lease: for the loader and for reports, not for queries)."""
        return self._index

    def swap(self, index: SearchIndex | None, reason: str = "") -> SearchIndex | None:
        """Serve `index` from now on (None: serve nothing, answering `reason`); returns the previous one."""
        with self._lock:
            previous, self._index = self._index, index
            if reason:
                self._reason = reason
            return previous

    @contextlib.contextmanager
    def lease(self) -> Iterator[SearchIndex]:
        """The served index for the duration of one request; NotReady (UNAVAILABLE) while there is none."""
        with self._lock:
            index = self._index
            if index is None:
                raise NotReady(self._reason)
            index._acquire()
        try:
            yield index
        finally:
            index._release()
