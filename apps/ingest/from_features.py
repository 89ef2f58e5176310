"""Build an index bundle from stored vectors and their ids, without running the model.

`cbir index build-from-features SOURCE --out DIR` reads vectors someone already has and writes a
bundle with `cbir.bundle.write_bundle`, exactly as `cbir index build` does after embedding:

- re-index an existing bundle with other index settings (index type, metric, trees, PCA) without embedding
  a single image again: SOURCE is a bundle root or version folder (its `features.npy`, item
  table and model are reused);
- features computed elsewhere (a batch job on a GPU host, another copy of the embedder):
  SOURCE is an `.npz` holding `vectors` (n x d) and `ids` (n strings), optionally `urls` (n
  strings) and `model` (the ModelInfo as a JSON string), or an `.npy` of vectors with `--ids`;
- synthetic vectors for scale tests (`benchmarks/scale.py` builds a 1M-item bundle this way).

An `.npy` is opened with mmap: its rows are never copied into memory, so the build's peak memory
is Annoy's, not twice the feature matrix (an `.npz` member is read into memory whole).

The ids come with the vectors, never separately by position guessing: `--ids` is a text file
with one id per line (row i of the vectors belongs to line i), or a CSV/JSONL table with an id
column (`id`, `item_id` or `ImageID`), an optional location column (`url`, `OriginalURL` or
`path`) and other columns kept as metadata. The model that made the vectors must be named
(`--model-info`: a ModelInfo JSON, a bundle manifest, or a bundle) unless the source carries it,
because a bundle records it and the indexer refuses queries from another model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
import urllib.parse
from typing import Any, Sequence

import numpy as np
from google.protobuf import json_format

from cbir.bundle import MANIFEST_FILE, open_bundle, read_deleted, write_bundle
from cbir.v1 import common_pb2
from apps.ingest.sources import csv_rows, jsonl_rows

log = logging.getLogger(__name__)

VECTOR_KEYS = ("vectors", "features")
ID_COLUMNS = ("id", "item_id", "ImageID")
URL_COLUMNS = ("url", "OriginalURL", "path")


class FeaturesError(ValueError):
    """The stored features cannot be used: unknown format, missing ids, ids that do not match the rows."""


@dataclasses.dataclass
class StoredFeatures:
    """Vectors with their ids (row i belongs to ids[i]), and what else the source says about them."""

    ids: list[str]
    vectors: np.ndarray  # (n, d) float; may be a read-only memory map
    urls: list[str]
    metadata: list[dict[str, str]] | None = None
    model: common_pb2.ModelInfo | None = None
    source: str = ""


@dataclasses.dataclass
class FromFeaturesResult:
    bundle: pathlib.Path
    items: int
    dimension: int
    seconds: float


# ------------------------------------------------------------------------------------------ reading


def load_features(source: str | pathlib.Path, *, ids: str | pathlib.Path | None = None) -> StoredFeatures:
    """Read vectors and ids from a bundle, an `.npz`, or an `.npy` (+ `ids`). FeaturesError says what is wrong."""
    path = pathlib.Path(source)
    if not path.exists():
        raise FeaturesError(f"{path}: no such file or folder")
    if path.is_dir():
        if ids is not None:
            raise FeaturesError(f"{path} is a bundle: it has its own ids, do not pass --ids")
        return _from_bundle(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        stored = _from_npz(path, ids)
    elif suffix == ".npy":
        if ids is None:
            raise FeaturesError(
                f"{path} holds only vectors: give their ids with --ids (a text file with one id per line, "
                f"or a CSV/JSONL table with an id column), row i of the vectors belonging to the i-th id"
            )
        try:
            vectors = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise FeaturesError(f"{path} is not a readable .npy file: {error}") from None
        stored = StoredFeatures(ids=[], vectors=vectors, urls=[], source=str(path))
        _apply_ids_file(stored, pathlib.Path(ids))
    else:
        raise FeaturesError(f"{path}: expected a bundle folder, an .npz or an .npy file, not {suffix or 'no suffix'}")
    _check_shape(stored, path)
    return stored


def _from_bundle(path: pathlib.Path) -> StoredFeatures:
    """A bundle's stored vectors and items, less the ids on its root's deletion list."""
    bundle = open_bundle(path, verify_checksums=False)
    try:
        deleted = read_deleted(bundle.root) if bundle.root is not None else frozenset()
        ids, urls, metadata, rows = [], [], [], []
        for record in bundle.iter_items():
            if record.item_id in deleted:
                continue
            ids.append(record.item_id)
            urls.append(record.url)
            metadata.append(record.metadata)
            rows.append(record.annoy_id)
        vectors = bundle.features()  # memory-mapped; copied only when deleted rows must be left out
        if len(rows) != len(vectors):
            log.info("leaving out %d items on the deletion list of %s", len(vectors) - len(rows), bundle.root)
            vectors = np.asarray(vectors[np.asarray(rows, dtype=np.int64)])
        return StoredFeatures(
            ids=ids, vectors=vectors, urls=urls,
            metadata=metadata if any(metadata) else None,
            model=bundle.manifest.model_info(), source=str(bundle.path),
        )
    finally:
        bundle.close()  # the features stay readable: np.load opened its own memory map


def _from_npz(path: pathlib.Path, ids: str | pathlib.Path | None) -> StoredFeatures:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise FeaturesError(f"{path} is not a readable .npz file: {error}") from None
    with archive:
        names = set(archive.files)
        key = next((k for k in VECTOR_KEYS if k in names), None)
        if key is None:
            raise FeaturesError(f"{path} has no array named {' or '.join(VECTOR_KEYS)} (it has: {', '.join(sorted(names))})")
        try:
            stored = StoredFeatures(ids=[], vectors=archive[key], urls=[], source=str(path))
            if "model" in names:
                stored.model = model_info_from_json(str(archive["model"]), where=f"{path}:model")
            if ids is not None:
                _apply_ids_file(stored, pathlib.Path(ids))
            elif "ids" in names:
                stored.ids = _strings(archive["ids"], f"{path}:ids")
                stored.urls = _strings(archive["urls"], f"{path}:urls") if "urls" in names else [""] * len(stored.ids)
            else:
                raise FeaturesError(f"{path} has no 'ids' array: add one (n strings) or give the ids with --ids")
        except ValueError as error:  # e.g. an object array that needs pickle: refused
            if isinstance(error, FeaturesError):
                raise
            if "allow_pickle" in str(error):
                raise FeaturesError(f"{path} holds an object (pickled) array; pickles are never loaded: store the "
                                    f"ids and urls as string arrays (np.asarray(ids, dtype=str))") from None
            raise FeaturesError(f"{path}: {error}") from None
    return stored


def _strings(array: np.ndarray, where: str) -> list[str]:
    if array.ndim != 1 or array.dtype.kind not in "US":
        raise FeaturesError(f"{where} must be a 1-d array of strings, got {array.dtype} {array.shape}")
    if array.dtype.kind == "S":
        return [value.decode("utf-8") for value in array.tolist()]
    return array.tolist()


def _apply_ids_file(stored: StoredFeatures, path: pathlib.Path) -> None:
    if not path.is_file():
        raise FeaturesError(f"{path}: no such ids file")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".jsonl", ".ndjson"):
        rows = csv_rows(path) if suffix == ".csv" else jsonl_rows(path, FeaturesError)
        base = path.resolve().parent
        ids, urls, metadata = [], [], []
        for number, row in rows:
            item_id = _first(row, ID_COLUMNS)
            if not item_id:
                raise FeaturesError(f"{path}:{number}: the row has no id ({' or '.join(ID_COLUMNS)})")
            ids.append(item_id)
            urls.append(_url(_first(row, URL_COLUMNS), base))
            metadata.append({str(k): str(v) for k, v in row.items()
                             if k not in ID_COLUMNS + URL_COLUMNS and v not in (None, "")})
        stored.ids, stored.urls = ids, urls
        stored.metadata = metadata if any(metadata) else None
    else:  # one id per line
        with path.open(encoding="utf-8") as handle:
            stored.ids = [line.rstrip("\r\n") for line in handle]
        while stored.ids and not stored.ids[-1]:
            stored.ids.pop()  # a trailing newline is not an item
        stored.urls = [""] * len(stored.ids)


def _first(row: dict, columns: Sequence[str]) -> str:
    for column in columns:
        value = row.get(column)
        if value not in (None, ""):
            return str(value).strip()
    return ""


def _url(location: str, base: pathlib.Path) -> str:
    if not location or urllib.parse.urlsplit(location).scheme in ("http", "https", "file"):
        return location
    local = pathlib.Path(location)
    return (local if local.is_absolute() else (base / local).resolve()).as_uri()


def _check_shape(stored: StoredFeatures, path: pathlib.Path) -> None:
    vectors = stored.vectors
    if vectors.ndim != 2 or vectors.dtype.kind != "f":
        raise FeaturesError(f"{path}: vectors must be a 2-d float array (items x dimension), got {vectors.dtype} {vectors.shape}")
    if len(stored.ids) != vectors.shape[0]:
        raise FeaturesError(
            f"{path}: {vectors.shape[0]} vectors but {len(stored.ids)} ids; row i of the vectors must belong to "
            f"the i-th id, so there must be exactly one id per row"
        )


# ------------------------------------------------------------------------------------------ the model


def model_info_from_json(text: str, *, where: str) -> common_pb2.ModelInfo:
    """A ModelInfo from JSON: the object itself, or a bundle manifest (its `model` field)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise FeaturesError(f"{where}: not valid JSON ({error.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict):
        raise FeaturesError(f"{where}: expected a JSON object describing the model (a cbir.v1.ModelInfo)")
    try:
        model = json_format.ParseDict(data, common_pb2.ModelInfo(), ignore_unknown_fields=True)
    except json_format.ParseError as error:
        raise FeaturesError(f"{where}: not a valid ModelInfo: {error}") from None
    if not model.fingerprint:
        raise FeaturesError(f"{where}: the model has no 'fingerprint'; a bundle must record which model made its vectors")
    return model


def load_model_info(spec: str | pathlib.Path) -> common_pb2.ModelInfo:
    """The model named by `--model-info`: a ModelInfo/manifest JSON file, or a bundle (root or version)."""
    path = pathlib.Path(spec)
    if path.is_dir():
        if (path / MANIFEST_FILE).is_file() or (path / "current").is_file():
            bundle = open_bundle(path, verify_checksums=False)
            try:
                return bundle.manifest.model_info()
            finally:
                bundle.close()
        raise FeaturesError(f"{path} is a folder but not an index bundle")
    if not path.is_file():
        raise FeaturesError(f"{path}: no such model description (a ModelInfo JSON file, a manifest.json or a bundle)")
    return model_info_from_json(path.read_text(encoding="utf-8"), where=str(path))


# ------------------------------------------------------------------------------------------ building


def build_from_features(
    source: str | pathlib.Path,
    out: str | pathlib.Path,
    *,
    ids: str | pathlib.Path | None = None,
    model: common_pb2.ModelInfo | str | pathlib.Path | None = None,
    metric: str = "angular",
    trees: int = 30,
    pca_dimension: int = 0,
    pca_whiten: bool = False,
    version: str | None = None,
    index_type: str = "annoy",
    index_params: dict[str, int] | None = None,
) -> FromFeaturesResult:
    """Write a new bundle version under `out` from stored features (see the module docstring)."""
    started = time.perf_counter()
    stored = load_features(source, ids=ids)
    if model is not None and not isinstance(model, common_pb2.ModelInfo):
        model = load_model_info(model)
    chosen = model or stored.model
    if chosen is None:
        raise FeaturesError(
            f"{source} does not say which model made its vectors: give --model-info (a bundle built with that "
            f"model, its manifest.json, or a ModelInfo JSON such as the embedder's GetModelInfo answer)"
        )
    if stored.model is not None and model is not None and stored.model.fingerprint != model.fingerprint:
        log.warning("the source records model %s; building with the given model %s instead",
                    stored.model.fingerprint, model.fingerprint)
    if chosen.dimension and chosen.dimension != stored.vectors.shape[1]:
        raise FeaturesError(
            f"{source}: the vectors are {stored.vectors.shape[1]}-d but model {chosen.fingerprint} makes "
            f"{chosen.dimension}-d vectors: they cannot come from that model"
        )
    log.info("building a bundle from %d stored %d-d vectors (%s)", len(stored.ids), stored.vectors.shape[1], source)
    folder = write_bundle(
        out,
        ids=stored.ids,
        urls=stored.urls,
        metadata=stored.metadata,
        vectors=stored.vectors,
        model=chosen,
        metric=metric,
        trees=trees,
        index_type=index_type,
        index_params=index_params or None,
        pca_dimension=pca_dimension,
        pca_whiten=pca_whiten,
        source=stored.source,
        version=version,
    )
    return FromFeaturesResult(folder, len(stored.ids), int(stored.vectors.shape[1]), time.perf_counter() - started)


def save_features(path: str | pathlib.Path, *, ids: Sequence[str], vectors: np.ndarray,
                  urls: Sequence[str] | None = None, model: common_pb2.ModelInfo | None = None) -> pathlib.Path:
    """Write the `.npz` this module reads: `vectors`, `ids`, optional `urls` and `model` (JSON)."""
    arrays: dict[str, Any] = {"vectors": np.asarray(vectors, dtype=np.float32), "ids": np.asarray(list(ids), dtype=str)}
    if urls is not None:
        arrays["urls"] = np.asarray(list(urls), dtype=str)
    if model is not None:
        arrays["model"] = np.asarray(json.dumps(json_format.MessageToDict(model, preserving_proto_field_name=True)))
    path = pathlib.Path(path)
    np.savez(path, **arrays)
    return path
