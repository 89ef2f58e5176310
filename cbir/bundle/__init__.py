"""The index bundle: what `cbir index build` writes and the indexer serves. A bundle root holds one
folder per version, immutable once written (`manifest.json` describing it with every file's sha256,
the index — Annoy's `index.ann`, or `index.faiss` for the faiss index types, behind one interface,
`ann.AnnIndex` — the item table `items.sqlite`, the input vectors `features.npy`, and
`pca.npz` when PCA is used, `local_features.bin` + `local_offsets.npy` when the items' local
features are kept for geometric verification, `pdq.npy` when PDQ hashes are), a `current` file naming the live version, and the deletion list
`deleted.txt`; see `layout` for the names, `writing` and `opening` for how a version is written and
verified, `versions` for the root's bookkeeping. Everything other code uses is importable from here."""

from cbir.bundle.ann import AnnIndex
from cbir.bundle.annoy_index import ANNOY_SEED
from cbir.bundle.files import touch_files
from cbir.bundle.inputs import InvalidBundleInput
from cbir.bundle.items import ItemRecord
from cbir.bundle.layout import (
    CURRENT_FILE,
    DELETED_FILE,
    FAISS_INDEX_FILE,
    FEATURES_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    INDEX_TYPES,
    ITEMS_FILE,
    LOCAL_FEATURES_FILE,
    LOCAL_OFFSETS_FILE,
    MANIFEST_FILE,
    METRICS,
    PCA_FILE,
    PDQ_FILE,
    index_file,
)
from cbir.bundle.manifest import FileEntry, Manifest, PcaSpec, model_to_dict
from cbir.bundle.opened import Bundle
from cbir.bundle.opening import open_bundle
from cbir.bundle.search_k import DEFAULT_K, SEARCH_K_FACTOR, default_search_k, search_k_for
from cbir.bundle.versions import (
    add_deleted,
    deleted_list_path,
    list_versions,
    read_current,
    read_deleted,
    remove_deleted,
    set_current,
)
from cbir.bundle.writing import write_bundle

__all__ = [
    "ANNOY_SEED",
    "CURRENT_FILE",
    "DEFAULT_K",
    "DELETED_FILE",
    "FAISS_INDEX_FILE",
    "FEATURES_FILE",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "INDEX_TYPES",
    "ITEMS_FILE",
    "LOCAL_FEATURES_FILE",
    "LOCAL_OFFSETS_FILE",
    "MANIFEST_FILE",
    "METRICS",
    "PCA_FILE",
    "PDQ_FILE",
    "SEARCH_K_FACTOR",
    "AnnIndex",
    "Bundle",
    "FileEntry",
    "InvalidBundleInput",
    "ItemRecord",
    "Manifest",
    "PcaSpec",
    "add_deleted",
    "default_search_k",
    "search_k_for",
    "deleted_list_path",
    "index_file",
    "list_versions",
    "model_to_dict",
    "open_bundle",
    "read_current",
    "read_deleted",
    "remove_deleted",
    "set_current",
    "touch_files",
    "write_bundle",
]
