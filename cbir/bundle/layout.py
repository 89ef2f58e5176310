"""The on-disk layout of a bundle: the names of its files, the format version, the metrics and index
types a bundle may use, the rule for version folder names, and the advice every "this bundle is
unusable" error ends with."""

from __future__ import annotations

import re
from typing import Literal, get_args

FORMAT_VERSION = 1
Metric = Literal["angular", "euclidean", "manhattan"]
METRICS: tuple[str, ...] = get_args(Metric)
# The index behind a bundle, chosen at build time and recorded in the manifest (`index_type`; a
# manifest without it is an Annoy bundle): Annoy's trees, a faiss index (cbir.bundle.faiss_index), or a
# collection in a Milvus server (cbir.bundle.milvus_index).
IndexType = Literal["annoy", "hnsw", "hnsw-sq8", "ivfpq", "milvus"]
INDEX_TYPES: tuple[str, ...] = get_args(IndexType)
FAISS_INDEX_TYPES: tuple[str, ...] = ("hnsw", "hnsw-sq8", "ivfpq")
# The metrics faiss indexes serve: angular (inner product of L2-normalised vectors) and euclidean.
FAISS_METRICS: tuple[str, ...] = ("angular", "euclidean")
# The metrics a Milvus collection serves (COSINE and L2 float-vector metrics; it has no L1).
MILVUS_METRICS: tuple[str, ...] = ("angular", "euclidean")

MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.ann"  # the Annoy index
FAISS_INDEX_FILE = "index.faiss"  # the faiss index (faiss.write_index) of the other index types
ITEMS_FILE = "items.sqlite"
FEATURES_FILE = "features.npy"
PCA_FILE = "pca.npz"
# Geometric verification: every item's local features, and where each starts (cbir.bundle.local_store).
LOCAL_FEATURES_FILE = "local_features.bin"
LOCAL_OFFSETS_FILE = "local_offsets.npy"
# Every item's PDQ perceptual hashes (cbir.pdq.RECORD), when `pdqhash` made them at build time.
PDQ_FILE = "pdq.npy"
# A milvus bundle built without a server: the milvus-lite database (a folder) of its collection, inside the
# version folder (cbir.bundle.milvus_index). Not listed in the manifest's files: milvus-lite writes to it when
# it opens it (its lock and write-ahead log).
MILVUS_LITE_FILE = "milvus.db"
CURRENT_FILE = "current"
# Next to the versions: item ids removed from the collection, one per line. The indexer hides them
# from results as soon as the file changes; the next build leaves them out.
DELETED_FILE = "deleted.txt"

REBUILD = "rebuild it with `cbir index build` (it writes a new version and points `current` at it)"

_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def index_file(index_type: str) -> str:
    """The index file of a bundle of this index type. A milvus bundle keeps its index in a Milvus collection,
    which its manifest names: the manifest is the file that stands for it."""
    if index_type == "milvus":
        return MANIFEST_FILE
    return INDEX_FILE if index_type == "annoy" else FAISS_INDEX_FILE


def is_version_name(name: str) -> bool:
    """Whether `name` may name a version folder (never a hidden scratch folder, nor `current`)."""
    return bool(_VERSION_NAME.match(name)) and name != CURRENT_FILE
