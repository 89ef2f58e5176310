"""`write_bundle`: build a new bundle version in a hidden scratch folder next to the final one,
fsync it and rename it into place, so that a crash never leaves a half bundle under a version name;
then (by default) point `current` at it."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cbir.bundle import faiss_index, milvus_index
from cbir.bundle.ann import AUTO, index_choice_problem, resolve_index_type
from cbir.bundle.annoy_index import write_annoy
from cbir.bundle.files import fsync_path, sha256_of
from cbir.bundle.inputs import BundleInputs, InvalidBundleInput, validate_inputs
from cbir.bundle.items import write_items
from cbir.bundle.local_store import write_local_features
from cbir.bundle.pdq_store import write_pdq
from cbir.bundle.layout import (
    FAISS_INDEX_FILE,
    FEATURES_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    ITEMS_FILE,
    LOCAL_FEATURES_FILE,
    LOCAL_OFFSETS_FILE,
    MANIFEST_FILE,
    METRICS,
    PCA_FILE,
    PDQ_FILE,
    is_version_name,
)
from cbir.bundle.manifest import FileEntry, Manifest, MilvusSpec, PcaSpec, model_to_dict
from cbir.bundle.projection import fit_and_save_pca
from cbir.bundle.search_k import default_search_k
from cbir.bundle.versions import set_current
from cbir.errors import BundleError
from cbir.pca import Pca
from cbir.v1 import common_pb2

log = logging.getLogger(__name__)

# Names tried for one second's timestamp (`-01`, `-02`, ...) before giving up.
_MAX_NAME_ATTEMPTS = 99


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
    local_features: Sequence[bytes] | None = None,
    local_features_kind: str = "",
    index_type: str = "annoy",
    index_params: Mapping[str, int] | None = None,
    pdq: np.ndarray | None = None,
    milvus_uri: str | None = None,
) -> Path:
    """Write a new bundle version under `root` and (by default) point `root/current` at it.

    `vectors` is (n, model.dimension), finite, any float dtype (stored as float32); row i belongs
    to `ids[i]`/`urls[i]`/`metadata[i]` and gets Annoy id i. `metadata` entries are mappings
    whose keys and values are stored as strings. With `pca_dimension` > 0 a PCA is fitted to the
    vectors and the index holds their L2-normalised projections. `version` defaults to the UTC
    time (`20261124T120501Z`, with `-01`, `-02`, ... when taken); an explicit version must be new.
    `local_features` (one `cbir.local_features` bytes object per row, b"" for none) are stored for
    geometric verification, described by `local_features_kind` (e.g. "rootsift:500@512").
    `index_type` chooses the index: "annoy" (`trees` trees, `index.ann`), or a faiss index in
    `index.faiss` — "hnsw", "hnsw-sq8", "ivfpq" (angular or euclidean only; see
    `cbir.bundle.faiss_index` for them and for the `index_params` each takes, e.g.
    {"m": 16, "ef_search": 64}; the default effort, ef_search or nprobe, becomes default_search_k), or
    "milvus": a collection of its own in the Milvus at `milvus_uri` (else CBIR_MILVUS_URI, else a milvus-lite
    database in the version folder), HNSW with index_params m, ef_construction, ef_search; making it current
    points the bundle's Milvus alias at it (`cbir.bundle.milvus_index`).
    "auto" is annoy below `ann.AUTO_IVFPQ_ITEMS` items and ivfpq from there (metric permitting).
    `pdq` (one `cbir.pdq.RECORD` per row) is stored for the duplicate finder.
    Returns the version folder. Raises `InvalidBundleInput` (a `BundleError` and a `ValueError`)
    for bad arguments; on any failure nothing is left behind under a version name.
    """
    if index_type == AUTO and index_params:
        raise InvalidBundleInput(f"index_params {dict(index_params)!r} need an index type, not auto: choose one "
                                 "(annoy, hnsw, hnsw-sq8, ivfpq, milvus)")
    problem = index_choice_problem(index_type, metric) or (
        milvus_index.metric_problem(metric) if index_type == "milvus" else "")
    if problem and metric in METRICS:  # an unknown metric is validate_inputs' to name
        raise InvalidBundleInput(problem)
    inputs = validate_inputs(ids, urls, vectors, model, metric, trees, pca_dimension, metadata)
    index_type = resolve_index_type(index_type, len(inputs.ids), metric)  # auto picks only what the metric allows
    trees, pca_dimension = int(trees), int(pca_dimension)
    index_dimension = pca_dimension or inputs.dimension
    if index_type == "annoy":
        if index_params:
            raise InvalidBundleInput(f"index_params {dict(index_params)!r} do not apply to the annoy index (it takes trees)")
        params, default_effort = {}, default_search_k(trees, len(inputs.ids))
    elif index_type == "milvus":
        params, default_effort = milvus_index.plan(index_params)
    else:
        params, default_effort = faiss_index.plan(index_type, len(inputs.ids), index_dimension, index_params)
    if local_features is not None and (len(local_features) != len(inputs.ids) or not local_features_kind):
        raise InvalidBundleInput(f"{len(local_features)} local features for {len(inputs.ids)} items (one per item, "
                                 "with local_features_kind naming them)")
    if pdq is not None and len(pdq) != len(inputs.ids):
        raise InvalidBundleInput(f"{len(pdq)} PDQ records for {len(inputs.ids)} items (one per item)")
    root = Path(root)
    _check_new_version(root, version)
    milvus = milvus_index.new_location(milvus_uri, root.resolve().name, version) if index_type == "milvus" else None
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    collection_written = False  # a Milvus collection exists: drop it if the version is not published
    try:
        pca = _write_data_files(scratch, inputs, metric, trees, pca_dimension, bool(pca_whiten), index_type, params,
                                milvus)
        collection_written = milvus is not None
        if local_features is not None:
            write_local_features(scratch, local_features)
        if pdq is not None:
            write_pdq(scratch, pdq)
        unnamed = Manifest(
            format_version=FORMAT_VERSION, name=root.resolve().name, version="", created_at="",
            model=model_to_dict(model), input_dimension=inputs.dimension,
            index_dimension=index_dimension, metric=metric, index_type=index_type, index_params=params, milvus=milvus,
            trees=trees if index_type == "annoy" else 0,
            item_count=len(inputs.ids), default_search_k=default_effort,
            pca=None if pca is None else PcaSpec(dimension=pca.dimension, whiten=pca.whiten),
            source=source, local_features=local_features_kind if local_features is not None else "",
            files=_file_entries(scratch),
        )
        final = _publish(root, scratch, version, unnamed)
    except BaseException:
        if collection_written:
            _drop_quietly(milvus, scratch)
        raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("wrote bundle %s (%d items, %s, %s)", final, len(inputs.ids), metric,
             f"{trees} trees" if index_type == "annoy" else f"{index_type} {params}")
    if make_current:
        set_current(root, final.name)
        if milvus is not None:
            _point_alias(milvus, final)
    return final


def _drop_quietly(milvus: MilvusSpec, scratch: Path) -> None:
    """A failed build leaves no collection behind (unless Milvus cannot be reached to drop it)."""
    try:
        milvus_index.drop_collection(milvus, scratch)
    except BundleError as error:
        log.warning("could not drop %s after the failed build: %s", milvus_index.describe(milvus), error)


def _point_alias(milvus: MilvusSpec, final: Path) -> None:
    """The version is live (`current`): other Milvus clients follow the alias to its collection. The indexer
    does not use the alias, so a failure here is reported, not raised: the build itself succeeded."""
    try:
        milvus_index.point_alias(milvus, final)
    except BundleError as error:
        log.error("version %s is current, but the Milvus alias %s could not be pointed at its collection: %s",
                  final.name, milvus.alias, error)


def _check_new_version(root: Path, version: str | None) -> None:
    if version is None:
        return
    if not is_version_name(version):
        raise InvalidBundleInput(
            f"version {version!r} is not a valid name (letters, digits, '.', '_', '-'; not starting with '.')"
        )
    if (root / version).exists():
        raise InvalidBundleInput(f"version {version!r} already exists in {root}; versions are immutable")


def _write_data_files(
    scratch: Path, inputs: BundleInputs, metric: str, trees: int, pca_dimension: int, pca_whiten: bool,
    index_type: str, params: Mapping[str, int], milvus: MilvusSpec | None = None,
) -> Pca | None:
    """Features, PCA (when asked), item table and index (Annoy, faiss or a Milvus collection) into the scratch
    folder."""
    np.save(scratch / FEATURES_FILE, inputs.vectors)
    index_vectors = inputs.vectors
    pca = None
    if pca_dimension:
        pca = fit_and_save_pca(inputs.vectors, pca_dimension, pca_whiten, scratch)
        index_vectors = pca.transform(inputs.vectors)
    write_items(scratch / ITEMS_FILE, inputs.ids, inputs.urls, inputs.metadata_rows)
    if index_type == "annoy":
        write_annoy(scratch / INDEX_FILE, index_vectors, metric, trees)
    elif milvus is not None:
        milvus_index.write_milvus(milvus, scratch, ids=inputs.ids, urls=inputs.urls, metadata_rows=inputs.metadata_rows,
                                  vectors=index_vectors, metric=metric, params=params)
    else:
        faiss_index.write_faiss(scratch / FAISS_INDEX_FILE, index_vectors, metric, index_type, params)
    return pca


def _file_entries(scratch: Path) -> dict[str, FileEntry]:
    """Size and sha256 of each data file, each fsynced first."""
    files = {}
    for name in (INDEX_FILE, FAISS_INDEX_FILE, ITEMS_FILE, FEATURES_FILE, PCA_FILE, LOCAL_FEATURES_FILE,
                 LOCAL_OFFSETS_FILE, PDQ_FILE):
        path = scratch / name
        if path.exists():
            fsync_path(path)
            files[name] = FileEntry(sha256=sha256_of(path), bytes=path.stat().st_size)
    return files


def _publish(root: Path, scratch: Path, version: str | None, unnamed: Manifest) -> Path:
    """Name the manifest, write it and rename the scratch folder to that name; without an explicit
    version the name is the UTC time, with a suffix while another writer holds that name."""
    attempt = 0
    while True:
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        name = version or now.strftime("%Y%m%dT%H%M%SZ") + (f"-{attempt:02d}" if attempt else "")
        manifest_path = scratch / MANIFEST_FILE
        created_at = now.isoformat().replace("+00:00", "Z")
        manifest = unnamed.model_copy(update={"version": name, "created_at": created_at})
        manifest_path.write_text(manifest.to_json(), encoding="utf-8")
        fsync_path(manifest_path)
        fsync_path(scratch)
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
            if attempt > _MAX_NAME_ATTEMPTS:
                raise
    fsync_path(root)
    return final
