"""`FindDuplicates` over gRPC: the request becomes a `DuplicateScan` of the served index, and its progress,
groups and summary become the stream's messages.

The caller's cancellation or deadline stops the scan: the caller's context is checked after every item.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from cbir.v1 import common_pb2, duplicates_pb2
from services.indexer.duplicates import (
    DEFAULT_CLASS,
    DEFAULT_K,
    DuplicateScan,
    Group,
    Rule,
)
from services.indexer.index import SearchIndex

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.5  # the most often a progress message is sent while the items are searched


def rule_of(request: duplicates_pb2.FindDuplicatesRequest) -> Rule:
    """The request's rule (InvalidRequest, in words, when it is not one): class "copy" when it names none."""
    if request.WhichOneof("rule") == "threshold":
        return Rule(match_class=None, threshold=request.threshold)
    return Rule(request.match_class or DEFAULT_CLASS)


def find_duplicates(index: SearchIndex, rule: Rule, request: duplicates_pb2.FindDuplicatesRequest, context, *,
                    workers: int = 1) -> Iterator[duplicates_pb2.FindDuplicatesResponse]:
    """The stream's messages: progress (first at 0, then at most every PROGRESS_EVERY_S, last at the end), the
    groups (largest first, at most `request.limit`), the summary. Ends early, without a word, when the caller
    has gone away."""
    started = time.perf_counter()
    scan = DuplicateScan(index, rule, k=request.k or DEFAULT_K, workers=workers, verify_top=request.verify_top or None,
                         search_k=request.search_k or None)
    yield _progress(scan)
    reported = time.monotonic()
    for _ in scan:
        if not context.is_active():
            log.info("FindDuplicates stopped: its caller went away after %d of %d items", scan.searched, scan.total)
            return
        if time.monotonic() - reported >= PROGRESS_EVERY_S:
            yield _progress(scan)
            reported = time.monotonic()
    yield _progress(scan)
    groups = scan.groups()
    sent = groups[:request.limit] if request.limit else groups
    for number, group in enumerate(sent, start=1):
        yield duplicates_pb2.FindDuplicatesResponse(group=_group(index, number, group))
    yield duplicates_pb2.FindDuplicatesResponse(summary=duplicates_pb2.DuplicateSummary(
        groups=len(groups), groups_sent=len(sent), pairs=scan.pair_count,
        items_in_groups=sum(len(g.items) for g in groups), items_searched=scan.searched,
        deleted_left_out=index.deleted_count, seconds=time.perf_counter() - started, bundle_version=index.version,
    ))


def _progress(scan: DuplicateScan) -> duplicates_pb2.FindDuplicatesResponse:
    return duplicates_pb2.FindDuplicatesResponse(progress=duplicates_pb2.DuplicateProgress(
        items_searched=scan.searched, items_total=scan.total, pairs_found=scan.pair_count))


def _group(index: SearchIndex, number: int, group: Group) -> duplicates_pb2.DuplicateGroup:
    records = index.bundle.find_items(group.items)
    return duplicates_pb2.DuplicateGroup(
        number=number,
        items=[common_pb2.Item(item_id=r.item_id, url=r.url, metadata=r.metadata) for r in records if r is not None],
        pairs=[duplicates_pb2.DuplicatePair(item_a=p.a, item_b=p.b, score=p.score, inliers=p.inliers, match=p.match,
                                            decided_by=p.decided_by, pdq_distance=p.pdq_distance)
               for p in group.pairs],
    )
