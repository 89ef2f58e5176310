"""`AllowedItems`: the items a filtered query may return, per metadata filter, for one served bundle.

A filter is evaluated over every item (`cbir.bundle.metadata.MetadataColumns`: ~1-5 ms at 1M items
once its fields' columns are read), the deleted items are taken out, and the result (an
`ItemSubset`, which the index backends search within) is kept for the next queries with the same
filter, in any order of its conditions, until the deletion list changes. The most recently used
`size` filters are kept, within `budget` bytes: each takes ~1.1 bytes per item, plus its items' vectors
once an exact search has read them (`cbir.bundle.exact.KEEP_BYTES` at most).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from cbir import metrics
from cbir.bundle import Bundle
from cbir.bundle.subset import ItemSubset
from cbir.filters import Filter

SERVICE = "indexer"
CACHED_FILTERS = 32
CACHE_BYTES = 256 * 2**20


class AllowedItems:
    def __init__(self, bundle: Bundle, size: int = CACHED_FILTERS, budget: int = CACHE_BYTES):
        self._bundle = bundle
        self._size = size
        self._budget = budget
        self._lock = threading.Lock()
        self._cache: OrderedDict[frozenset, tuple[frozenset[int], ItemSubset]] = OrderedDict()

    def subset(self, conditions: Filter, hidden: frozenset[int]) -> ItemSubset | None:
        """The items meeting every condition, less the `hidden` ones; None without conditions (every item may
        come back). FilterError (INVALID_ARGUMENT) for a field the items lack."""
        if not conditions:
            return None
        key = frozenset(conditions)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0] is hidden:
                self._cache.move_to_end(key)
                self._trim()  # the subsets grow when an exact search keeps their vectors
                return cached[1]
        with metrics.stage(SERVICE, "filter"):
            subset = ItemSubset.of(self._bundle.metadata.mask(conditions), hidden)
        with self._lock:
            self._cache[key] = (hidden, subset)
            self._cache.move_to_end(key)
            self._trim()
        return subset

    def _trim(self) -> None:
        """Forget the least recently used filters beyond `size` of them or `budget` bytes (never the newest)."""
        while len(self._cache) > 1 and (len(self._cache) > self._size or
                                        sum(s.nbytes for _, s in self._cache.values()) > self._budget):
            self._cache.popitem(last=False)
