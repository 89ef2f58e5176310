"""The on-disk layout of a bundle: the names of its files, the format version, the metrics Annoy
supports, the rule for version folder names, and the advice every "this bundle is unusable" error
ends with."""

from __future__ import annotations

import re
from typing import Literal, get_args

FORMAT_VERSION = 1
Metric = Literal["angular", "euclidean", "manhattan"]
METRICS: tuple[str, ...] = get_args(Metric)

MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.ann"
ITEMS_FILE = "items.sqlite"
FEATURES_FILE = "features.npy"
PCA_FILE = "pca.npz"
# Geometric verification: every item's local features, and where each starts (cbir.bundle.local_store).
LOCAL_FEATURES_FILE = "local_features.bin"
LOCAL_OFFSETS_FILE = "local_offsets.npy"
CURRENT_FILE = "current"
# Next to the versions: item ids removed from the collection, one per line. The indexer hides them
# from results as soon as the file changes; the next build leaves them out.
DELETED_FILE = "deleted.txt"

REBUILD = "rebuild it with `cbir index build` (it writes a new version and points `current` at it)"

_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def is_version_name(name: str) -> bool:
    """Whether `name` may name a version folder (never a hidden scratch folder, nor `current`)."""
    return bool(_VERSION_NAME.match(name)) and name != CURRENT_FILE
