"""The local features of a bundle's items (`cbir.local_features` bytes), for geometric verification:
`local_features.bin` holds every item's bytes back to back in Annoy id order, `local_offsets.npy`
the (item_count + 1,) int64 offsets into it. Both are memory-mapped when opened: a query reads only
the few candidates it verifies."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cbir.bundle.layout import LOCAL_FEATURES_FILE, LOCAL_OFFSETS_FILE, REBUILD
from cbir.errors import BundleError


def pack_blobs(blobs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings -> (their concatenation as uint8, the (len + 1,) int64 offsets into it): how the
    build's shards and the evaluation's cache keep local features in an .npz."""
    return np.frombuffer(b"".join(blobs), np.uint8), np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)


def unpack_blobs(data: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    """Inverse of `pack_blobs`."""
    return [data[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]


def write_local_features(folder: Path, blobs: Sequence[bytes]) -> None:
    """Write one bytes object per item (b"" for an item without keypoints) into `folder`."""
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    with open(folder / LOCAL_FEATURES_FILE, "wb") as handle:
        for i, blob in enumerate(blobs):
            handle.write(blob)
            offsets[i + 1] = offsets[i] + len(blob)
    np.save(folder / LOCAL_OFFSETS_FILE, offsets)


class LocalFeatureStore:
    """Read-only access to the stored bytes of each item; safe from many threads."""

    def __init__(self, folder: Path, item_count: int):
        offsets_path, data_path = folder / LOCAL_OFFSETS_FILE, folder / LOCAL_FEATURES_FILE
        try:
            self._offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
            size = data_path.stat().st_size
            self._data = np.memmap(data_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        except (OSError, ValueError) as error:
            raise BundleError(f"{offsets_path} or {data_path} is unreadable: {error}; {REBUILD}") from error
        if self._offsets.shape != (item_count + 1,) or self._offsets.dtype != np.int64 or \
                int(self._offsets[-1]) != size or int(self._offsets[0]) != 0:
            raise BundleError(f"{offsets_path} does not describe {item_count} items of {data_path} ({size} bytes); "
                              f"{REBUILD}")

    def get(self, annoy_id: int) -> bytes:
        start, end = int(self._offsets[annoy_id]), int(self._offsets[annoy_id + 1])
        return self._data[start:end].tobytes()

    def close(self) -> None:
        if isinstance(self._data, np.memmap):
            self._data._mmap.close()  # noqa: SLF001 - release the mapping now, not at garbage collection
