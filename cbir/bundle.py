"""The index bundle: what `cbir index build` writes and the indexer serves.

On disk a bundle is a root folder holding one folder per version, immutable once written, and a
`current` file naming the live version:

    <root>/
      current                      one line: the live version, e.g. "20261124T120501Z"
      20261124T120501Z/
        manifest.json              what the bundle is (see `Manifest`), with every file's sha256
        index.ann                  Annoy index over the index vectors (after PCA, if any)
        items.sqlite               items(annoy_id INTEGER PRIMARY KEY, item_id TEXT UNIQUE, url, metadata)
        features.npy               the input vectors, float32, row i = Annoy id i
        pca.npz                    only when PCA is used (`cbir.pca.Pca.save`)

Writing goes to a hidden temporary folder next to the final one, which is fsynced and renamed
into place, so a crash never leaves a half bundle under a version name; `current` is replaced
atomically (write a temporary file, fsync, `os.replace`). Readers open a version read-only: the
Annoy file with mmap (processes serving the same bundle share the page cache), the item table
with a read-only SQLite connection per thread.

Search effort: `default_search_k` (recorded in the manifest) is the number of candidates Annoy
inspects when a query does not say, `trees * DEFAULT_K * SEARCH_K_FACTOR` — see `default_search_k`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from annoy import AnnoyIndex

from cbir.errors import BundleError
from cbir.pca import Pca, fit_pca
from cbir.v1 import common_pb2

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METRICS = ("angular", "euclidean", "manhattan")

MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.ann"
ITEMS_FILE = "items.sqlite"
FEATURES_FILE = "features.npy"
PCA_FILE = "pca.npz"
CURRENT_FILE = "current"
# Next to the versions: item ids removed from the collection, one per line. The indexer hides them
# from results as soon as the file changes; the next build leaves them out.
DELETED_FILE = "deleted.txt"

# The k a search uses when it does not say (the seed system's k = 50).
DEFAULT_K = 50
# Annoy's own default inspects `n_trees * k` candidates. Over 100k clustered 512-d unit vectors
# with 30 trees (benchmarks/indexer_recall.py, 2 CPU cores) that gives recall@50 0.76 at 0.5 ms;
# 10x more candidates gives 0.97 at 3.8 ms (20x: 0.99 at 7 ms), still far below an embedder's
# time per image, so the bundle default is SEARCH_K_FACTOR = 10 times Annoy's.
SEARCH_K_FACTOR = 10
# Annoy's seed: builds of the same vectors with the same number of threads give the same trees.
ANNOY_SEED = 20261124

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REBUILD = "rebuild it with `cbir index build` (it writes a new version and points `current` at it)"
_INT32_MAX = 2**31 - 1


def default_search_k(trees: int, item_count: int) -> int:
    """Candidates Annoy inspects by default: `trees * DEFAULT_K * SEARCH_K_FACTOR`.

    Capped at `trees * item_count`, which already visits every leaf of every tree (more is
    pointless), and at Annoy's int32 limit.
    """
    return int(max(1, min(trees * DEFAULT_K * SEARCH_K_FACTOR, trees * item_count, _INT32_MAX)))


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class PcaSpec:
    dimension: int
    whiten: bool


@dataclass(frozen=True)
class Manifest:
    """`manifest.json`, typed. `model` holds every field of `cbir.v1.ModelInfo` by name."""

    format_version: int
    name: str
    version: str
    created_at: str  # RFC 3339, UTC
    model: dict[str, Any]
    input_dimension: int
    index_dimension: int
    metric: str
    trees: int
    item_count: int
    default_search_k: int
    pca: PcaSpec | None
    source: str
    files: dict[str, FileEntry] = field(default_factory=dict)

    @property
    def model_fingerprint(self) -> str:
        return str(self.model.get("fingerprint", ""))

    def model_info(self) -> common_pb2.ModelInfo:
        known = {f.name for f in common_pb2.ModelInfo.DESCRIPTOR.fields}
        return common_pb2.ModelInfo(**{k: v for k, v in self.model.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "created_at": self.created_at,
            "model": dict(self.model),
            "input_dimension": self.input_dimension,
            "index_dimension": self.index_dimension,
            "metric": self.metric,
            "trees": self.trees,
            "item_count": self.item_count,
            "default_search_k": self.default_search_k,
            "pca": None if self.pca is None else {"dimension": self.pca.dimension, "whiten": self.pca.whiten},
            "source": self.source,
            "files": {name: {"sha256": e.sha256, "bytes": e.bytes} for name, e in self.files.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        """Parse and check types; ValueError naming the field that is wrong."""
        if not isinstance(data, dict):
            raise ValueError("the manifest is not a JSON object")

        def get(key: str, kind: type | tuple[type, ...]) -> Any:
            if key not in data:
                raise ValueError(f"field {key!r} is missing")
            value = data[key]
            if isinstance(value, bool) and kind is int or not isinstance(value, kind):
                raise ValueError(f"field {key!r} has the wrong type ({type(value).__name__}: {value!r})")
            return value

        def positive(key: str) -> int:
            value = get(key, int)
            if value < 1:
                raise ValueError(f"field {key!r} must be >= 1, found {value}")
            return value

        model = get("model", dict)
        pca_data = data.get("pca")
        if pca_data is None:
            pca = None
        elif isinstance(pca_data, dict) and isinstance(pca_data.get("dimension"), int) and isinstance(
            pca_data.get("whiten"), bool
        ):
            pca = PcaSpec(dimension=pca_data["dimension"], whiten=pca_data["whiten"])
        else:
            raise ValueError(f"field 'pca' must be null or {{dimension, whiten}}, found {pca_data!r}")
        files: dict[str, FileEntry] = {}
        for name, entry in get("files", dict).items():
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)):
                raise ValueError(f"files[{name!r}] must be {{sha256, bytes}}, found {entry!r}")
            files[name] = FileEntry(sha256=entry["sha256"], bytes=entry["bytes"])
        metric = get("metric", str)
        if metric not in METRICS:
            raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
        return cls(
            format_version=get("format_version", int),
            name=get("name", str),
            version=get("version", str),
            created_at=get("created_at", str),
            model=dict(model),
            input_dimension=positive("input_dimension"),
            index_dimension=positive("index_dimension"),
            metric=metric,
            trees=positive("trees"),
            item_count=positive("item_count"),
            default_search_k=positive("default_search_k"),
            pca=pca,
            source=get("source", str),
            files=files,
        )


def model_to_dict(model: common_pb2.ModelInfo) -> dict[str, Any]:
    """Every field of a ModelInfo by name, defaults included."""
    return {f.name: getattr(model, f.name) for f in model.DESCRIPTOR.fields}


# --------------------------------------------------------------------------- versions and `current`


def list_versions(root: str | Path) -> list[str]:
    """The complete versions under a bundle root, oldest first (temporary build folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and _VERSION_RE.match(p.name) and (p / MANIFEST_FILE).is_file()
    )


