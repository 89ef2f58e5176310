"""The runner of the descriptor models (`resize=keep_aspect` and `resize=squash+keep_aspect`):
source images of any proportions -> descriptors.

Each source image (decoded with its proportions, `images.load_image(source=True)`) goes through one
or more network passes (`Pass`: squashed to 224 x 224, or aspect kept with the longer side at S).
Images of the same shape share one network call (both sides are multiples of 16, so a collection
comes in a few shapes); each block5_conv3 map is pooled in NumPy (`descriptor.pool`), the passes'
descriptors are combined (`descriptor.combine`) and the result is whitened. Asked for `regions`, it
also returns each image's region vectors (`descriptor.region_vectors`) from the map of the last
(largest) aspect-kept pass, whitened alike.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, NamedTuple, Sequence

import numpy as np

from services.embedder.descriptor import Whitening, combine, pool, region_vectors
from services.embedder.images import fit


class Pass(NamedTuple):
    resize: str  # "squash" or "keep_aspect"
    size: int

    def __str__(self) -> str:
        return f"{self.resize}={self.size}"


class AspectRunner:
    """`trunk`: (N, H, W, 3) uint8 -> (N, H/16, W/16, 512). Called with a list of (H, W, 3) uint8 images."""

    def __init__(self, trunk: Callable[[np.ndarray], np.ndarray], *, passes: Sequence[Pass], pooling: str,
                 gem_p: float, whitening: Whitening | None = None, max_batch: int = 32):
        self.trunk = trunk
        self.passes = tuple(passes)
        self.pooling = pooling
        self.gem_p = gem_p
        self.whitening = whitening
        self.max_batch = max_batch

    def __call__(self, images: Sequence[np.ndarray], regions: bool = False) -> np.ndarray:
        """(N, D) vectors; with `regions`, (N, 1 + R, D): each image's vector, then its R region vectors."""
        per_pass, found = [], None
        for step in self.passes:
            described, found = self._describe([fit(image, *step) for image in images],
                                              regions=regions and step.resize == "keep_aspect")
            per_pass.append(described)
        vectors = np.stack([combine([d[i] for d in per_pass]) for i in range(len(images))]) if len(per_pass) > 1 \
            else per_pass[0]
        if regions:
            vectors = np.concatenate([vectors[:, None], found], axis=1)
        if self.whitening is not None:
            vectors = self.whitening.apply(vectors)
        return vectors.astype(np.float32, copy=False)

    def _describe(self, images: list[np.ndarray], regions: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Each image's pooled descriptor, and with `regions` its region vectors (else None)."""
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for index, image in enumerate(images):
            by_shape[image.shape].append(index)
        rows: list[np.ndarray | None] = [None] * len(images)
        windows: list[np.ndarray | None] = [None] * len(images)
        for indexes in by_shape.values():
            for start in range(0, len(indexes), self.max_batch):
                chunk = indexes[start:start + self.max_batch]
                maps = self.trunk(np.stack([images[i] for i in chunk]))
                for i, fmap in zip(chunk, maps):
                    rows[i] = pool(fmap, self.pooling, self.gem_p)
                    if regions:
                        windows[i] = region_vectors(fmap, self.gem_p)
        return np.stack(rows), (np.stack(windows) if regions else None)
