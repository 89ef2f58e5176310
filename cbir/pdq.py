"""PDQ perceptual hashes (Meta's 256-bit hash, from the optional `pdqhash` package: `pip install 'cbir[pdq]'`).

An image's hash is kept as one `RECORD`: its quality (0-100; `NO_HASH` when there is none) and the 8
hashes of its dihedral transforms (the 4 rotations, each also mirrored), bit-packed to 32 bytes each. Two
images whose hashes are at most `MATCH_BITS` apart over those transforms are the same image (resized,
recompressed, rotated by a right angle, mirrored). Thresholds from facebook/ThreatExchange pdq/README.md:
"Distance Threshold to consider two hashes ... matching: <=31", "Quality Threshold where we recommend
discarding hashes: <=49".
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MATCH_BITS = 31
MIN_QUALITY = 50
SIDE = 512  # images are decoded at about this size for hashing (PDQ itself works on 64 x 64)
NO_HASH = -1  # the quality of an item without a hash (not an image PDQ could read, or made without pdqhash)
RECORD = np.dtype([("quality", "<i2"), ("hashes", "u1", (8, 32))])


def load_pdqhash():
    """The `pdqhash` module, or None when it is not installed."""
    try:
        import pdqhash
    except ImportError:
        return None
    return pdqhash


def empty(count: int) -> np.ndarray:
    """`count` records without a hash."""
    records = np.zeros(count, dtype=RECORD)
    records["quality"] = NO_HASH
    return records


def hash_pixels(pdqhash, pixels: np.ndarray) -> np.ndarray:
    """The record (a 0-d RECORD array) of (H, W, 3) uint8 RGB pixels."""
    hashes, quality = pdqhash.compute_dihedral(np.ascontiguousarray(pixels))
    record = np.zeros((), dtype=RECORD)
    record["quality"] = int(quality)
    record["hashes"] = np.packbits(np.asarray(hashes, dtype=np.uint8), axis=1)
    return record


def hash_bytes(pdqhash, data: bytes) -> np.ndarray:
    """The record of an encoded image; one without a hash when Pillow cannot decode it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = decode(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return empty(1)[0]
    return hash_pixels(pdqhash, pixels)


def decode(image: Image.Image) -> np.ndarray:
    """RGB pixels at about SIDE (JPEG's draft mode scales while decoding: hashing stays cheap)."""
    image.draft("RGB", (SIDE, SIDE))
    image = image.convert("RGB")
    image.thumbnail((SIDE, SIDE))
    return np.asarray(image)


def usable(record: np.ndarray) -> bool:
    return int(record["quality"]) >= MIN_QUALITY


def distance(a: np.ndarray, b: np.ndarray) -> int:
    """Bits apart (of 256) of two records' images, the least over the dihedral transforms of either."""
    ha, hb = a["hashes"], b["hashes"]
    return int(min(np.bitwise_count(ha ^ hb[0]).sum(axis=1).min(), np.bitwise_count(hb ^ ha[0]).sum(axis=1).min()))
