"""Geometric verification of a query's best candidates, and the match class of each hit.

The global descriptor finds the right photo among the first hundred candidates far more often than
first (devbench copies: top-100 0.97, first 0.86). Verification matches the query's local features
(`cbir.local_features`) against those of the first `top` candidates; candidates with at least
`min_inliers` inliers move to the front, most inliers first (the original of a copy ahead of other
photos of the same printed design, which verify with fewer); the rest keep the global order.

Match classes (a claim to the user). The thresholds are those of the default descriptor (224+448
GeM, not whitened), calibrated on the top-20 hits of the devbench evaluation (BENCHMARKS.md "Match
classes"): another descriptor needs its own (`benchmarks/calibrate_matches.py`).
- "same_image": score >= same_image_score (the same photo, resized, recompressed or mirrored);
- "copy": inliers >= copy_inliers (a crop, rotation, overlay, screenshot ... of the photo), or
  score >= copy_score when the hit was not verified (no local features);
- "similar": score >= similar_score (the same place or object, another photo);
- "": none of these.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from cbir import local_features
from cbir.bundle.local_store import LocalFeatureStore
from cbir.local_features import LocalFeatures

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Verification:
    top: int = 100  # candidates verified per query (0 = none)
    min_inliers: int = 10  # a candidate with this many goes to the front
    same_image_score: float = 0.97
    copy_inliers: int = 12
    copy_score: float = 0.95
    similar_score: float = 0.85
    region_k: int = 10  # nearest items of each of a query's region vectors added to the verified candidates

    @property
    def min_matches(self) -> int:
        """Fewer keypoint matches than this can neither move a candidate nor make it a copy: RANSAC is
        skipped for them (the same ranks and classes, fewer RANSAC runs)."""
        return min(self.min_inliers, self.copy_inliers)

    def match_class(self, score: float, inliers: int, verified: bool) -> str:
        if score >= self.same_image_score:
            return "same_image"
        if inliers >= self.copy_inliers or (not verified and score >= self.copy_score):
            return "copy"
        if score >= self.similar_score:
            return "similar"
        return ""


def stored_features(store: LocalFeatureStore, annoy_id: int) -> LocalFeatures:
    """An item's stored local features; none (EMPTY) when it has none or they cannot be read (a bundle
    written by other code): that item is then not verified, and the query still answers."""
    blob = store.get(annoy_id)
    if not blob:
        return local_features.EMPTY
    try:
        return local_features.from_bytes(blob)
    except local_features.BadLocalFeatures as error:
        log.warning("the local features of item %d cannot be read (%s): not verified", annoy_id, error)
        return local_features.EMPTY


def count_inliers(queries: Sequence[LocalFeatures], store: LocalFeatureStore, annoy_ids: Sequence[int],
                  min_matches: int = local_features.MIN_MATCHES) -> list[int]:
    """Inliers of each candidate (by Annoy id) against the best of `queries` (0 below `min_matches`)."""
    candidates = [stored_features(store, i) for i in annoy_ids]
    return [int(n) for n in local_features.inliers(queries, candidates, min_matches)]
