"""The runner of `resize=keep_aspect`: images of any proportions -> descriptors.

Images of the same shape share one network call (the decoded images of a collection come in a
few shapes, since both sides are multiples of 16); each image's block5_conv3 map is then pooled
in NumPy (`descriptor.pool`), its resolutions combined and the result whitened.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from services.embedder.descriptor import Whitening, combine, pool
from services.embedder.images import aspect_size


class AspectRunner:
    """`trunk`: (N, H, W, 3) uint8 -> (N, H/16, W/16, 512). Called with a list of (H, W, 3) uint8 images."""

    def __init__(self, trunk: Callable[[np.ndarray], np.ndarray], *, pooling: str, gem_p: float,
                 scales: Sequence[float] = (1.0,), whitening: Whitening | None = None, max_batch: int = 32):
        self.trunk = trunk
        self.pooling = pooling
        self.gem_p = gem_p
        self.scales = tuple(scales)
        self.whitening = whitening
        self.max_batch = max_batch

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        per_scale = [self._describe([_rescale(image, scale) for image in images]) for scale in self.scales]
        vectors = np.stack([combine([d[i] for d in per_scale]) for i in range(len(images))]) if len(self.scales) > 1 \
            else per_scale[0]
        if self.whitening is not None:
            vectors = self.whitening.apply(vectors)
        return vectors.astype(np.float32, copy=False)

    def _describe(self, images: list[np.ndarray]) -> np.ndarray:
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for index, image in enumerate(images):
            by_shape[image.shape].append(index)
        rows: list[np.ndarray | None] = [None] * len(images)
        for indexes in by_shape.values():
            for start in range(0, len(indexes), self.max_batch):
                chunk = indexes[start:start + self.max_batch]
                maps = self.trunk(np.stack([images[i] for i in chunk]))
                for i, fmap in zip(chunk, maps):
                    rows[i] = pool(fmap, self.pooling, self.gem_p)
        return np.stack(rows)


def _rescale(image: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return image
    height, width = image.shape[:2]
    size = aspect_size(width, height, max(16, round(max(width, height) * scale)))
    resized = Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8))
