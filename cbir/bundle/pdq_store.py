"""The PDQ hashes of a bundle's items (`cbir.pdq.RECORD`: quality and the 8 dihedral hashes, 258 bytes an
item) in `pdq.npy`, in Annoy id order; memory-mapped when opened. A bundle written without `pdqhash`
has no such file, and its items are judged without PDQ."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cbir import pdq
from cbir.bundle.files import mapped_npy
from cbir.bundle.layout import PDQ_FILE


def write_pdq(folder: Path, records: np.ndarray) -> None:
    np.save(folder / PDQ_FILE, np.asarray(records, dtype=pdq.RECORD))


def load_pdq(folder: Path, item_count: int) -> np.ndarray:
    """The (item_count,) RECORD array, memory-mapped read-only; BundleError when it is not that."""
    return mapped_npy(folder / PDQ_FILE, pdq.RECORD, (item_count,), f"PDQ records ({item_count},) were expected")
