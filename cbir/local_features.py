"""Local features for geometric verification: RootSIFT keypoints, their compact bytes, and RANSAC.

The embedder extracts them (`extract`) next to the global descriptor and sends them as bytes
(`to_bytes`); the bundle stores them per item; the indexer re-ranks its best candidates by the
number of keypoint matches that one geometric model explains (`inliers`). A copy of a
photo (cropped, rotated, pasted into another, framed, overlaid with text) shares dozens of such
matches with its original, while two different photos share almost none: this is what finds the
copies that the global descriptor ranks second or tenth (BENCHMARKS.md "Geometric verification").

Choices, each measured on devbench copies (BENCHMARKS.md): SIFT (OpenCV) with the RootSIFT
mapping (Arandjelović & Zisserman, CVPR 2012), the 500 strongest keypoints on the image scaled to
a longer side of at most 512 px, Lowe's ratio test at 0.8, a homography by RANSAC within 6 px, and
inliers counted only for a sane model (`_sane`): without that check, clip-art-like images matched
unrelated ones with 40-60 "inliers" of a degenerate homography. The inliers must also spread over at
least 5 % of one of the two images (`MIN_COVERAGE`, the area of their convex hull): the same caption
written on two different photos matched with up to 34 inliers packed into its strip of text; the
check drops 282 of the 310 such pairs among 60 captioned demo photos and keeps the devbench copies
verified (0.971 either way; BENCHMARKS.md "Inlier coverage").

Bytes (`to_bytes`): an 8-byte header (format, kind, count, width, height), positions as uint16 in
quarter pixels, descriptors as uint8 (RootSIFT components x 512): 8 + 132 n bytes, ~66 KB at 500.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Sequence

import cv2
import numpy as np

KIND = "rootsift"
FORMAT = 1
MAX_KEYPOINTS = 500  # an indexed item's, stored in the bundle
# A query's: a copy that shows its original small (pasted into another photo, one tile of a collage) keeps
# few of its original's strongest 500 keypoints; 1,000 on the query side verify most of those (BENCHMARKS.md
# "Query keypoints and finer windows") at no cost to the bundle.
QUERY_KEYPOINTS = 1000
MAX_SIDE = 512
RATIO = 0.8
RANSAC_PX = 6.0
MIN_MATCHES = 6  # RANSAC is not tried on fewer ratio-test matches
MIN_COVERAGE = 0.05  # the inliers' convex hull covers at least this part of the query's or the candidate's image
DESCRIPTION = f"{KIND}:{MAX_KEYPOINTS}@{MAX_SIDE}"  # what a bundle records (ModelInfo.local_features)

_HEADER = struct.Struct("<BBHHH")  # format, kind, count, width, height
_KINDS = {KIND: 1}
_DIM = 128
_SCALE = 512.0  # RootSIFT components are <= ~0.6: x 512 fits uint8 with little loss


class BadLocalFeatures(ValueError):
    """Bytes that are not local features of this format."""


@dataclasses.dataclass(frozen=True)
class LocalFeatures:
    """Keypoint positions (n, 2) float32 in the scaled image, descriptors (n, 128) uint8, that image's (w, h)."""

    xy: np.ndarray
    descriptors: np.ndarray
    size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.xy)


EMPTY = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, _DIM), np.uint8), (0, 0))


def extract(rgb: np.ndarray, max_keypoints: int = MAX_KEYPOINTS, max_side: int = MAX_SIDE) -> LocalFeatures:
    """The strongest `max_keypoints` RootSIFT keypoints of a (H, W, 3) uint8 RGB image, scaled first so
    that its longer side is at most `max_side` (never enlarged)."""
    gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
    height, width = gray.shape
    scale = max_side / max(height, width)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    keypoints, descriptors = cv2.SIFT_create(nfeatures=max_keypoints).detectAndCompute(gray, None)
    size = (gray.shape[1], gray.shape[0])
    if descriptors is None or not keypoints:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, _DIM), np.uint8), size)
    order = np.argsort([-k.response for k in keypoints], kind="stable")[:max_keypoints]
    xy = np.array([keypoints[i].pt for i in order], np.float32)
    sift = descriptors[order].astype(np.float32)
    root = np.sqrt(sift / np.maximum(sift.sum(axis=1, keepdims=True), 1e-7))
    return LocalFeatures(xy, np.clip(np.rint(root * _SCALE), 0, 255).astype(np.uint8), size)


