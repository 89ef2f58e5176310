"""Groups of copies and near-duplicates over a whole index bundle, found through its own index.

Never N x N: every served item is queried for its k nearest items (`SearchIndex.query_item`:
geometric verification of the first k candidates with the stored RootSIFT features when the bundle
has them), each hit is judged as a pair, the accepted pairs are joined into groups (union-find),
and every group keeps its pairs with their evidence. Deleted items are neither queried nor
returned. The indexer runs this for `FindDuplicates` over the bundle it serves, `cbir duplicates`
over a bundle it opens.

A pair is judged (`classify`) on, strongest first:
- PDQ (`cbir.pdq`): the hashes `cbir index build` stored in the bundle (or another `PdqSource`): two
  images at most `pdq.MATCH_BITS` apart over the 8 rotations/mirrors are the same image (the mirrored
  and rotated copies SIFT misses); a pair PDQ measured apart is no "same_image" (at most a copy: a crop,
  an overlay);
- geometric verification: >= `Verification.copy_inliers` inliers is a copy; a pair of two items
  that both have that many keypoints and fewer inliers is no copy, whatever its global score. A copy shows
  all of one of the two images, so its inliers leave no hole in the part of that image the other one shows
  (`shares_only_a_frame`): two copies of different photos pasted into one screenshot template or onto one
  background photo match, with many inliers, on that frame alone and are no copy;
- otherwise (no local features, or a textureless image) the global score, by the indexer's rules
  (`Verification.match_class` of an unverified hit).
`Rule("copy")` keeps "copy" and "same_image", `Rule("near-duplicate")` "same_image" only;
`Rule(match_class=None, threshold=S)` keeps the pairs whose global score is >= S (no verification).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import cv2
import numpy as np

from cbir import local_features, pdq
from cbir.bundle import ItemRecord, search_k_for
from cbir.errors import InvalidRequest
from cbir.local_features import Correspondence, LocalFeatures
from services.indexer.index import SearchHit, SearchIndex
from services.indexer.verification import Verification, stored_features

CLASSES: dict[str, frozenset[str]] = {
    "copy": frozenset({"copy", "same_image"}),
    "near-duplicate": frozenset({"same_image"}),
}
DEFAULT_CLASS = "copy"
DEFAULT_K = 10
# Nearest items verified per item (class rules). Verifying beyond the k judged lets a verified copy in
# from further down (a screenshot, an overlay, a collage: their first neighbours are other images sharing
# the frame or the background). devbench copies (BENCHMARKS.md, "Duplicate finder"): copies grouped with
# their original 0.897 / 0.930 / 0.938 verifying 10 / 20 / 30, at 32 / 19 / 15 items/s.
DEFAULT_VERIFY_TOP = 20
MAX_VERIFY_TOP = 1000  # each verified candidate costs ~5 ms per item
_STRENGTH = {"": 0, "similar": 1, "copy": 2, "same_image": 3}
# A hole (`shares_only_a_frame`): an image's keypoints, in the part the other image shows, farther than
# HOLE_SPACING x the inliers' mean spacing from every inlier, more than MAX_UNEXPLAINED of them on both sides.
# benchmarks/duplicates_pr.py (devbench copies in one bundle with their gallery): strict precision 0.827 -> 0.955,
# pair recall 0.794 -> 0.792; of the pairs of copies of different photos, 844 of 848 sharing a screenshot
# template and 378 of 588 sharing a background dropped (those left share a whole background photo, a collage
# tile: a copy of that photo). True pairs dropped: ~110 of 7,530, mostly two copies of one photo each pasted
# into something else.
HOLE_SPACING = 2.0
MAX_UNEXPLAINED = 0.05


@dataclasses.dataclass(frozen=True)
class Rule:
    """Which pairs are duplicates: a match class ("copy", "near-duplicate") or a global-score threshold."""

    match_class: str | None = DEFAULT_CLASS
    threshold: float | None = None

    def __post_init__(self):
        if (self.match_class is None) == (self.threshold is None):
            raise InvalidRequest("give exactly one of a match class and a score threshold")
        if self.match_class is not None and self.match_class not in CLASSES:
            raise InvalidRequest(
                f"unknown class {self.match_class!r}: ask for 'copy' (copies and the same image) or "
                "'near-duplicate' (the same image only)")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:  # also refuses NaN
            raise InvalidRequest(f"the threshold is a similarity between 0 and 1, got {self.threshold:g}")

    @property
    def verifies(self) -> bool:
        """Geometric verification of the candidates (class rules; a threshold is on the global score alone)."""
        return self.match_class is not None

    @property
    def min_score(self) -> float:
        return self.threshold if self.threshold is not None else 0.0

    def accepts(self, pair: Pair) -> bool:
        if self.threshold is not None:
            return pair.score >= self.threshold
        return pair.match in CLASSES[self.match_class]


@dataclasses.dataclass
class Pair:
    """Two items (a < b) and the evidence that they are copies."""

    a: str
    b: str
    score: float  # the global descriptor's similarity in [0, 1]
    match: str  # "same_image", "copy", "similar" or "" (classify)
    inliers: int = 0  # geometric verification (0: none, or not verified)
    decided_by: str = "score"  # the evidence the class rests on: "pdq", "inliers" or "score"
    pdq: str = "off"  # "match", "no_match", or why PDQ did not judge it (a PdqSource's reason)
    pdq_distance: int | None = None  # bits of 256, the least over the 8 rotations/mirrors

    @property
    def key(self) -> tuple[str, str]:
        return self.a, self.b

    def merged(self, other: Pair) -> Pair:
        """The same pair seen from its other item: the stronger evidence of the two."""
        best = self if _STRENGTH[self.match] >= _STRENGTH[other.match] else other
        return dataclasses.replace(best, score=max(self.score, other.score), inliers=max(self.inliers, other.inliers))


@dataclasses.dataclass
class Group:
    items: list[str]  # sorted
    pairs: list[Pair]  # sorted by (a, b)


class PdqSource(Protocol):
    """Where an item's PDQ hashes come from: its `cbir.pdq.RECORD`, or why there is none (a word)."""

    def of(self, annoy_id: int, url: str) -> np.ndarray | str: ...


