"""PCA fitted at index-build time and applied to every vector that enters the index.

`fit_pca` mean-centres the vectors, keeps the `dimension` directions of largest variance
(eigenvectors of the covariance, accumulated over row chunks so that a 1M x 4096 collection
needs only a D x D matrix in memory, never a copy of the data; for D = 4096 the work is
about 0.2 s per 1,000 vectors plus ~40 s for the eigendecomposition on 2 CPU cores), and optionally
whitens: each component is divided by sqrt(eigenvalue + eps). `Pca.transform` applies that and
then always L2-normalises, so that every metric compares directions.

The fitted parameters round-trip through `save` / `load` (`pca.npz` in an index bundle).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Whitening divides by sqrt(eigenvalue + eps). eps is relative to the largest eigenvalue so that
# it means the same thing for any scale of input; it keeps near-zero directions (a rank-deficient
# collection: fewer items than dimensions) from being blown up into noise.
WHITEN_EPS_RELATIVE = 1e-6
_CHUNK_ROWS = 8192
_FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class Pca:
    """A fitted projection: `transform(x) = l2norm(((x - mean) @ components.T) * scale)`."""

    mean: np.ndarray  # (input_dimension,) float64
    components: np.ndarray  # (dimension, input_dimension) float32, rows = principal axes
    eigenvalues: np.ndarray  # (dimension,) float64, variance along each axis, descending
    whiten: bool
    eps: float

    @property
    def input_dimension(self) -> int:
        return int(self.components.shape[1])

    @property
    def dimension(self) -> int:
        return int(self.components.shape[0])

    @property
    def scale(self) -> np.ndarray:
        """Per-component factor applied after projection (ones when not whitening)."""
        if not self.whiten:
            return np.ones(self.dimension, dtype=np.float32)
        return (1.0 / np.sqrt(self.eigenvalues + self.eps)).astype(np.float32)

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """Project (n, input_dimension) or (input_dimension,) vectors; float32, L2-normalised rows."""
        array = np.asarray(vectors, dtype=np.float32)
        single = array.ndim == 1
        rows = array.reshape(1, -1) if single else array
        if rows.ndim != 2 or rows.shape[1] != self.input_dimension:
            raise ValueError(
                f"PCA expects vectors of dimension {self.input_dimension}, got shape {array.shape}"
            )
        mean = self.mean.astype(np.float32)
        scale = self.scale
        out = np.empty((rows.shape[0], self.dimension), dtype=np.float32)
        for start in range(0, rows.shape[0], _CHUNK_ROWS):
            chunk = (rows[start : start + _CHUNK_ROWS] - mean) @ self.components.T
            chunk *= scale
            out[start : start + _CHUNK_ROWS] = l2_normalize(chunk)
        return out[0] if single else out

    def save(self, path: str | Path) -> None:
        # Write through an open file: np.savez would append ".npz" to a name without it.
        with open(path, "wb") as f:
            np.savez(
                f,
                format_version=np.int64(_FORMAT_VERSION),
                mean=self.mean,
                components=self.components,
                eigenvalues=self.eigenvalues,
                whiten=np.bool_(self.whiten),
                eps=np.float64(self.eps),
            )

    @classmethod
    def load(cls, path: str | Path) -> "Pca":
        """Read `save`'s file; ValueError when it is not one."""
        try:
            with np.load(path, allow_pickle=False) as data:
                version = int(data["format_version"])
                if version != _FORMAT_VERSION:
                    raise ValueError(f"PCA file format_version {version}, this cbir reads {_FORMAT_VERSION}")
                pca = cls(
                    mean=np.asarray(data["mean"], dtype=np.float64),
                    components=np.asarray(data["components"], dtype=np.float32),
                    eigenvalues=np.asarray(data["eigenvalues"], dtype=np.float64),
                    whiten=bool(data["whiten"]),
                    eps=float(data["eps"]),
                )
        except (KeyError, OSError, EOFError) as error:
            raise ValueError(f"not a cbir PCA file: {error}") from error
        if (
            pca.components.ndim != 2
            or pca.mean.shape != (pca.input_dimension,)
            or pca.eigenvalues.shape != (pca.dimension,)
        ):
            raise ValueError(
                f"inconsistent PCA shapes: mean {pca.mean.shape}, components {pca.components.shape}, "
                f"eigenvalues {pca.eigenvalues.shape}"
            )
        return pca


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32, copy=False)


def fit_pca(vectors: np.ndarray, dimension: int, *, whiten: bool = False) -> Pca:
    """Fit a `dimension`-component PCA to (n, D) vectors. Needs 1 <= dimension < D and dimension <= n."""
    array = np.asarray(vectors)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"PCA needs a non-empty (n, D) array, got shape {array.shape}")
    n, d = array.shape
    if not 1 <= dimension < d:
        raise ValueError(f"PCA dimension must be between 1 and {d - 1} (input dimension {d}), got {dimension}")
    if dimension > n:
        raise ValueError(f"PCA dimension {dimension} is larger than the number of vectors ({n})")

    mean = np.zeros(d, dtype=np.float64)
    for start in range(0, n, _CHUNK_ROWS):
        mean += array[start : start + _CHUNK_ROWS].sum(axis=0, dtype=np.float64)
    mean /= n
    scatter = np.zeros((d, d), dtype=np.float64)
    mean32 = mean.astype(np.float32)
    for start in range(0, n, _CHUNK_ROWS):
        # float32 products (twice the speed of float64), summed across chunks in float64
        chunk = array[start : start + _CHUNK_ROWS].astype(np.float32) - mean32
        scatter += chunk.T @ chunk
    covariance = scatter / max(n - 1, 1)

    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    order = np.argsort(eigenvalues)[::-1][:dimension]
    top_values = np.clip(eigenvalues[order], 0.0, None)
    top_vectors = eigenvectors[:, order].T  # (dimension, d)
    # Fix each axis's sign (largest |coordinate| positive) so that refits give the same projection.
    signs = np.sign(top_vectors[np.arange(dimension), np.abs(top_vectors).argmax(axis=1)])
    top_vectors *= np.where(signs == 0, 1.0, signs)[:, None]
    eps = WHITEN_EPS_RELATIVE * float(max(top_values[0], np.finfo(np.float64).tiny))
    return Pca(
        mean=mean,
        components=top_vectors.astype(np.float32),
        eigenvalues=top_values,
        whiten=whiten,
        eps=eps,
    )