def mirrored(rgb: np.ndarray) -> np.ndarray:
    """The image flipped left-right: SIFT is not mirror-invariant, so a mirrored copy is verified with this."""
    return np.ascontiguousarray(rgb[:, ::-1])


def to_bytes(features: LocalFeatures) -> bytes:
    xy = np.clip(np.rint(features.xy * 4), 0, 65535).astype("<u2")
    header = _HEADER.pack(FORMAT, _KINDS[KIND], len(features), *features.size)
    return header + xy.tobytes() + np.ascontiguousarray(features.descriptors, np.uint8).tobytes()


def from_bytes(data: bytes | memoryview | np.ndarray) -> LocalFeatures:
    """Inverse of `to_bytes`; BadLocalFeatures for anything else."""
    buffer = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else memoryview(data.tobytes())
    if len(buffer) < _HEADER.size:
        raise BadLocalFeatures(f"local features are {len(buffer)} bytes, shorter than their {_HEADER.size}-byte header")
    version, kind, count, width, height = _HEADER.unpack_from(buffer)
    if version != FORMAT or kind != _KINDS[KIND]:
        raise BadLocalFeatures(f"local features of format {version}, kind {kind}: this version reads format "
                               f"{FORMAT}, kind {_KINDS[KIND]} ({KIND})")
    expected = _HEADER.size + count * (4 + _DIM)
    if len(buffer) != expected:
        raise BadLocalFeatures(f"local features of {count} keypoints take {expected} bytes, got {len(buffer)}")
    xy = np.frombuffer(buffer, "<u2", 2 * count, _HEADER.size).reshape(count, 2).astype(np.float32) / 4
    descriptors = np.frombuffer(buffer, np.uint8, count * _DIM, _HEADER.size + 4 * count).reshape(count, _DIM)
    return LocalFeatures(xy, descriptors, (width, height))


def _unit(descriptors: np.ndarray) -> np.ndarray:
    d = descriptors.astype(np.float32)
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-7)


def inliers(queries: Sequence[LocalFeatures], candidates: Sequence[LocalFeatures],
            min_matches: int = MIN_MATCHES) -> np.ndarray:
    """For each candidate, the most inliers of a sane homography between it and any of `queries` (e.g. a
    query and its mirror image). Ratio-test matching for all candidates is one matrix product per query.
    RANSAC (the expensive part) runs only for candidates with at least `min_matches` ratio-test matches,
    the others count 0: a caller that acts only from N inliers passes N (there are never more inliers
    than matches)."""
    out = np.zeros(len(candidates), np.int32)
    longest = max((len(c) for c in candidates), default=0)
    if longest < 2:
        return out
    padded = np.zeros((len(candidates), longest, _DIM), np.float32)  # zero rows never win a match
    for j, candidate in enumerate(candidates):
        if len(candidate):
            padded[j, :len(candidate)] = _unit(candidate.descriptors)
    flat = padded.reshape(-1, _DIM)
    for query in queries:
        if len(query) < 2:
            continue
        good, best = _ratio_matches(query, flat, len(candidates), longest)
        for j in np.nonzero(good.sum(axis=0) >= max(4, min_matches))[0]:
            rows = np.nonzero(good[:, j])[0]
            fit = _fit(query, candidates[j], rows, best[rows, j])
            if fit is not None:
                out[j] = max(out[j], fit.inliers)
    return out


@dataclasses.dataclass(frozen=True)
class Correspondence:
    """The keypoint matches one sane homography explains: `inliers` counts them as `inliers()` does."""

    model: np.ndarray  # 3x3, query -> candidate
    query: np.ndarray  # indices of the query's inlier keypoints
    candidate: np.ndarray  # the candidate's, row for row
    inliers: int


