"""The PDQ hashes of a bundle's items (`cbir.pdq.RECORD`: quality and the 8 dihedral hashes, 258 bytes an
item) in `pdq.npy`, in Annoy id order; memory-mapped when opened. A bundle written without `pdqhash`
has no such file, and its items are judged without PDQ."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cbir import pdq
from cbir.bundle.layout import PDQ_FILE, REBUILD
from cbir.errors import BundleError


def write_pdq(folder: Path, records: np.ndarray) -> None:
    np.save(folder / PDQ_FILE, np.asarray(records, dtype=pdq.RECORD))


def load_pdq(folder: Path, item_count: int) -> np.ndarray:
    """The (item_count,) RECORD array, memory-mapped read-only; BundleError when it is not that."""
    path = folder / PDQ_FILE
    try:
        records = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise BundleError(f"{path} is not a readable .npy file: {error}; {REBUILD}") from error
    if records.dtype != pdq.RECORD or records.shape != (item_count,):
        raise BundleError(f"{path} holds {records.dtype} {records.shape} but PDQ records ({item_count},) were "
                          f"expected; {REBUILD}")
    return records