def read_current(root: str | Path) -> str | None:
    """The version `root/current` names, or None when there is no `current` file."""
    path = Path(root) / CURRENT_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise BundleError(f"cannot read {path}: {error}") from error
    if not _VERSION_RE.match(text) or text == CURRENT_FILE:
        raise BundleError(
            f"{path} should hold one version name (like 20261124T120501Z) but holds {text[:80]!r}; "
            f"write the name of one of the versions in {path.parent} into it, or {_REBUILD}"
        )
    return text


def set_current(root: str | Path, version: str) -> None:
    """Point `root/current` at `version` atomically (temp file, fsync, os.replace, fsync the folder)."""
    root = Path(root)
    if not (root / version / MANIFEST_FILE).is_file():
        raise BundleError(f"cannot make {version!r} current: {root / version} is not a bundle version")
    fd, tmp = tempfile.mkstemp(prefix=".current-", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / CURRENT_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


# --------------------------------------------------------------------------- deletion list


def deleted_list_path(root: str | Path) -> Path:
    """Where the deletion list of the bundle root `root` is."""
    return Path(root) / DELETED_FILE


def read_deleted(root: str | Path) -> frozenset[str]:
    """The item ids in `root`'s deletion list (empty when there is none)."""
    path = deleted_list_path(root)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return frozenset()
    except (OSError, UnicodeDecodeError) as error:
        raise BundleError(f"cannot read the deletion list {path}: {error}") from error
    return frozenset(item_id for line in text.split("\n") if (item_id := line.rstrip("\r")))


def _write_deleted(root: Path, ids: Iterable[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".deleted-", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(f"{item_id}\n" for item_id in sorted(ids))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, deleted_list_path(root))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(root)


def _check_ids(ids: Iterable[str]) -> list[str]:
    ids = list(ids)
    for item_id in ids:
        if not isinstance(item_id, str) or not item_id or "\n" in item_id or "\r" in item_id:
            raise InvalidBundleInput(f"cannot list {item_id!r} in a deletion list: ids are non-empty, one line each")
    return ids


def add_deleted(root: str | Path, ids: Iterable[str]) -> int:
    """Add ids to `root`'s deletion list (atomically replaced); returns how many were new."""
    root = Path(root)
    ids = _check_ids(ids)
    current = read_deleted(root)
    new = set(ids) - current
    if new:
        _write_deleted(root, current | new)
    return len(new)


def remove_deleted(root: str | Path, ids: Iterable[str]) -> int:
    """Take ids off `root`'s deletion list (they may be indexed again); returns how many were listed."""
    root = Path(root)
    ids = set(_check_ids(ids))
    current = read_deleted(root)
    gone = current & ids
    if gone:
        _write_deleted(root, current - gone)
    return len(gone)


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


# --------------------------------------------------------------------------- writing


class InvalidBundleInput(BundleError, ValueError):
    """write_bundle was given something it cannot build a bundle from."""


def _validate_inputs(ids, urls, vectors, model, metric, trees, pca_dimension, metadata):
    if not isinstance(model, common_pb2.ModelInfo):
        raise InvalidBundleInput(f"model must be a cbir.v1.ModelInfo, got {type(model).__name__}")
    if model.dimension < 1:
        raise InvalidBundleInput("model.dimension must be >= 1 (the length of the model's vectors)")
    if not model.fingerprint:
        raise InvalidBundleInput(
            "model.fingerprint is empty: the bundle must record which model made its vectors"
        )
    ids = list(ids)
    urls = list(urls)
    if not ids:
        raise InvalidBundleInput("no items: ids is empty")
    for i, item_id in enumerate(ids):
        if not isinstance(item_id, str) or not item_id:
            raise InvalidBundleInput(f"ids[{i}] is {item_id!r}: every id must be a non-empty string")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dupes = list(dict.fromkeys(x for x in ids if x in seen or seen.add(x)))
        shown = ", ".join(repr(x) for x in dupes[:5])
        raise InvalidBundleInput(f"ids are not unique: {len(dupes)} ids occur more than once, e.g. {shown}")
    for i, url in enumerate(urls):
        if not isinstance(url, str):
            raise InvalidBundleInput(f"urls[{i}] is {url!r}: every URL must be a string")
    array = np.asarray(vectors)
    if not np.issubdtype(array.dtype, np.floating):
        raise InvalidBundleInput(f"vectors must be floating point (float32), got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise InvalidBundleInput(f"vectors must be a 2-d array (items x dimension), got shape {array.shape}")
    if not len(ids) == len(urls) == array.shape[0]:
        raise InvalidBundleInput(
            f"lengths differ: {len(ids)} ids, {len(urls)} urls, {array.shape[0]} vectors (one of each per item)"
        )
    if array.shape[1] != model.dimension:
        raise InvalidBundleInput(
            f"vectors have dimension {array.shape[1]} but model {model.name or '?'}/{model.feature or '?'} "
            f"makes {model.dimension}-d vectors"
        )
    for start in range(0, array.shape[0], 65536):  # in chunks: no n x d boolean copy of a big collection
        finite = np.isfinite(array[start : start + 65536]).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            raise InvalidBundleInput(f"vectors hold NaN or infinite values, e.g. item {ids[row]!r} (row {row})")
    if metric not in METRICS:
        raise InvalidBundleInput(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    if isinstance(trees, bool) or not isinstance(trees, (int, np.integer)) or trees < 1:
        raise InvalidBundleInput(f"trees must be an integer >= 1, got {trees!r}")
    if isinstance(pca_dimension, bool) or not isinstance(pca_dimension, (int, np.integer)) or pca_dimension < 0:
        raise InvalidBundleInput(f"pca_dimension must be an integer >= 0 (0 = no PCA), got {pca_dimension!r}")
    if pca_dimension and pca_dimension >= model.dimension:
        raise InvalidBundleInput(
            f"pca_dimension {pca_dimension} must be smaller than the input dimension {model.dimension}"
        )
    if pca_dimension and pca_dimension > len(ids):
        raise InvalidBundleInput(
            f"pca_dimension {pca_dimension} is larger than the number of items ({len(ids)}): "
            "PCA cannot find more directions than there are vectors"
        )
    meta_rows: list[str | None]
    if metadata is None:
        meta_rows = [None] * len(ids)
    else:
        metadata = list(metadata)
        if len(metadata) != len(ids):
            raise InvalidBundleInput(f"metadata has {len(metadata)} entries for {len(ids)} items")
        meta_rows = []
        for i, entry in enumerate(metadata):
            if entry is None or (isinstance(entry, Mapping) and not entry):
                meta_rows.append(None)
            elif isinstance(entry, Mapping):
                meta_rows.append(json.dumps({str(k): str(v) for k, v in entry.items()}, ensure_ascii=False))
            else:
                raise InvalidBundleInput(f"metadata[{i}] must be a mapping or None, got {type(entry).__name__}")
    return ids, urls, array, meta_rows


def _write_items(path: Path, ids: Sequence[str], urls: Sequence[str], meta_rows: Sequence[str | None]) -> None:
    conn = sqlite3.connect(path)
    try:
        # The file is built in a scratch folder that is thrown away on failure: no journal needed.
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA user_version=1")
        conn.execute(
            "CREATE TABLE items ("
            " annoy_id INTEGER PRIMARY KEY,"
            " item_id TEXT NOT NULL UNIQUE,"
            " url TEXT NOT NULL,"
            " metadata TEXT"  # JSON object of strings; NULL when the item has none
            ")"
        )
        with conn:
            conn.executemany(
                "INSERT INTO items (annoy_id, item_id, url, metadata) VALUES (?, ?, ?, ?)",
                zip(range(len(ids)), ids, urls, meta_rows),
            )
    finally:
        conn.close()


def _write_annoy(path: Path, vectors: np.ndarray, metric: str, trees: int) -> None:
    index = AnnoyIndex(vectors.shape[1], metric)
    index.set_seed(ANNOY_SEED)
    # Build straight into the file: the index never needs to fit in memory twice.
    if not index.on_disk_build(str(path)):
        raise OSError(f"Annoy cannot build into {path}")
    for i, row in enumerate(vectors):
        index.add_item(i, row)
    index.build(trees, n_jobs=-1)
    index.unload()


def write_bundle(
    root: str | Path,
    *,
    ids: Sequence[str],
    urls: Sequence[str],
    vectors: np.ndarray,
    model: common_pb2.ModelInfo,
    metric: str,
    trees: int,
    pca_dimension: int = 0,
    pca_whiten: bool = False,
    metadata: Sequence[Mapping[str, Any] | None] | None = None,
    source: str = "",
    version: str | None = None,
    make_current: bool = True,
) -> Path:
    """Write a new bundle version under `root` and (by default) point `root/current` at it.

    `vectors` is (n, model.dimension), finite, any float dtype (stored as float32); row i belongs
    to `ids[i]`/`urls[i]`/`metadata[i]` and gets Annoy id i. `metadata` entries are mappings
    whose keys and values are stored as strings. With `pca_dimension` > 0 a PCA is fitted to the
    vectors and the index holds their L2-normalised projections. `version` defaults to the UTC
    time (`20261124T120501Z`, with `-01`, `-02`, ... when taken); an explicit version must be new.
    Returns the version folder. Raises `InvalidBundleInput` (a `BundleError` and a `ValueError`)
    for bad arguments; on any failure nothing is left behind under a version name.
    """
    ids, urls, array, meta_rows = _validate_inputs(ids, urls, vectors, model, metric, trees, pca_dimension, metadata)
    trees = int(trees)
    pca_dimension = int(pca_dimension)
    if version is not None and (not _VERSION_RE.match(version) or version == CURRENT_FILE):
        raise InvalidBundleInput(
            f"version {version!r} is not a valid name (letters, digits, '.', '_', '-'; not starting with '.')"
        )
    root = Path(root)
    if version is not None and (root / version).exists():
        raise InvalidBundleInput(f"version {version!r} already exists in {root}; versions are immutable")
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        np.save(scratch / FEATURES_FILE, array)
        index_vectors = array
        pca: Pca | None = None
        if pca_dimension:
            pca = fit_pca(array, pca_dimension, whiten=bool(pca_whiten))
            pca.save(scratch / PCA_FILE)
            index_vectors = pca.transform(array)
        _write_items(scratch / ITEMS_FILE, ids, urls, meta_rows)
        _write_annoy(scratch / INDEX_FILE, index_vectors, metric, trees)
        del index_vectors

        files = {}
        for name in (INDEX_FILE, ITEMS_FILE, FEATURES_FILE, PCA_FILE):
            path = scratch / name
            if path.exists():
                _fsync_file(path)
                files[name] = FileEntry(sha256=_sha256(path), bytes=path.stat().st_size)

        attempt = 0
        while True:
            now = _utc_now()
            name = version or now.strftime("%Y%m%dT%H%M%SZ") + (f"-{attempt:02d}" if attempt else "")
            manifest = Manifest(
                format_version=FORMAT_VERSION,
                name=root.resolve().name,
                version=name,
                created_at=now.isoformat().replace("+00:00", "Z"),
                model=model_to_dict(model),
                input_dimension=int(array.shape[1]),
                index_dimension=pca_dimension or int(array.shape[1]),
                metric=metric,
                trees=trees,
                item_count=len(ids),
                default_search_k=default_search_k(trees, len(ids)),
                pca=None if pca is None else PcaSpec(dimension=pca.dimension, whiten=pca.whiten),
                source=source,
                files=files,
            )
            manifest_path = scratch / MANIFEST_FILE
            manifest_path.write_text(manifest.to_json(), encoding="utf-8")
            _fsync_file(manifest_path)
            _fsync_dir(scratch)
            final = root / name
            try:
                if final.exists():
                    raise FileExistsError(final)
                os.rename(scratch, final)  # atomic; fails if another writer took the name meanwhile
                break
            except OSError:
                if version is not None:
                    raise InvalidBundleInput(f"version {version!r} already exists in {root}; versions are immutable")
                attempt += 1
                if attempt > 99:
                    raise
        _fsync_dir(root)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("wrote bundle %s (%d items, %s, %d trees)", final, len(ids), metric, trees)
    if make_current:
        set_current(root, name)
    return final


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ItemRecord:
    annoy_id: int
    item_id: str
    url: str
    metadata: dict[str, str]


def _node_bytes(metric: str, dimension: int) -> int:
    # annoylib.h: angular nodes are {int32 n_descendants, int32 children[2], float v[f]};
    # euclidean and manhattan nodes add a float offset `a`.
    return (12 if metric == "angular" else 16) + 4 * dimension


def _resolve(path: Path) -> tuple[Path, Path | None]:
    """(version folder, bundle root or None) for a bundle root or a version folder."""
    if not path.exists():
        raise BundleError(
            f"no index bundle at {path}: the path does not exist. Build one with `cbir index build` "
            f"writing to {path}, or point to an existing bundle"
        )
    if not path.is_dir():
        raise BundleError(f"{path} is a file, not an index bundle folder (a bundle root or a version folder)")
    if (path / CURRENT_FILE).exists():
        version = read_current(path)
        target = path / version
        if not (target / MANIFEST_FILE).is_file():
            found = list_versions(path)
            hint = f"versions found: {', '.join(found[-5:])}; write one of them into {path / CURRENT_FILE}, or " if found else ""
            raise BundleError(
                f"{path / CURRENT_FILE} names version {version!r} but {target} is not a bundle version "
                f"(missing or without {MANIFEST_FILE}); {hint}{_REBUILD}"
            )
        return target, path
    if (path / MANIFEST_FILE).exists():
        return path, None
    found = list_versions(path)
    if found:
        raise BundleError(
            f"{path} has bundle versions ({', '.join(found[-5:])}) but no {CURRENT_FILE} file naming the live one; "
            f"write a version name into {path / CURRENT_FILE} (e.g. `echo {found[-1]} > {path / CURRENT_FILE}`), "
            f"or point to a version folder"
        )
    raise BundleError(
        f"no index bundle at {path}: it has neither a {CURRENT_FILE} file (bundle root) nor a {MANIFEST_FILE} "
        f"(bundle version). Build one with `cbir index build` writing to {path}"
    )


def _read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"cannot read {path}: {error}; the bundle is damaged, {_REBUILD}") from error
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format_version {version!r} but this cbir reads format_version {FORMAT_VERSION}; "
            f"use the cbir release that wrote it, or {_REBUILD}"
        )
    try:
        manifest = Manifest.from_dict(data)
    except ValueError as error:
        raise BundleError(f"{path} is not a valid manifest: {error}; {_REBUILD}") from error
    try:
        model = manifest.model_info()
    except (TypeError, ValueError) as error:
        raise BundleError(f"{path}: field 'model' is not a valid ModelInfo ({error}); {_REBUILD}") from error
    if model.dimension != manifest.input_dimension:
        raise BundleError(
            f"{path}: model.dimension {model.dimension} does not match input_dimension {manifest.input_dimension}; "
            f"{_REBUILD}"
        )
    expected_index_dim = manifest.pca.dimension if manifest.pca else manifest.input_dimension
    if manifest.index_dimension != expected_index_dim:
        raise BundleError(
            f"{path}: index_dimension {manifest.index_dimension} does not match "
            f"{'pca.dimension' if manifest.pca else 'input_dimension'} {expected_index_dim}; {_REBUILD}"
        )
    required = [INDEX_FILE, ITEMS_FILE, FEATURES_FILE] + ([PCA_FILE] if manifest.pca else [])
    missing = [name for name in required if name not in manifest.files]
    if missing:
        raise BundleError(f"{path} does not list {', '.join(missing)} under 'files'; {_REBUILD}")
    return manifest


def _check_files(folder: Path, manifest: Manifest, verify_checksums: bool) -> None:
    for name, entry in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise BundleError(
                f"{path} is missing: the manifest lists it ({entry.bytes} bytes). The bundle is incomplete "
                f"(copied only in part?); copy the whole version folder again, or {_REBUILD}"
            )
        size = path.stat().st_size
        if size != entry.bytes:
            raise BundleError(
                f"{path} is {size} bytes but the manifest records {entry.bytes}: the file is "
                f"{'truncated' if size < entry.bytes else 'larger than written'} or was changed after the bundle "
                f"was written; copy the version folder again, or {_REBUILD}"
            )
    if verify_checksums:
        for name, entry in manifest.files.items():
            digest = _sha256(folder / name)
            if digest != entry.sha256:
                raise BundleError(
                    f"{folder / name} fails its checksum: sha256 {digest[:16]}… but the manifest records "
                    f"{entry.sha256[:16]}…; the file is corrupt or was changed after the bundle was written. "
                    f"Copy the version folder again, or {_REBUILD}"
                )


class Bundle:
    """One opened bundle version. Thread-safe for reads; `close()` only when no reader is left.

    - `manifest`: the typed `Manifest`;
    - `index`: the `AnnoyIndex`, mmapped read-only (queries release the GIL and may run concurrently);
    - `pca`: the fitted `cbir.pca.Pca`, or None;
    - item lookups (`items_by_annoy_ids`, `find_items`) through a read-only SQLite connection per thread;
    - `features()`: the input vectors, memory-mapped.
    """

    def __init__(self, path: Path, root: Path | None, manifest: Manifest, index: AnnoyIndex, pca: Pca | None):
        self.path = path
        self.root = root
        self.manifest = manifest
        self.index = index
        self.pca = pca
        # immutable=1: the file never changes, so SQLite skips locking (and works on read-only mounts).
        self._items_uri = f"file:{urllib.parse.quote(str(path.resolve() / ITEMS_FILE))}?mode=ro&immutable=1"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False

    # -- properties
    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def item_count(self) -> int:
        return self.manifest.item_count

    @property
    def metric(self) -> str:
        return self.manifest.metric

    @property
    def input_dimension(self) -> int:
        return self.manifest.input_dimension

    @property
    def model_fingerprint(self) -> str:
        return self.manifest.model_fingerprint

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def deleted_list(self) -> Path:
        """The deletion list that applies to this version: in its bundle root (the folder holding it)."""
        return deleted_list_path(self.root if self.root is not None else self.path.parent)

    # -- vectors
    def project(self, vectors: np.ndarray) -> np.ndarray:
        """Input vectors -> index vectors: PCA (+ L2 norm) when the bundle has one, else float32 as is."""
        array = np.asarray(vectors, dtype=np.float32)
        return self.pca.transform(array) if self.pca is not None else array

    def features(self) -> np.ndarray:
        """The (item_count, input_dimension) float32 input vectors, memory-mapped read-only."""
        return np.load(self.path / FEATURES_FILE, mmap_mode="r", allow_pickle=False)

    # -- items
    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            with self._lock:
                if self._closed:
                    raise BundleError(f"bundle {self.path} is closed")
                conn = sqlite3.connect(self._items_uri, uri=True, check_same_thread=False)
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    @staticmethod
    def _record(row: tuple) -> ItemRecord:
        annoy_id, item_id, url, metadata = row
        return ItemRecord(annoy_id, item_id, url, json.loads(metadata) if metadata else {})

    def items_by_annoy_ids(self, annoy_ids: Sequence[int]) -> list[ItemRecord]:
        """Records for Annoy ids, in the order given; KeyError for an id the table lacks."""
        found = self._select("annoy_id", [int(i) for i in annoy_ids])
        try:
            return [found[int(i)] for i in annoy_ids]
        except KeyError as error:
            raise KeyError(f"Annoy id {error.args[0]} is not in {self.path / ITEMS_FILE}") from None

    def find_items(self, item_ids: Sequence[str]) -> list[ItemRecord | None]:
        """Records for item ids, in the order given; None where an id is not in the bundle."""
        found = self._select("item_id", list(item_ids))
        return [found.get(i) for i in item_ids]

    def _select(self, column: str, keys: list) -> dict:
        db = self._db()
        out: dict = {}
        position = 0 if column == "annoy_id" else 1
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            rows = db.execute(
                f"SELECT annoy_id, item_id, url, metadata FROM items WHERE {column} IN ({','.join('?' * len(chunk))})",
                chunk,
            ).fetchall()
            for row in rows:
                out[row[position]] = self._record(row)
        return out

    def iter_items(self, batch: int = 10_000) -> Iterable[ItemRecord]:
        """Every item in Annoy id order."""
        db = self._db()
        last = -1
        while True:
            rows = db.execute(
                "SELECT annoy_id, item_id, url, metadata FROM items WHERE annoy_id > ? ORDER BY annoy_id LIMIT ?",
                (last, batch),
            ).fetchall()
            if not rows:
                return
            for row in rows:
                yield self._record(row)
            last = rows[-1][0]

    # -- lifetime
    def close(self) -> None:
        """Unmap the index and close the item table. No query may be running on it any more."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self.index.unload()

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, {self.item_count} items, {self.metric}, dim {self.manifest.index_dimension})"


def open_bundle(
    path: str | Path, *, verify_checksums: bool = True, prefault: bool = False, version: str | None = None
) -> Bundle:
    """Open a bundle root (follows `current`) or a version folder, after checking it.

    Checks: the manifest parses and has format_version 1; every listed file exists with its
    recorded size; with `verify_checksums` (default) every file's sha256 — this reads the whole
    bundle once (about 1.4 GB/s per core when cached, disk speed otherwise: some 25 s for a
    1M x 4096 bundle of ~35 GB), which also warms the page cache; the features and PCA files have
    the manifest's shapes; the Annoy file has the manifest's item count and dimension, and its
    first and last stored vectors equal the (projected) features. `prefault` asks Annoy to read
    the whole index into memory at load (MAP_POPULATE) instead of on first use.
    `version` opens that version of the bundle root `path` instead of the one `current` names.
    Any problem raises `BundleError` saying which file, what was expected and found, and what to do.
    """
    if version is None:
        folder, root = _resolve(Path(path))
    else:
        root = Path(path)
        if not _VERSION_RE.match(version) or version == CURRENT_FILE:
            raise BundleError(f"{version!r} is not a bundle version name")
        folder = root / version
        if not (folder / MANIFEST_FILE).is_file():
            found = list_versions(root)
            raise BundleError(
                f"{folder} is not a bundle version (missing or without {MANIFEST_FILE})"
                + (f"; versions found: {', '.join(found[-5:])}" if found else "")
            )
    manifest = _read_manifest(folder)
    _check_files(folder, manifest, verify_checksums)

    pca = None
    if manifest.pca is not None:
        try:
            pca = Pca.load(folder / PCA_FILE)
        except ValueError as error:
            raise BundleError(f"{folder / PCA_FILE} is not usable: {error}; {_REBUILD}") from error
        if (pca.input_dimension, pca.dimension, pca.whiten) != (
            manifest.input_dimension, manifest.pca.dimension, manifest.pca.whiten
        ):
            raise BundleError(
                f"{folder / PCA_FILE} maps {pca.input_dimension} -> {pca.dimension} dims (whiten={pca.whiten}) but the "
                f"manifest says {manifest.input_dimension} -> {manifest.pca.dimension} (whiten={manifest.pca.whiten}); "
                f"{_REBUILD}"
            )

    try:
        features = np.load(folder / FEATURES_FILE, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise BundleError(f"{folder / FEATURES_FILE} is not a readable .npy file: {error}; {_REBUILD}") from error
    if features.dtype != np.float32 or features.shape != (manifest.item_count, manifest.input_dimension):
        raise BundleError(
            f"{folder / FEATURES_FILE} holds {features.dtype} {features.shape} but the manifest expects float32 "
            f"({manifest.item_count}, {manifest.input_dimension}); {_REBUILD}"
        )

    index_path = folder / INDEX_FILE
    node = _node_bytes(manifest.metric, manifest.index_dimension)
    size = index_path.stat().st_size
    if size == 0 or size % node:
        raise BundleError(
            f"{index_path} ({size} bytes) is not an Annoy {manifest.metric} index of dimension "
            f"{manifest.index_dimension} (its size must be a multiple of {node} bytes): the manifest's "
            f"metric or dimension does not match the file; {_REBUILD}"
        )
    index = AnnoyIndex(manifest.index_dimension, manifest.metric)
    try:
        index.load(str(index_path), prefault=prefault)
    except OSError as error:
        raise BundleError(f"Annoy cannot load {index_path}: {error}; {_REBUILD}") from error
    bundle = Bundle(folder, root, manifest, index, pca)
    try:
        if index.get_n_items() != manifest.item_count:
            raise BundleError(
                f"{index_path} holds {index.get_n_items()} items but the manifest says {manifest.item_count}: "
                f"the index does not belong to this manifest (or its dimension/metric differ); {_REBUILD}"
            )
        for i in sorted({0, manifest.item_count - 1}):
            expected = pca.transform(features[i]) if pca is not None else np.asarray(features[i])
            stored = np.asarray(index.get_item_vector(i), dtype=np.float32)
            if not np.allclose(stored, expected, rtol=1e-4, atol=1e-5):
                raise BundleError(
                    f"{index_path}: the vector stored for Annoy id {i} differs from row {i} of {FEATURES_FILE}"
                    f"{' after PCA' if pca is not None else ''}: the index was built with another dimension or from "
                    f"other vectors than the manifest describes; {_REBUILD}"
                )
        try:
            count = bundle._db().execute("SELECT count(*) FROM items").fetchone()[0]
        except sqlite3.Error as error:
            raise BundleError(f"{folder / ITEMS_FILE} is not a readable item table: {error}; {_REBUILD}") from error
        if count != manifest.item_count:
            raise BundleError(
                f"{folder / ITEMS_FILE} has {count} items but the manifest says {manifest.item_count}; {_REBUILD}"
            )
    except BaseException:
        bundle.close()
        raise
    return bundle
