"""Resumable storage of embedded features: each shard file holds vectors *with their item ids*.

A build writes a shard every `shard_size` items (atomically: temp file, then rename). Started again
after a crash, it loads the shards and embeds only what is missing. Rejected items are recorded too,
so they are not retried on every resume.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import numpy as np


class ShardStore:
    def __init__(self, folder: pathlib.Path, shard_size: int = 1024):
        self.folder = folder
        self.shard_size = shard_size
        self._ids: list[str] = []
        self._vectors: list[np.ndarray] = []
        self._rejected_ids: list[str] = []
        self._reasons: list[str] = []

    def load(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Vectors and rejects already stored by an earlier, interrupted run."""
        vectors: dict[str, np.ndarray] = {}
        rejects: dict[str, str] = {}
        for shard in sorted(self.folder.glob("shard-*.npz")):
            with np.load(shard, allow_pickle=False) as data:
                vectors.update(zip(data["ids"].tolist(), data["vectors"]))
                rejects.update(zip(data["rejected_ids"].tolist(), data["reasons"].tolist()))
        return vectors, rejects

    def add(self, item_id: str, vector: np.ndarray) -> None:
        self._ids.append(item_id)
        self._vectors.append(vector)
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
        number = len(list(self.folder.glob("shard-*.npz")))
        final = self.folder / f"shard-{number:06d}.npz"
        temporary = self.folder / f".tmp-{final.name}"
        dimension = self._vectors[0].shape[0] if self._vectors else 0
        with temporary.open("wb") as handle:
            np.savez(
                handle,
                ids=np.array(self._ids, dtype=str),
                vectors=np.array(self._vectors, dtype=np.float32).reshape(len(self._ids), dimension),
                rejected_ids=np.array(self._rejected_ids, dtype=str),
                reasons=np.array(self._reasons, dtype=str),
            )
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        self._ids, self._vectors, self._rejected_ids, self._reasons = [], [], [], []

    def remove(self) -> None:
        """Delete the shards (once the bundle holds them), and the work folder if nothing else is in it."""
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()
        except OSError:
            pass  # another build's shards are still there
