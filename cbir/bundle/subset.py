"""`ItemSubset`: the items a search may return (those a metadata filter allows, less the deleted ones),
in the forms the index backends use: a boolean mask, the sorted item numbers, faiss's bitmap, and
(`kept`) the items' vectors ready for an exact search, once one has run over them."""

from __future__ import annotations

from functools import cached_property

import numpy as np


class ItemSubset:
    """Some of the items 0..count-1 of a bundle. Immutable; shared by concurrent searches."""

    def __init__(self, mask: np.ndarray):
        self.mask = np.asarray(mask, dtype=bool)
        self.mask.setflags(write=False)
        self._size = int(np.count_nonzero(self.mask))
        self._kept = None
        self._kept_bytes = 0

    @classmethod
    def of(cls, mask: np.ndarray, hidden: frozenset[int]) -> "ItemSubset":
        """The items `mask` keeps, without the `hidden` (deleted) ones."""
        mask = np.array(mask, dtype=bool)
        if hidden:
            mask[np.fromiter(hidden, np.int64, len(hidden))] = False
        return cls(mask)

    def __len__(self) -> int:
        return self._size

    @property
    def count(self) -> int:
        """The items of the bundle (allowed or not)."""
        return len(self.mask)

    @property
    def fraction(self) -> float:
        """The share of the bundle's items that are allowed (the filter's selectivity)."""
        return self._size / max(1, self.count)

    @cached_property
    def ids(self) -> np.ndarray:
        """The allowed item numbers, ascending (int64)."""
        return np.flatnonzero(self.mask).astype(np.int64)

    @cached_property
    def bitmap(self) -> np.ndarray:
        """One bit per item, item i at bit i % 8 of byte i // 8: what faiss.IDSelectorBitmap reads."""
        return np.packbits(self.mask, bitorder="little")

    @property
    def nbytes(self) -> int:
        """The memory this subset holds (its mask, and what it keeps)."""
        return self.mask.nbytes + self._kept_bytes

    def kept(self, make, nbytes: int):
        """`make()`, made on the first call and kept with the subset (counted as `nbytes` in `self.nbytes`). Two
        threads may both make it the first time; one of the results is kept."""
        if self._kept is None:
            value = make()
            self._kept, self._kept_bytes = value, nbytes
        return self._kept

    def allows(self, items) -> np.ndarray:
        """Whether each of these item numbers is allowed."""
        return self.mask[np.asarray(items, dtype=np.int64)]
