"""cbir.local_features: RootSIFT extraction, its bytes, RANSAC inliers and re-ranking, on real demo photos."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
from PIL import Image

from cbir import local_features as lf
from cbir.local_features import BadLocalFeatures

PHOTOS = pathlib.Path(__file__).resolve().parent.parent / "demo" / "photos"
ORIGINAL = "opencv-home.jpg"  # 512 x 384, 500 keypoints
# Textured real photos that have nothing to do with ORIGINAL (each gives hundreds of keypoints).
UNRELATED = [
    "lomiri-friends_by_aitzol_berasategi.jpg", "skimage-astronaut.jpg", "opencv-graf1.jpg", "opencv-building.jpg",
    "skimage-coffee.jpg", "opencv-baboon.jpg", "opencv-messi5.jpg", "lomiri-life_by_aitzol_berasategi.jpg",
    "opencv-starry_night.jpg", "skimage-motorcycle_left.jpg",
]


def rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(PHOTOS / name).convert("RGB"))


def jpeg(array: np.ndarray, quality: int = 75) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def cropped_rotated(name: str, keep: float = 0.5, angle: float = 20.0) -> np.ndarray:
    """An edited copy: `keep` of the width and height (off centre), rotated by `angle` degrees, JPEG q75."""
    image = Image.open(PHOTOS / name).convert("RGB")
    width, height = image.size
    left, top = round(width * 0.3), round(height * 0.2)
    crop = image.crop((left, top, left + round(width * keep), top + round(height * keep)))
    return jpeg(np.asarray(crop.rotate(angle, expand=True, resample=Image.BICUBIC)))


@pytest.fixture(scope="module")
def original() -> lf.LocalFeatures:
    return lf.extract(rgb(ORIGINAL))


@pytest.fixture(scope="module")
def unrelated() -> list[lf.LocalFeatures]:
    return [lf.extract(rgb(name)) for name in UNRELATED]


# -- extraction


@pytest.mark.parametrize("name,size", [
    ("lomiri-friends_by_aitzol_berasategi.jpg", (341, 512)),  # 682 x 1024 portrait: scaled down by 2
    ("opencv-building.jpg", (512, 354)),  # 868 x 600
    ("opencv-home.jpg", (512, 384)),  # already 512 x 384: unchanged
    ("skimage-chelsea.jpg", (451, 300)),  # smaller than 512: never enlarged
])
def test_extract_keeps_at_most_500_rootsift_keypoints_inside_the_scaled_image(name, size):
    """The image is scaled to a longer side <= 512 (never up), at most 500 keypoints lie inside it, and the
    descriptors are RootSIFT x 512 as uint8 (each has an L2 norm of about 512)."""
    features = lf.extract(rgb(name))
    assert features.size == size
    assert 300 <= len(features) <= lf.MAX_KEYPOINTS == 500
    assert features.xy.dtype == np.float32 and features.xy.shape == (len(features), 2)
    assert features.descriptors.dtype == np.uint8 and features.descriptors.shape == (len(features), 128)
    width, height = size
    assert (features.xy[:, 0] >= 0).all() and (features.xy[:, 0] < width).all()
    assert (features.xy[:, 1] >= 0).all() and (features.xy[:, 1] < height).all()
    norms = np.linalg.norm(features.descriptors.astype(np.float32), axis=1)
    assert norms.min() > 480 and norms.max() < 540  # sqrt of an L1-normalised SIFT has unit L2 norm


def test_extract_honours_a_smaller_keypoint_budget_and_side():
    """`max_keypoints` and `max_side` bound the keypoints and the scaled image; a grey image works too."""
    gray = np.asarray(Image.open(PHOTOS / "opencv-graf1.jpg").convert("L"))  # 800 x 640
    features = lf.extract(gray, max_keypoints=40, max_side=200)
    assert features.size == (200, 160)
    assert 20 <= len(features) <= 40
    assert (features.xy < np.array([200, 160])).all()


def test_extract_of_an_all_black_image_has_no_keypoints_and_its_size():
    """A featureless image gives empty features (with the scaled size), which still serialise to 8 bytes."""
    features = lf.extract(np.zeros((600, 900, 3), np.uint8))
    assert len(features) == 0 and features.size == (512, 341)
    assert features.xy.shape == (0, 2) and features.descriptors.shape == (0, 128)
    blob = lf.to_bytes(features)
    assert len(blob) == 8
    back = lf.from_bytes(blob)
    assert len(back) == 0 and back.size == (512, 341)


def test_mirrored_flips_left_right():
    """`mirrored` is the left-right flip, contiguous (OpenCV needs that)."""
    image = rgb("opencv-messi5.jpg")
    flipped = lf.mirrored(image)
    assert flipped.flags["C_CONTIGUOUS"] and flipped.shape == image.shape
    assert np.array_equal(flipped[:, 0], image[:, -1]) and np.array_equal(flipped[:, ::-1], image)


# -- bytes


def test_bytes_round_trip_exactly_with_positions_to_a_quarter_pixel(original):
    """to_bytes -> from_bytes keeps descriptors and size exactly and positions within 1/8 px (quarter-pixel
    grid); bytes -> features -> bytes is the identity; the size is 8 + 132 n bytes; memoryview and a uint8
    array are read like bytes."""
    blob = lf.to_bytes(original)
    assert len(blob) == 8 + 132 * len(original) == 8 + 132 * 500
    back = lf.from_bytes(blob)
    assert back.size == original.size == (512, 384)
    assert np.array_equal(back.descriptors, original.descriptors)
    assert np.abs(back.xy - original.xy).max() <= 0.125 + 1e-6
    assert np.array_equal(back.xy * 4, np.rint(back.xy * 4))  # on the quarter-pixel grid
    assert lf.to_bytes(back) == blob
    assert lf.to_bytes(lf.from_bytes(memoryview(blob))) == blob
    assert lf.to_bytes(lf.from_bytes(np.frombuffer(blob, np.uint8))) == blob


def _bad(blob) -> str:
    with pytest.raises(BadLocalFeatures) as excinfo:
        lf.from_bytes(blob)
    assert isinstance(excinfo.value, ValueError)
    message = str(excinfo.value)
    assert "Traceback" not in message and "struct" not in message and "\\x" not in message
    return message


def test_from_bytes_refuses_truncated_bytes_in_plain_words(original):
    """One byte short (or one too many) is refused, saying how many bytes were expected and got."""
    blob = lf.to_bytes(original)
    assert _bad(blob[:-1]) == f"local features of 500 keypoints take {len(blob)} bytes, got {len(blob) - 1}"
    assert _bad(blob + b"\0") == f"local features of 500 keypoints take {len(blob)} bytes, got {len(blob) + 1}"
    assert _bad(blob[:5]) == "local features are 5 bytes, shorter than their 8-byte header"
    assert _bad(b"") == "local features are 0 bytes, shorter than their 8-byte header"


def test_from_bytes_refuses_another_format_or_kind_and_garbage(original):
    """A different format or kind byte, text, or random bytes: BadLocalFeatures naming the format read."""
    blob = bytearray(lf.to_bytes(original))
    blob[0] = 2
    assert _bad(bytes(blob)) == "local features of format 2, kind 1: this version reads format 1, kind 1 (rootsift)"
    blob[0], blob[1] = 1, 7
    assert _bad(bytes(blob)) == "local features of format 1, kind 7: this version reads format 1, kind 1 (rootsift)"
    assert "format 116" in _bad(b"this is not a feature file at all")  # 't' = 116
    garbage = np.random.default_rng(3).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    assert _bad(garbage).startswith("local features of format ")
    # right header, wrong body length
    assert _bad(b"\x01\x01\x02\x00\x10\x00\x10\x00" + b"\0" * 100) == \
        "local features of 2 keypoints take 272 bytes, got 108"


# -- inliers


def test_a_cropped_rotated_recompressed_copy_has_many_inliers_and_unrelated_photos_few(original, unrelated):
    """Half the width and height, rotated 20 degrees, JPEG q75: >= 12 inliers (in fact dozens) with its
    original; fewer than 10 with each of ten unrelated real photos."""
    query = lf.extract(cropped_rotated(ORIGINAL))
    assert len(query) >= 300
    counts = lf.inliers([query], [original, *unrelated])
    assert counts.dtype == np.int32 and counts.shape == (11,)
    assert counts[0] >= 40
    assert counts[1:].max() < 10, dict(zip(UNRELATED, counts[1:].tolist()))


def test_the_copy_is_found_whatever_its_position_among_candidates_of_other_sizes(original, unrelated):
    """Candidates of different keypoint counts (padding), empty ones and a one-keypoint one mixed in: the
    original still gets >= 12, the empty and tiny ones 0 (a tiny one can never exceed its keypoints)."""
    query = lf.extract(cropped_rotated(ORIGINAL))
    tiny = lf.LocalFeatures(original.xy[:1], original.descriptors[:1], original.size)
    few = lf.extract(rgb("plasma-kay.jpg"))  # a smooth wallpaper: 17 keypoints
    assert 0 < len(few) < 50
    counts = lf.inliers([query], [lf.EMPTY, unrelated[0], tiny, few, original, lf.EMPTY])
    assert counts[4] >= 40
    assert counts[0] == counts[5] == 0 and counts[2] <= 1
    assert counts[1] < 10 and counts[3] < 10


def test_a_mirrored_copy_needs_the_mirror_features_of_the_query(original):
    """A left-right mirrored JPEG copy: with the query's mirror image among `queries` it gets hundreds of
    inliers; the plain query alone finds far fewer (SIFT is not mirror-invariant). The best of the queries
    counts: the result equals the maximum over the queries taken one by one."""
    mirrored_copy = jpeg(lf.mirrored(rgb(ORIGINAL)))
    plain = lf.extract(mirrored_copy)
    flipped_back = lf.extract(lf.mirrored(mirrored_copy))
    alone = int(lf.inliers([plain], [original])[0])
    both = int(lf.inliers([plain, flipped_back], [original])[0])
    assert both >= 200
    assert both >= 12 and alone * 4 <= both
    assert both == max(alone, int(lf.inliers([flipped_back], [original])[0]))


def test_empty_features_give_zero_inliers_and_never_raise(original):
    """EMPTY or featureless (all-black) queries or candidates, no queries, no candidates: zeros, no error."""
    black = lf.extract(np.zeros((400, 400, 3), np.uint8))
    assert len(black) == 0
    assert lf.inliers([lf.EMPTY], [original]).tolist() == [0]
    assert lf.inliers([black], [original, original]).tolist() == [0, 0]
    assert lf.inliers([original], [lf.EMPTY, black]).tolist() == [0, 0]
    assert lf.inliers([], [original]).tolist() == [0]
    assert lf.inliers([original], []).tolist() == []
    assert lf.inliers([lf.EMPTY, black], [lf.EMPTY]).tolist() == [0]
    assert lf.inliers([lf.from_bytes(lf.to_bytes(black))], [original]).tolist() == [0]


def test_an_identical_image_counts_distinct_points_only(original):
    """An image against itself: every keypoint matches, but inliers count distinct positions on both sides
    (SIFT repeats a position for several orientations), so the count is at most the distinct positions."""
    count = int(lf.inliers([original], [original])[0])
    distinct = len(np.unique(np.rint(original.xy), axis=0))
    assert 300 <= count <= distinct <= len(original)


def test_sane_refuses_degenerate_homographies():
    """`_sane`: 0 for no model, for an area change over 64x, and for a frame mapped to a non-convex shape;
    an identity model counts the distinct inlier points."""
    points = np.float32([[x, y] for x in range(0, 100, 10) for y in range(0, 100, 10)])
    mask = np.ones((len(points), 1), np.uint8)
    assert lf._sane(None, mask, points, points, (100, 100), (100, 100)) == 0
    assert lf._sane(np.eye(3), mask, points, points, (100, 100), (100, 100)) == 100
    assert lf._sane(np.diag([10.0, 10.0, 1.0]), mask, points, points * 10, (100, 100), (100, 100)) == 0  # 100x the area
    assert lf._sane(np.diag([0.1, 0.1, 1.0]), mask, points, points / 10, (100, 100), (100, 100)) == 0  # 1/100 of the area
    horizon = np.array([[1.0, 0, 0], [0, 1, 0], [-0.015, 0, 1]])  # x = 66.7 goes to infinity: frame not convex
    assert lf._sane(horizon, mask, points, points, (100, 100), (100, 100)) == 0
    half = mask.copy()
    half[::2] = 0
    assert lf._sane(np.eye(3), half, points, points, (100, 100), (100, 100)) == 50


def test_inliers_packed_into_a_small_part_of_both_images_do_not_count():
    """A strip of text on two different photos: 100 inliers whose hull covers 4.5 % of each 100 x 100 image
    (under MIN_COVERAGE) count 0; matched to a 100 x 10 banner, the same strip covers 45 % of it and counts."""
    strip = np.float32([[x, y] for x in np.linspace(5, 95, 25) for y in (50, 51, 53, 55)])
    mask = np.ones((len(strip), 1), np.uint8)
    assert lf._coverage(strip, (100, 100)) == pytest.approx(0.045, abs=1e-3)
    assert lf._sane(np.eye(3), mask, strip, strip, (100, 100), (100, 100)) == 0
    shift = np.array([[1.0, 0, 0], [0, 1, -48], [0, 0, 1]])
    assert lf._sane(shift, mask, strip, strip - [0, 48], (100, 100), (100, 10)) == 100