class StoredPdq:
    """The hashes `cbir index build` stored in the bundle (`Bundle.pdq`)."""

    def __init__(self, records: np.ndarray):
        self.records = records

    def of(self, annoy_id: int, url: str) -> np.ndarray | str:
        record = self.records[annoy_id]
        if int(record["quality"]) == pdq.NO_HASH:
            return "no_hash"
        return record if pdq.usable(record) else "low_quality"


@dataclasses.dataclass(frozen=True)
class NoPdq:
    """No hashes, and why: "off" (not asked for), "not_stored" (a bundle built without pdqhash), ..."""

    reason: str

    def of(self, annoy_id: int, url: str) -> str:
        return self.reason


def stored_pdq(bundle) -> PdqSource:
    return StoredPdq(bundle.pdq) if bundle.pdq is not None else NoPdq("not_stored")


def pdq_distance(source: PdqSource, a: tuple[int, str], b: tuple[int, str]) -> tuple[int | None, str]:
    """(bits apart, "match"/"no_match") of two items given as (Annoy id, URL), or (None, why not)."""
    first = source.of(*a)
    if isinstance(first, str):
        return None, first
    second = source.of(*b)
    if isinstance(second, str):
        return None, second
    bits = pdq.distance(first, second)
    return bits, "match" if bits <= pdq.MATCH_BITS else "no_match"


def classify(score: float, inliers: int, verifiable: bool, pdq_bits: int | None = None,
             verification: Verification = Verification()) -> tuple[str, str]:  # noqa: B008 (frozen)
    """(match class, the evidence it rests on) of a pair; see the module docstring."""
    if pdq_bits is not None and pdq_bits <= pdq.MATCH_BITS:
        return "same_image", "pdq"
    if not verifiable:
        match, decided_by = verification.match_class(score, 0, verified=False), "score"
    elif inliers >= verification.copy_inliers:
        match, decided_by = verification.match_class(score, inliers, verified=True), "inliers"
    else:
        match, decided_by = ("similar" if score >= verification.similar_score else ""), "inliers"
    if match == "same_image" and pdq_bits is not None:
        match = "copy"  # PDQ measured both images and they differ: a crop or an edit, not the same image
    return match, decided_by


