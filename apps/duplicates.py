"""`cbir duplicates`: groups of copies and near-duplicates over a whole index bundle.

Found through the bundle's own index, never N x N: every served item is queried for its k nearest
items (`SearchIndex.query_item`, the indexer's code: geometric verification of the candidates with
the stored RootSIFT features when the bundle has them), each hit is judged as a pair, the accepted
pairs are joined into groups (union-find), and every group keeps its pairs with their evidence.
Items on the bundle root's deletion list are neither queried nor returned.

A pair is judged (`classify`) on, strongest first:
- PDQ (Meta's 256-bit perceptual hash, `pdqhash`), computed here for the candidate pairs' images when
  their URLs are readable local files: a Hamming distance <= 31 bits over the 8 rotations and
  mirrors is the same image (PDQ's recommended match threshold; hashes of quality < 50 are not
  used — facebook/ThreatExchange, pdq/README.md). It catches the mirrored and rotated copies
  SIFT misses. A pair PDQ measured apart is not called "same_image" (at most "copy": a crop, an overlay);
- geometric verification: >= `Verification.copy_inliers` inliers is a copy; a pair of two items
  that both have that many keypoints and fewer inliers is no copy, whatever its global score;
- otherwise (no local features, or a textureless image) the global score, by the indexer's rules
  (`Verification.match_class` of an unverified hit).
`--class copy` keeps "copy" and "same_image", `--class near-duplicate` "same_image" only;
`--threshold S` keeps the pairs whose global score is >= S (no verification: the fastest pass).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cbir import local_features
from cbir.bundle import ItemRecord, open_bundle, read_deleted
from services.indexer.index import SearchHit, SearchIndex
from services.indexer.verification import Verification

CLASSES: dict[str, frozenset[str]] = {
    "copy": frozenset({"copy", "same_image"}),
    "near-duplicate": frozenset({"same_image"}),
}
DEFAULT_CLASS = "copy"
DEFAULT_K = 10
PDQ_MATCH_BITS = 31  # ThreatExchange pdq/README.md: "Distance Threshold to consider two hashes ... matching: <=31"
PDQ_MIN_QUALITY = 50  # same README: "Quality Threshold where we recommend discarding hashes: <=49"
PDQ_SIDE = 512  # images are decoded at about this size for hashing (PDQ itself works on 64 x 64)
_STRENGTH = {"": 0, "similar": 1, "copy": 2, "same_image": 3}
CSV_COLUMNS = ("group", "item_a", "item_b", "score", "match", "inliers", "decided_by", "pdq", "pdq_distance")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Which pairs are duplicates: a match class ("copy", "near-duplicate") or a global-score threshold."""

    match_class: str | None = DEFAULT_CLASS
    threshold: float | None = None

    def __post_init__(self):
        if (self.match_class is None) == (self.threshold is None):
            raise ValueError("give exactly one of a match class and a score threshold")
        if self.match_class is not None and self.match_class not in CLASSES:
            raise ValueError(f"unknown class {self.match_class!r}: one of {', '.join(CLASSES)}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"the threshold is a similarity in [0, 1], got {self.threshold}")

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
    decided_by: str = "score"  # "pdq", "inliers" or "score": the evidence the class rests on
    pdq: str = "off"  # match | no_match | low_quality | not_local | unreadable | not_installed | off
    pdq_distance: int | None = None  # bits of 256, the least over the 8 rotations/mirrors

    @property
    def key(self) -> tuple[str, str]:
        return self.a, self.b

    def merged(self, other: Pair) -> Pair:
        """The same pair seen from its other item: the stronger evidence of the two."""
        best = self if _STRENGTH[self.match] >= _STRENGTH[other.match] else other
        return dataclasses.replace(best, score=max(self.score, other.score), inliers=max(self.inliers, other.inliers))

    def row(self) -> list:
        return [self.a, self.b, round(self.score, 6)]

    def evidence(self) -> dict:
        return {"match": self.match, "inliers": self.inliers, "decided_by": self.decided_by, "pdq": self.pdq,
                "pdq_distance": self.pdq_distance}


@dataclasses.dataclass
class Group:
    items: list[str]
    pairs: list[Pair]


@dataclasses.dataclass
class Report:
    rule: Rule
    groups: list[Group]
    items_searched: int
    deleted: int
    seconds: float  # in all: opening (and checking) the bundle, searching, judging
    pdq: str  # "on", "off" or "not_installed"
    search_seconds: float = 0.0  # the pass over the items alone

    @property
    def pair_count(self) -> int:
        return sum(len(g.pairs) for g in self.groups)

    @property
    def items_in_groups(self) -> int:
        return sum(len(g.items) for g in self.groups)

    @property
    def items_per_second(self) -> float:
        return self.items_searched / self.search_seconds if self.search_seconds > 0 else 0.0


# ------------------------------------------------------------------------------------------ judging
def classify(score: float, inliers: int, verifiable: bool, pdq_distance: int | None,
             verification: Verification = Verification()) -> tuple[str, str]:  # noqa: B008 (frozen)
    """(match class, the evidence it rests on) of a pair; see the module docstring."""
    if pdq_distance is not None and pdq_distance <= PDQ_MATCH_BITS:
        return "same_image", "pdq"
    if verifiable:
        if inliers >= verification.copy_inliers:
            match, decided_by = verification.match_class(score, inliers, verified=True), "inliers"
        else:
            match, decided_by = ("similar" if score >= verification.similar_score else ""), "inliers"
    else:
        match, decided_by = verification.match_class(score, 0, verified=False), "score"
    if match == "same_image" and pdq_distance is not None:
        match = "copy"  # PDQ measured both images and they differ: a crop or an edit, not the same image
    return match, decided_by


def local_path(url: str) -> Path | None:
    """The file a file:// URL or a plain path names; None for any other URL."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a path (C:\... on Windows)
        return Path(url)
    return None


def load_pdq():
    """The `pdqhash` module, or None when it is not installed."""
    try:
        import pdqhash
    except ImportError:
        return None
    return pdqhash


class PdqHashes:
    """PDQ hashes of the items' images, computed on first use and kept (256 bytes an image)."""

    def __init__(self, pdqhash):
        self._pdqhash = pdqhash
        self._hashes: dict[str, np.ndarray | str] = {}  # URL -> (8, 32) uint8 packed hashes, or why there are none

    def of(self, url: str) -> np.ndarray | str:
        found = self._hashes.get(url)
        if found is None:
            found = self._hashes[url] = self._compute(url)
        return found

    def _compute(self, url: str) -> np.ndarray | str:
        path = local_path(url)
        if path is None:
            return "not_local"
        try:
            pixels = decode_for_pdq(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # missing, unreadable, not an image
            return "unreadable"
        hashes, quality = self._pdqhash.compute_dihedral(pixels)
        if quality < PDQ_MIN_QUALITY:
            return "low_quality"
        return np.packbits(np.asarray(hashes, dtype=np.uint8), axis=1)

    def distance(self, url_a: str, url_b: str) -> tuple[int | None, str]:
        """(Hamming distance in bits, "match"/"no_match"), or (None, why not)."""
        a, b = self.of(url_a), self.of(url_b)
        for found in (a, b):
            if isinstance(found, str):
                return None, found
        bits = int(min(np.bitwise_count(a ^ b[0]).sum(axis=1).min(), np.bitwise_count(b ^ a[0]).sum(axis=1).min()))
        return bits, "match" if bits <= PDQ_MATCH_BITS else "no_match"


def decode_for_pdq(path: Path) -> np.ndarray:
    """RGB pixels of an image file, decoded at about PDQ_SIDE (JPEG's draft mode scales while decoding)."""
    with Image.open(path) as image:
        image.draft("RGB", (PDQ_SIDE, PDQ_SIDE))
        image = image.convert("RGB")
        image.thumbnail((PDQ_SIDE, PDQ_SIDE))
        return np.asarray(image)


class PairJudge:
    """Turns one item's hits into its accepted pairs (thread-safe: caches only)."""

    def __init__(self, index: SearchIndex, rule: Rule, pdq: PdqHashes | None, pdq_state: str):
        self.index = index
        self.rule = rule
        self.pdq = pdq
        self.pdq_state = pdq_state  # what a pair says when there is no PdqHashes: "off" or "not_installed"
        self.verification = index.verification
        bundle = index.bundle
        verifies = rule.verifies and bundle.local is not None and \
            bundle.manifest.local_features == local_features.DESCRIPTION  # what SearchIndex verifies with
        self._local = bundle.local if verifies else None
        self._keypoints = np.full(index.item_count, -1, dtype=np.int32) if verifies else None

    def pairs(self, record: ItemRecord, hits: Sequence[SearchHit]) -> list[Pair]:
        annoy_ids = self._annoy_ids(hits)
        accepted = []
        for hit, annoy_id in zip(hits, annoy_ids):
            pair = self.judge(record, hit, annoy_id)
            if self.rule.accepts(pair):
                accepted.append(pair)
        return accepted

    def judge(self, record: ItemRecord, hit: SearchHit, hit_annoy_id: int | None) -> Pair:
        verifiable = hit_annoy_id is not None and self._verifiable(record.annoy_id) and self._verifiable(hit_annoy_id)
        match, decided_by = classify(hit.score, hit.inliers, verifiable, None, self.verification)
        distance, state = None, self.pdq_state
        if self.pdq is not None and (match or self.rule.accepts(_pair(record, hit, match))):
            distance, state = self.pdq.distance(record.url, hit.url)
            match, decided_by = classify(hit.score, hit.inliers, verifiable, distance, self.verification)
        return _pair(record, hit, match, decided_by, state, distance)

    def _annoy_ids(self, hits: Sequence[SearchHit]) -> list[int | None]:
        if self._keypoints is None or not hits:
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


def _pair(record: ItemRecord, hit: SearchHit, match: str, decided_by: str = "score", pdq: str = "off",
          distance: int | None = None) -> Pair:
    a, b = sorted((record.item_id, hit.item_id))
    return Pair(a, b, hit.score, match, hit.inliers, decided_by, pdq, distance)


# ------------------------------------------------------------------------------------------ searching
def open_index(bundle: str | Path, rule: Rule, k: int) -> SearchIndex:
    """The bundle with its deletion list applied, verifying the first k candidates of a query (class rules)."""
    opened = open_bundle(bundle)
    index = SearchIndex(opened, max_k=max(k, 1), verification=dataclasses.replace(
        Verification(), top=k if rule.verifies else 0))
    index.set_deleted(read_deleted(opened.deleted_list.parent))
    return index


def served_items(index: SearchIndex, deleted: frozenset[str]) -> Iterator[ItemRecord]:
    """The bundle's items, in index order, without the deleted ones."""
    return (record for record in index.bundle.iter_items() if record.item_id not in deleted)


def bounded_map(function: Callable, items: Iterable, workers: int) -> Iterator:
    """function(item) for each item, in order, on `workers` threads with a bounded queue (for millions of items)."""
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="duplicates") as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ------------------------------------------------------------------------------------------ grouping
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


def find_duplicates(bundle: str | Path, rule: Rule = Rule(), *, k: int = DEFAULT_K, workers: int = 1,
                    use_pdq: bool = True, progress: bool = True) -> Report:
    """Query every served item of `bundle` for its k nearest, judge each hit, group the accepted pairs."""
    started = time.perf_counter()
    pdqhash = load_pdq() if use_pdq else None
    pdq_state = "off" if not use_pdq else ("on" if pdqhash is not None else "not_installed")
    index = open_index(bundle, rule, k)
    try:
        deleted = read_deleted(index.bundle.deleted_list.parent)
        judge = PairJudge(index, rule, PdqHashes(pdqhash) if pdqhash is not None else None,
                          "off" if pdq_state == "on" else pdq_state)
        k = min(k, max(1, index.served_count - 1))

        def search(record: ItemRecord) -> list[Pair]:
            return judge.pairs(record, index.query_item(record.item_id, k=k, exclude_self=True,
                                                        min_score=rule.min_score))

        found: dict[tuple[str, str], Pair] = {}
        searched = 0
        searching = time.perf_counter()
        with tqdm(total=index.served_count, unit="item", desc="finding duplicates", disable=not progress,
                  dynamic_ncols=True) as bar:
            for pairs in bounded_map(search, served_items(index, deleted), workers):
                for pair in pairs:
                    found[pair.key] = found[pair.key].merged(pair) if pair.key in found else pair
                searched += 1
                bar.update()
        done = time.perf_counter()
        return Report(rule, group_pairs(found.values()), searched, index.deleted_count, done - started, pdq_state,
                      done - searching)
    finally:
        index.close()


# ------------------------------------------------------------------------------------------ output
def to_json(report: Report) -> dict:
    return {
        "threshold": report.rule.threshold,
        "class": report.rule.match_class,
        "groups": [{"items": g.items, "pairs": [p.row() for p in g.pairs], "evidence": [p.evidence() for p in g.pairs]}
                   for g in report.groups],
        "summary": summary(report),
    }


def csv_text(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for number, group in enumerate(report.groups, start=1):
        for p in group.pairs:
            writer.writerow([number, p.a, p.b, f"{p.score:.6f}", p.match, p.inliers, p.decided_by, p.pdq,
                             "" if p.pdq_distance is None else p.pdq_distance])
    return buffer.getvalue()


def text(report: Report) -> str:
    lines = []
    for number, group in enumerate(report.groups, start=1):
        lines.append(f"group {number}: {len(group.items)} items")
        lines += [f"  {item}" for item in group.items]
        for p in group.pairs:
            pdq = f"pdq {p.pdq_distance} bits" if p.pdq_distance is not None else f"pdq {p.pdq}"
            lines.append(f"    {p.a} ~ {p.b}  score {p.score:.3f}  inliers {p.inliers}  {p.match or '-'} "
                         f"(by {p.decided_by}; {pdq})")
    if not report.groups:
        lines.append("no duplicates found")
    return "\n".join(lines) + "\n"


def summary(report: Report) -> dict:
    return {"groups": len(report.groups), "pairs": report.pair_count, "items_in_groups": report.items_in_groups,
            "items_searched": report.items_searched, "deleted_left_out": report.deleted,
            "seconds": round(report.seconds, 3), "items_per_second": round(report.items_per_second, 2),
            "pdq": report.pdq}


def summary_line(report: Report) -> str:
    rule = (f"score >= {report.rule.threshold:g}" if report.rule.threshold is not None
            else f"class {report.rule.match_class}")
    return (f"{len(report.groups)} groups, {report.pair_count} pairs, {report.items_in_groups} items in groups "
            f"({rule}; {report.items_searched} items searched, {report.deleted} deleted left out; PDQ {report.pdq}) "
            f"in {report.seconds:.1f} s ({report.items_per_second:.1f} items/s)")


def render(report: Report, fmt: str) -> str:
    """The report as "json", "csv" or "text"."""
    if fmt == "json":
        return json.dumps(to_json(report), indent=2) + "\n"
    if fmt == "csv":
        return csv_text(report)
    return text(report)


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))

