"""The bundle's optional PCA (`pca.npz`, see `cbir.pca`): fitted and saved at build time, loaded
and checked against the manifest when a bundle is opened."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cbir.bundle.layout import PCA_FILE, REBUILD
from cbir.bundle.manifest import Manifest
from cbir.errors import BundleError
from cbir.pca import Pca, fit_pca


def fit_and_save_pca(vectors: np.ndarray, dimension: int, whiten: bool, folder: Path) -> Pca:
    """Fit a PCA to `vectors` and save it into the version folder being built."""
    pca = fit_pca(vectors, dimension, whiten=whiten)
    pca.save(folder / PCA_FILE)
    return pca


def load_pca(folder: Path, manifest: Manifest) -> Pca | None:
    """The version's PCA, or None when the manifest has none; BundleError when it is unreadable or
    maps other dimensions than the manifest says."""
    if manifest.pca is None:
        return None
    path = folder / PCA_FILE
    try:
        pca = Pca.load(path)
    except ValueError as error:
        raise BundleError(f"{path} is not usable: {error}; {REBUILD}") from error
    expected = (manifest.input_dimension, manifest.pca.dimension, manifest.pca.whiten)
    if (pca.input_dimension, pca.dimension, pca.whiten) != expected:
        raise BundleError(
            f"{path} maps {pca.input_dimension} -> {pca.dimension} dims (whiten={pca.whiten}) but the "
            f"manifest says {manifest.input_dimension} -> {manifest.pca.dimension} (whiten={manifest.pca.whiten}); "
            f"{REBUILD}"
        )
    return pca