class PairJudge:
    """Turns one item's hits into its accepted pairs (thread-safe: caches only)."""

    def __init__(self, index: SearchIndex, rule: Rule, pdq_source: PdqSource | None = None):
        """`pdq_source`: the bundle's stored hashes when not given."""
        self.index = index
        self.rule = rule
        self.verification = index.verification
        bundle = index.bundle
        self.pdq = pdq_source if pdq_source is not None else stored_pdq(bundle)
        self._needs_ids = not isinstance(self.pdq, NoPdq)
        verifies = rule.verifies and bundle.local is not None and \
            bundle.manifest.local_features == local_features.DESCRIPTION  # what SearchIndex verifies with
        self._local = bundle.local if verifies else None
        self._keypoints = np.full(index.item_count, -1, dtype=np.int32) if verifies else None
        self._frames: dict[tuple[int, int], bool] = {}  # (Annoy id, Annoy id) -> _frame_only

    def pairs(self, record: ItemRecord, hits: Sequence[SearchHit]) -> list[Pair]:
        accepted = []
        for hit, annoy_id in zip(hits, self._annoy_ids(hits)):
            pair = self.judge(record, hit, annoy_id)
            if self.rule.accepts(pair):
                accepted.append(pair)
        return accepted

    def judge(self, record: ItemRecord, hit: SearchHit, hit_annoy_id: int | None) -> Pair:
        verifiable = hit_annoy_id is not None and self._verifiable(record.annoy_id) and self._verifiable(hit_annoy_id)
        if isinstance(self.pdq, NoPdq):
            bits, state = None, self.pdq.reason
        elif hit_annoy_id is None:  # the hit's record is gone (ids are looked up once per query)
            bits, state = None, "no_hash"
        else:
            bits, state = pdq_distance(self.pdq, (record.annoy_id, record.url), (hit_annoy_id, hit.url))
        match, decided_by = classify(hit.score, hit.inliers, verifiable, bits, self.verification)
        if match in CLASSES["copy"] and decided_by == "inliers" and self._frame_only(record.annoy_id, hit_annoy_id):
            match = "similar" if hit.score >= self.verification.similar_score else ""
        a, b = sorted((record.item_id, hit.item_id))
        return Pair(a, b, hit.score, match, hit.inliers, decided_by, state, bits)

    def _frame_only(self, first: int, second: int) -> bool:
        """The verified pair (Annoy ids) matches on a shared frame or background alone. Judged once per pair
        (most are found from both sides), the lower id's stored features as the query."""
        key = (min(first, second), max(first, second))
        found = self._frames.get(key)
        if found is None:
            query, candidate = (stored_features(self._local, i) for i in key)
            match = local_features.correspondence(query, candidate, self.verification.min_matches)
            found = self._frames[key] = match is not None and shares_only_a_frame(query, candidate, match)
        return found

    def _annoy_ids(self, hits: Sequence[SearchHit]) -> list[int | None]:
        if (self._keypoints is None and not self._needs_ids) or not hits:
            return [None] * len(hits)
        return [r.annoy_id if r is not None else None
                for r in self.index.bundle.find_items([h.item_id for h in hits])]

    def _verifiable(self, annoy_id: int) -> bool:
        """The item has enough keypoints stored that a copy of it would show `copy_inliers` inliers."""
        if self._keypoints is None:
            return False
        count = int(self._keypoints[annoy_id])
        if count < 0:
            try:
                count = len(local_features.from_bytes(self._local.get(annoy_id)))
            except local_features.BadLocalFeatures:
                count = 0  # none, or unreadable: not verified (what the indexer does too)
            self._keypoints[annoy_id] = count
        return count >= self.verification.copy_inliers


def shares_only_a_frame(query: LocalFeatures, candidate: LocalFeatures, match: Correspondence) -> bool:
    """Both images have a hole in their inliers where the other image shows something else: each is a
    different picture in one shared frame, not a copy of the other."""
    try:
        inverse = np.linalg.inv(match.model)
    except np.linalg.LinAlgError:  # a singular homography: nothing to measure, the inliers decide
        return False
    return min(unexplained(query, match.query, match.model, candidate.size),
               unexplained(candidate, match.candidate, inverse, query.size)) > MAX_UNEXPLAINED


def unexplained(features: LocalFeatures, inliers: np.ndarray, model: np.ndarray, other_size: tuple[int, int]) -> float:
    """The share of an image's keypoints that `model` maps inside the other image and that lie farther than
    HOLE_SPACING x the inliers' mean spacing (over that shared part) from every inlier. Scaled by the
    spacing, a copy's few inliers (a blurred copy) are no hole, a missing pasted photo is."""
    shown = features.xy[_inside(_mapped(features.xy, model), other_size)]
    anchors = np.unique(np.rint(features.xy[inliers]), axis=0)
    if not len(shown) or not len(anchors):
        return 0.0
    spacing = np.sqrt(max(_shared_area(features.size, other_size, np.linalg.inv(model)), 1.0) / len(anchors))
    nearest = ((shown[:, None, :] - anchors[None, :, :].astype(np.float32)) ** 2).sum(axis=2).min(axis=1)
    return float((nearest > (HOLE_SPACING * spacing) ** 2).mean())


def _mapped(points: np.ndarray, model: np.ndarray) -> np.ndarray:
    return cv2.perspectiveTransform(points.reshape(-1, 1, 2).astype(np.float64), model).reshape(-1, 2)


