"""Bounded, ordered parallel map: the building block that overlaps I/O and decoding with inference."""

from __future__ import annotations

import collections
from concurrent import futures
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], *, workers: int, lookahead: int
) -> Iterator[R]:
    """Like `executor.map`, but keeps at most `lookahead` tasks queued, so memory stays bounded
    on a collection of millions of images. Results come back in input order."""
    with futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        pending: collections.deque[futures.Future] = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= lookahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
