"""File-level helpers the bundle code shares: fsync, sha256 checksums, atomic replacement of a small
text file, reading files once to warm the page cache, and opening a checked, memory-mapped .npy."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cbir.bundle.layout import REBUILD
from cbir.errors import BundleError


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def replace_atomically(target: Path, text: str, temp_prefix: str) -> None:
    """Replace `target` with `text` so that readers see the old or the new file, never a mix:
    temporary file, fsync, os.replace, fsync the folder."""
    folder = target.parent
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix, dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(folder)


def touch_files(folder: str | Path, names: Iterable[str], chunk_bytes: int = 1 << 20) -> int:
    """Read files once, sequentially, so that their pages are in the page cache (warm start).
    Returns the bytes read. Unlike MAP_POPULATE this costs no memory beyond the cache."""
    total = 0
    buffer = bytearray(chunk_bytes)
    for name in names:
        path = Path(folder) / name
        try:
            with open(path, "rb", buffering=0) as f:
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                while read := f.readinto(buffer):
                    total += read
        except FileNotFoundError:
            continue
    return total


def mapped_npy(path: Path, dtype, shape: tuple[int, ...], expected: str) -> np.ndarray:
    """The .npy at `path`, memory-mapped read-only; BundleError, saying how to rebuild, when it cannot be read
    or does not hold `shape` of `dtype` (`expected` says what was expected, in words)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise BundleError(f"{path} is not a readable .npy file: {error}; {REBUILD}") from error
    if array.dtype != dtype or array.shape != shape:
        raise BundleError(f"{path} holds {array.dtype} {array.shape} but {expected}; {REBUILD}")
    return array