def correspondence(query: LocalFeatures, candidate: LocalFeatures,
                   min_matches: int = MIN_MATCHES) -> Correspondence | None:
    """Which keypoints of the two images the homography of `inliers([query], [candidate])` explains; None when
    that is 0."""
    if len(query) < 2 or len(candidate) < 2:
        return None
    good, best = _ratio_matches(query, _unit(candidate.descriptors), 1, len(candidate))
    rows = np.nonzero(good[:, 0])[0]
    if len(rows) < max(4, min_matches):
        return None
    return _fit(query, candidate, rows, best[rows, 0])


def _fit(query: LocalFeatures, candidate: LocalFeatures, rows: np.ndarray, matched: np.ndarray
         ) -> Correspondence | None:
    """The RANSAC homography taking query keypoints `rows` to their matches `matched` in the candidate; None
    when there is none or it is not sane."""
    source, target = query.xy[rows], candidate.xy[matched]
    model, mask = cv2.findHomography(source, target, cv2.RANSAC, RANSAC_PX, maxIters=1000, confidence=0.995)
    if mask is None:
        return None
    count = _sane(model, mask, source, target, query.size, candidate.size)
    if not count:
        return None
    kept = mask.ravel().astype(bool)
    return Correspondence(model, rows[kept], matched[kept], count)


def _ratio_matches(query: LocalFeatures, flat: np.ndarray, count: int, longest: int) -> tuple[np.ndarray, np.ndarray]:
    """(good (query keypoints, candidates): passes Lowe's ratio test, best: the candidate keypoint matched) of
    a query against `count` candidates' unit descriptors, each padded with zero rows to `longest` (>= 2)."""
    similarity = (_unit(query.descriptors) @ flat.T).reshape(len(query), count, longest)
    best = similarity.argmax(axis=2)
    first = np.take_along_axis(similarity, best[..., None], 2)[..., 0]
    np.put_along_axis(similarity, best[..., None], -np.inf, 2)
    second = similarity.max(axis=2)
    d1 = np.sqrt(np.maximum(2 - 2 * first, 0))
    d2 = np.sqrt(np.maximum(2 - 2 * second, 0))
    return (d1 < RATIO * d2) & (first > 0), best


def _sane(model: np.ndarray | None, mask: np.ndarray, source: np.ndarray, target: np.ndarray,
          query_size: tuple[int, int], candidate_size: tuple[int, int]) -> int:
    """Inliers counted as distinct points on both sides; 0 for a degenerate model (area scaled by more than
    64x either way, or the query's frame mapped to a non-convex shape) or for inliers packed into a small
    part of both images (`MIN_COVERAGE`)."""
    if model is None:
        return 0
    linear = model[:2, :2] / max(abs(model[2, 2]), 1e-9)
    if not 1 / 64 < abs(float(np.linalg.det(linear))) < 64:
        return 0
    width, height = query_size
    frame = np.float32([[0, 0], [width, 0], [width, height], [0, height]]).reshape(-1, 1, 2)
    projected = cv2.perspectiveTransform(frame, model.astype(np.float64)).reshape(-1, 2)
    if not np.isfinite(projected).all() or not cv2.isContourConvex(projected.astype(np.float32)):
        return 0
    kept = mask.ravel().astype(bool)
    if max(_coverage(source[kept], query_size), _coverage(target[kept], candidate_size)) < MIN_COVERAGE:
        return 0
    return int(min(len(np.unique(np.rint(source[kept]), axis=0)), len(np.unique(np.rint(target[kept]), axis=0))))


def _coverage(points: np.ndarray, size: tuple[int, int]) -> float:
    """The area of the convex hull of `points` as a fraction of a (width, height) image."""
    if len(points) < 3 or size[0] * size[1] == 0:
        return 0.0
    return float(cv2.contourArea(cv2.convexHull(points.astype(np.float32)))) / (size[0] * size[1])