def _inside(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return (points[:, 0] >= 0) & (points[:, 1] >= 0) & (points[:, 0] < size[0]) & (points[:, 1] < size[1])


def _frame(size: tuple[int, int]) -> np.ndarray:
    width, height = size
    return np.float32([[0, 0], [width, 0], [width, height], [0, height]])


def _shared_area(size: tuple[int, int], other_size: tuple[int, int], other_to_this: np.ndarray) -> float:
    """The area of an image that the other image (mapped into it) covers."""
    other = _mapped(_frame(other_size), other_to_this).astype(np.float32)
    area, _ = cv2.intersectConvexConvex(_frame(size), other)
    return float(area)


def bounded_map(function: Callable, items: Iterable, workers: int) -> Iterator:
    """function(item) for each item, in order, on `workers` threads with a bounded queue (for millions of
    items). Closing the iterator early drops the calls not started yet."""
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="duplicates") as pool:
        pending: collections.deque = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= 4 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


class UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        root = self.parent.setdefault(item, item)
        while root != self.parent[root]:
            root = self.parent[root]
        while item != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def group_pairs(pairs: Iterable[Pair]) -> list[Group]:
    """Connected groups of the pairs: largest first, items and pairs sorted."""
    sets = UnionFind()
    pairs = list(pairs)
    for pair in pairs:
        sets.union(pair.a, pair.b)
    members: dict[str, list[Pair]] = collections.defaultdict(list)
    for pair in pairs:
        members[sets.find(pair.a)].append(pair)
    groups = [Group(sorted({i for p in found for i in (p.a, p.b)}), sorted(found, key=lambda p: p.key))
              for found in members.values()]
    return sorted(groups, key=lambda g: (-len(g.items), g.items[0]))


class DuplicateScan:
    """One pass over every served item of `index`: iterate it to search the items one by one (it yields
    the count searched so far; stop iterating to stop the work), then read `groups()`.

    Class rules verify the first `verify_top` candidates of each query (DEFAULT_VERIFY_TOP when not given,
    at least k; not the indexer's `Verification.top`) and judge the first k hits after verification (the
    verified ones first, as a search ranks them). `pdq_source`: the bundle's stored hashes when not given
    (`NoPdq("off")` to judge without PDQ). `search_k`: the search effort per item, when not given one
    scaled to the candidates asked (`cbir.bundle.search_k_for`: a bundle's default is set for 50)."""

    def __init__(self, index: SearchIndex, rule: Rule, *, k: int = DEFAULT_K, workers: int = 1,
                 pdq_source: PdqSource | None = None, verify_top: int | None = None, search_k: int | None = None):
        if not 1 <= k <= index.max_k:
            raise InvalidRequest(f"k (the nearest items judged per item) must be between 1 and {index.max_k}, "
                                 f"got {k}")
        if verify_top is not None and not 1 <= verify_top <= MAX_VERIFY_TOP:
            raise InvalidRequest(f"verify_top (the nearest items verified per item) must be between 1 and "
                                 f"{MAX_VERIFY_TOP}, got {verify_top}")
        if search_k is not None and search_k < 0:
            raise InvalidRequest(f"search_k must be >= 0 (0 = the bundle's default), got {search_k}")
        top = max(k, verify_top or DEFAULT_VERIFY_TOP) if rule.verifies else 0
        self.index = index.with_verification(dataclasses.replace(index.verification, top=top))
        self.rule = rule
        self.k = min(k, max(1, index.served_count - 1))
        asked = max(self.k, top) if index.has_local_features else self.k  # the neighbours query_item fetches
        self.search_k = search_k_for(index.bundle.manifest, asked) if search_k is None else search_k
        self.workers = workers
        self.total = index.served_count
        self.searched = 0
        self._judge = PairJudge(self.index, rule, pdq_source)
        self._found: dict[tuple[str, str], Pair] = {}

    def __iter__(self) -> Iterator[int]:
        served = (record for record in self.index.bundle.iter_items() if self.index.serves(record))
        for pairs in bounded_map(self._search, served, self.workers):
            for pair in pairs:
                self._found[pair.key] = self._found[pair.key].merged(pair) if pair.key in self._found else pair
            self.searched += 1
            yield self.searched

    def _search(self, record: ItemRecord) -> list[Pair]:
        hits = self.index.query_item(record.item_id, k=self.k, search_k=self.search_k, exclude_self=True,
                                     min_score=self.rule.min_score)
        return self._judge.pairs(record, hits)

    @property
    def pair_count(self) -> int:
        return len(self._found)

    def groups(self) -> list[Group]:
        return group_pairs(self._found.values())
