"""The Annoy file `index.ann`: built straight into the file with a fixed seed, and loaded read-only
by mmap after a size check that catches a manifest whose metric or dimension does not fit it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from annoy import AnnoyIndex

from cbir.bundle.layout import REBUILD
from cbir.errors import BundleError

# Annoy's seed: builds of the same vectors with the same number of threads give the same trees.
ANNOY_SEED = 20261124


def write_annoy(path: Path, vectors: np.ndarray, metric: str, trees: int) -> None:
    """Build an index of `vectors` (row i = Annoy id i) into the file `path`."""
    index = AnnoyIndex(vectors.shape[1], metric)
    index.set_seed(ANNOY_SEED)
    # Build straight into the file: the index never needs to fit in memory twice.
    if not index.on_disk_build(str(path)):
        raise OSError(f"Annoy cannot build into {path}")
    for i, row in enumerate(vectors):
        index.add_item(i, row)
    index.build(trees, n_jobs=-1)
    index.unload()


def _node_bytes(metric: str, dimension: int) -> int:
    # annoylib.h: angular nodes are {int32 n_descendants, int32 children[2], float v[f]};
    # euclidean and manhattan nodes add a float offset `a`.
    return (12 if metric == "angular" else 16) + 4 * dimension


def load_annoy(path: Path, metric: str, dimension: int, *, prefault: bool) -> AnnoyIndex:
    """The index at `path`, mmapped; BundleError when its size cannot be an index of this metric and
    dimension (Annoy itself would load it and answer nonsense)."""
    node = _node_bytes(metric, dimension)
    size = path.stat().st_size
    if size == 0 or size % node:
        raise BundleError(
            f"{path} ({size} bytes) is not an Annoy {metric} index of dimension "
            f"{dimension} (its size must be a multiple of {node} bytes): the manifest's "
            f"metric or dimension does not match the file; {REBUILD}"
        )
    index = AnnoyIndex(dimension, metric)
    try:
        index.load(str(path), prefault=prefault)
    except OSError as error:
        raise BundleError(f"Annoy cannot load {path}: {error}; {REBUILD}") from error
    return index
