"""The copy-detection edits: seeded and deterministic, each doing what its name says, on real photos."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from apps.eval import edits
from conftest import DEMO_PHOTOS

PHOTO = DEMO_PHOTOS / "skimage-coffee.jpg"  # 600x400


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def original():
    return edits.open_rgb(PHOTO.read_bytes())


def test_edits_depend_only_on_seed_image_and_edit(original):
    """Same (seed, key, edit) -> the same bytes, whatever was drawn before; another seed -> another query."""
    first = {name: edits.apply_edit(original, name, seed=0, key="coffee").data for name in edits.EDIT_NAMES}
    for name in reversed(edits.EDIT_NAMES):  # other order, other draws in between
        edits.apply_edit(original, name, seed=5, key="other")
        assert edits.apply_edit(original, name, seed=0, key="coffee").data == first[name]
    randomised = [n for n in edits.EDIT_NAMES if n != "flip"]  # a mirror has nothing to draw
    changed = [n for n in randomised if edits.apply_edit(original, n, seed=1, key="coffee").data != first[n]]
    assert changed == randomised


def test_crop_keeps_50_to_90_percent_of_the_area(original):
    for seed in range(20):
        result = edits.apply_edit(original, "crop", seed=seed, key="coffee")
        w, h = Image.open(io.BytesIO(result.data)).size
        assert 0.49 <= (w * h) / (original.width * original.height) <= 0.91
        assert result.params["area"] == pytest.approx(w * h / (original.width * original.height), abs=1e-3)


def test_rescale_rotate_colour_and_jpeg_draw_within_their_ranges(original):
    for seed in range(10):
        rescaled = edits.apply_edit(original, "rescale", seed=seed, key="coffee")
        assert 0.15 <= rescaled.params["factor"] <= 0.5
        assert Image.open(io.BytesIO(rescaled.data)).size == tuple(rescaled.params["size"])
        assert 3.0 <= abs(edits.apply_edit(original, "rotate", seed=seed, key="coffee").params["degrees"]) <= 10.0
        colour = edits.apply_edit(original, "colour", seed=seed, key="coffee").params
        assert 0.6 <= colour["brightness"] <= 1.4 and 0.6 <= colour["contrast"] <= 1.4 and 0.3 <= colour["saturation"] <= 1.7
        jpeg = edits.apply_edit(original, "jpeg", seed=seed, key="coffee")
        assert 30 <= jpeg.params["quality"] <= 75
        assert len(jpeg.data) < len(edits.encode_jpeg(original))  # recompressed harder than the q95 copies


def test_rotation_leaves_no_black_corners():
    """The rotated photo is cropped to the part without fill: a white picture stays white to its corners."""
    white = Image.new("RGB", (600, 400), (255, 255, 255))
    for seed in range(5):
        rotated = _decode(edits.apply_edit(white, "rotate", seed=seed, key="white").data)
        assert rotated.min() > 200, edits.apply_edit(white, "rotate", seed=seed, key="white").params


def test_flip_is_a_mirror_image(original):
    flipped = _decode(edits.apply_edit(original, "flip", seed=0, key="coffee").data)
    mirror = np.asarray(ImageOps.mirror(original), dtype=np.float32)
    assert np.abs(flipped - mirror).mean() < 2.0  # JPEG q95 noise only
    assert np.abs(flipped - np.asarray(original, dtype=np.float32)).mean() > 20.0


def test_caption_writes_text_in_a_band_at_the_top_or_bottom(original):
    for seed in range(4):
        result = edits.apply_edit(original, "caption", seed=seed, key="coffee")
        changed = np.abs(_decode(result.data) - _decode(edits.encode_jpeg(original))).max(axis=2) > 60
        rows = np.flatnonzero(changed.any(axis=1))
        assert rows.size > 0 and result.params["text"]
        band = rows.max() - rows.min()
        assert band < 0.25 * original.height  # one line of text
        if result.params["position"] == "top":
            assert rows.max() < original.height / 2
        else:
            assert rows.min() > original.height / 2


def test_large_images_are_reduced_and_exif_orientation_applied():
    """A 2000x1000 photo stored sideways (EXIF orientation 6) becomes an upright <=1024 px image."""
    image = Image.new("RGB", (2000, 1000), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    opened = edits.open_rgb(buffer.getvalue())
    assert opened.size == (512, 1024)


def test_parse_edits():
    assert edits.parse_edits("all") == edits.EDIT_NAMES
    assert edits.parse_edits("jpeg, crop") == ("crop", "jpeg")  # canonical order
    with pytest.raises(ValueError, match="unknown edit.*blur"):
        edits.parse_edits("crop,blur")
