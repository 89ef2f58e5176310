"""`cbir duplicates`: groups of copies and near-duplicates over a whole index bundle.

The search is the indexer's (`services.indexer.duplicates.DuplicateScan`: every served item queried for
its k nearest items through the bundle's own index, each hit judged as a pair, accepted pairs joined into
groups); this module opens the bundle itself and writes the report as text, JSON or CSV. Items on the
bundle root's deletion list are neither queried nor returned.

Pairs are judged by the core's rules (`services.indexer.duplicates.classify`: PDQ, then geometric
verification, then the global score). PDQ hashes are those `cbir index build` stored in the bundle; a
bundle built without them (an older one, or built without `pdqhash`) has its images hashed here when its
URLs are readable local files (`FilePdq`).
`--class copy` keeps "copy" and "same_image", `--class near-duplicate` "same_image" only;
`--threshold S` keeps the pairs whose global score is >= S (no verification: the fastest pass).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cbir import pdq
from cbir.bundle import open_bundle, read_deleted
from services.indexer import duplicates as core
from services.indexer.duplicates import DEFAULT_K, Group, Pair, Rule, classify  # noqa: F401 (classify: API)
from services.indexer.index import SearchIndex

PDQ_MATCH_BITS = pdq.MATCH_BITS
CSV_COLUMNS = ("group", "item_a", "item_b", "score", "match", "inliers", "decided_by", "pdq", "pdq_distance")


def row(pair: Pair) -> list:
    return [pair.a, pair.b, round(pair.score, 6)]


def evidence(pair: Pair) -> dict:
    return {"match": pair.match, "inliers": pair.inliers, "decided_by": pair.decided_by, "pdq": pair.pdq,
            "pdq_distance": pair.pdq_distance}


@dataclasses.dataclass
class Report:
    rule: Rule
    groups: list[Group]
    items_searched: int
    deleted: int
    seconds: float  # in all: opening (and checking) the bundle, searching, judging
    pdq: str  # where the hashes came from: "stored", "files", "off" or "not_installed"
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


# ------------------------------------------------------------------------------------------ hashes of files
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
    return pdq.load_pdqhash()


class FilePdq:
    """A `PdqSource` for bundles without stored hashes: the items' local image files hashed on first use
    and kept (258 bytes an image)."""

    def __init__(self, pdqhash):
        self._pdqhash = pdqhash
        self._hashes: dict[str, np.ndarray | str] = {}  # URL -> its RECORD, or why there is none

    def of(self, annoy_id: int, url: str) -> np.ndarray | str:
        found = self._hashes.get(url)
        if found is None:
            found = self._hashes[url] = self._compute(url)
        return found

    def _compute(self, url: str) -> np.ndarray | str:
        path = local_path(url)
        if path is None:
            return "not_local"
        try:
            with Image.open(path) as image:
                pixels = pdq.decode(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # missing, unreadable, not an image
            return "unreadable"
        record = pdq.hash_pixels(self._pdqhash, pixels)
        return record if pdq.usable(record) else "low_quality"


def pdq_source(index: SearchIndex, use_pdq: bool) -> tuple[core.PdqSource, str]:
    """The hashes the pairs are judged with, and where they come from ("stored", "files", "off",
    "not_installed")."""
    if not use_pdq:
        return core.NoPdq("off"), "off"
    if index.bundle.pdq is not None:
        return core.StoredPdq(index.bundle.pdq), "stored"
    pdqhash = load_pdq()
    if pdqhash is None:
        return core.NoPdq("not_installed"), "not_installed"
    return FilePdq(pdqhash), "files"


# ------------------------------------------------------------------------------------------ searching
def open_index(bundle: str | Path, k: int) -> SearchIndex:
    """The bundle with its deletion list applied."""
    opened = open_bundle(bundle)
    index = SearchIndex(opened, max_k=max(k, 1))
    index.set_deleted(read_deleted(opened.deleted_list.parent))
    return index


def find_duplicates(bundle: str | Path, rule: Rule | None = None, *, k: int = DEFAULT_K, workers: int = 1,
                    use_pdq: bool = True, progress: bool = True, verify_top: int | None = None,
                    search_k: int | None = None) -> Report:
    """Query every served item of `bundle` for its k nearest, judge each hit, group the accepted pairs
    (`rule`: class "copy" when not given)."""
    started = time.perf_counter()
    rule = rule or Rule()
    index = open_index(bundle, k)
    try:
        hashes, pdq_state = pdq_source(index, use_pdq)
        scan = core.DuplicateScan(index, rule, k=k, workers=workers, pdq_source=hashes, verify_top=verify_top,
                                  search_k=search_k)
        searching = time.perf_counter()
        with tqdm(total=scan.total, unit="item", desc="finding duplicates", disable=not progress,
                  dynamic_ncols=True) as bar:
            for _ in scan:
                bar.update()
        done = time.perf_counter()
        return Report(rule, scan.groups(), scan.searched, index.deleted_count, done - started, pdq_state,
                      done - searching)
    finally:
        index.close()


# ------------------------------------------------------------------------------------------ output
def to_json(report: Report) -> dict:
    return {
        "threshold": report.rule.threshold,
        "class": report.rule.match_class,
        "groups": [{"items": g.items, "pairs": [row(p) for p in g.pairs], "evidence": [evidence(p) for p in g.pairs]}
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

