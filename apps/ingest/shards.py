"""Resumable storage of embedded features: each shard file holds vectors *with their item ids*.

A build writes a shard every `shard_size` items (atomically: temp file, fsync, then rename). Started
again after a crash, it loads the shards and embeds only what is missing. Rejected items are
recorded too, so they are not retried on every resume. Each item's local features (bytes, for
geometric verification) and PDQ hashes (`cbir.pdq.RECORD`) are stored beside its vector. A kill during a write leaves at most a
temporary file, removed on the next load; a shard that cannot be read (a damaged disk) is set aside
with a warning and its items are embedded again. Ids are keys: an item is never counted twice.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import shutil

import numpy as np

from cbir import pdq
from cbir.bundle.local_store import pack_blobs, unpack_blobs

log = logging.getLogger(__name__)
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.npz$")


class ShardStore:
    def __init__(self, folder: pathlib.Path, shard_size: int = 1024):
        self.folder = folder
        self.shard_size = shard_size
        self._ids: list[str] = []
        self._vectors: list[np.ndarray] = []
        self._local: list[bytes] = []
        self._pdq: list[np.ndarray] = []
        self._rejected_ids: list[str] = []
        self._reasons: list[str] = []

    def load(self) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, bytes], dict[str, np.ndarray]]:
        """Vectors, rejects, local features and PDQ records already stored by an earlier, interrupted run."""
        vectors: dict[str, np.ndarray] = {}
        rejects: dict[str, str] = {}
        local: dict[str, bytes] = {}
        hashes: dict[str, np.ndarray] = {}
        for leftover in self.folder.glob(".tmp-*"):
            leftover.unlink(missing_ok=True)  # a write that a kill interrupted
        for shard in self._shards():
            try:
                with np.load(shard, allow_pickle=False) as data:
                    ids, rows = data["ids"].tolist(), data["vectors"]
                    rejected, reasons = data["rejected_ids"].tolist(), data["reasons"].tolist()
                    if rows.shape[0] != len(ids) or len(rejected) != len(reasons):
                        raise ValueError(f"{len(ids)} ids for {rows.shape[0]} vectors")
                    blob, offsets = data["local"], data["local_offsets"]
                    if offsets.shape != (len(ids) + 1,) or int(offsets[-1]) != blob.size:
                        raise ValueError(f"local features for {offsets.size - 1} of {len(ids)} items")
                    records = data["pdq"] if "pdq" in data else pdq.empty(len(ids))  # older shards have none
                    if records.shape != (len(ids),) or records.dtype != pdq.RECORD:
                        raise ValueError(f"PDQ records {records.dtype} {records.shape} for {len(ids)} items")
            except Exception as error:  # noqa: BLE001 - whatever a damaged file raises
                log.warning("shard %s is unreadable (%s): set aside, its items will be embedded again", shard, error)
                shard.rename(shard.with_name(f".damaged-{shard.name}"))
                continue
            vectors.update(zip(ids, rows))
            rejects.update(zip(rejected, reasons))
            local.update(zip(ids, unpack_blobs(blob, offsets)))
            hashes.update(zip(ids, records))
        return vectors, rejects, local, hashes

    def _shards(self) -> list[pathlib.Path]:
        return sorted(p for p in self.folder.glob("shard-*.npz") if _SHARD_RE.match(p.name))

    def add(self, item_id: str, vector: np.ndarray, local: bytes = b"", hashes: np.ndarray | None = None) -> None:
        self._ids.append(item_id)
        self._vectors.append(vector)
        self._local.append(local)
        self._pdq.append(hashes if hashes is not None else pdq.empty(1)[0])
        self._maybe_flush()

    def add_reject(self, item_id: str, reason: str) -> None:
        self._rejected_ids.append(item_id)
        self._reasons.append(reason)
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self._ids) + len(self._rejected_ids) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._ids and not self._rejected_ids:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = self._shards()
        number = int(_SHARD_RE.match(existing[-1].name).group(1)) + 1 if existing else 0
        final = self.folder / f"shard-{number:06d}.npz"
        temporary = self.folder / f".tmp-{final.name}"
        dimension = self._vectors[0].shape[0] if self._vectors else 0
        local, local_offsets = pack_blobs(self._local)
        with temporary.open("wb") as handle:
            np.savez(
                handle,
                ids=np.array(self._ids, dtype=str),
                vectors=np.array(self._vectors, dtype=np.float32).reshape(len(self._ids), dimension),
                rejected_ids=np.array(self._rejected_ids, dtype=str),
                reasons=np.array(self._reasons, dtype=str),
                local=local,
                local_offsets=local_offsets,
                pdq=np.array(self._pdq, dtype=pdq.RECORD).reshape(len(self._ids)),
            )
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a power cut
        finally:
            os.close(fd)
        self._ids, self._vectors, self._local, self._pdq, self._rejected_ids, self._reasons = [], [], [], [], [], []

    def remove(self) -> None:
        """Delete the shards (once the bundle holds them), and the work folder if nothing else is in it."""
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()
        except OSError:
            pass  # another build's shards are still there
