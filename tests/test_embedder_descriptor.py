"""The keep_aspect descriptor: images keep their proportions, regional pooling, resolutions, whitening.

Random VGG-16 weights (the vectors mean nothing, their shapes and the plumbing do); the pooling
functions are checked on hand-made activation maps where the right answer is known.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.embedder import descriptor, images
from services.embedder.embedder import Embedder, descriptor_name
from services.embedder.settings import EmbedderSettings


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def test_the_region_grid_starts_with_the_whole_map_and_covers_a_square_map_with_1_4_9_squares():
    found = descriptor.regions(14, 14)
    assert found[0] == (0, 0, 14, 14)
    assert len(found) == 1 + 1 + 4 + 9
    assert all(y >= 0 and x >= 0 and y + sy <= 14 and x + sx <= 14 for y, x, sy, sx in found)
    wide = descriptor.regions(21, 28)  # a landscape map gets more squares across than down
    assert len(wide) > len(found) and all(x + sx <= 28 and y + sy <= 21 for y, x, sy, sx in wide)


def test_regional_max_pooling_counts_where_a_response_is_not_only_how_strong():
    """Channel 0 fires strongly on a small corner patch, channel 1 evenly everywhere. MAC sees only the
    peaks; R-MAC pools each region separately, so the even channel, present in every region, weighs
    more. A constant map gives the same vector with every pooling."""
    fmap = np.full((14, 14, 4), 0.01, np.float32)
    fmap[..., 1] = 1.0
    fmap[1:3, 1:3, 0] = 3.0
    mac, rmac = descriptor.pool(fmap, "mac"), descriptor.pool(fmap, "rmac")
    for vector in (mac, rmac, descriptor.pool(fmap, "rgem"), descriptor.pool(fmap, "gem")):
        assert np.isclose(np.linalg.norm(vector), 1.0)
    assert rmac[0] / rmac[1] < mac[0] / mac[1]
    constant = np.full((7, 9, 4), 2.0, np.float32)
    for pooling in descriptor.POOLINGS:
        assert np.allclose(descriptor.pool(constant, pooling), 0.5), pooling


def test_descriptors_of_several_resolutions_are_summed_after_normalising_each():
    a, b = np.array([3.0, 0.0]), np.array([0.0, 0.5])
    assert np.allclose(descriptor.combine([a, b]), [2 ** -0.5, 2 ** -0.5])


def test_a_whitening_file_projects_and_normalises_and_knows_where_it_was_learned(tmp_path):
    rng = np.random.default_rng(0)
    mean, projection = rng.normal(size=512).astype(np.float32), rng.normal(size=(64, 512)).astype(np.float32)
    np.savez(tmp_path / "w.npz", mean=mean, projection=projection, source="devbench sfm_scenes pairs")
    whitening = descriptor.Whitening.load(tmp_path / "w.npz")
    out = whitening.apply(rng.normal(size=(3, 512)))
    assert out.shape == (3, 64) and np.allclose(np.linalg.norm(out, axis=1), 1.0)
    assert whitening.source == "devbench sfm_scenes pairs" and len(whitening.fingerprint) == 12


def test_query_windows_are_a_4x4_grid_of_windows_a_third_of_the_map_wide_inside_the_map():
    windows = descriptor.query_windows(14, 20)
    assert (descriptor.QUERY_REGION_GRID, descriptor.QUERY_REGION_SCALE) == (4, 0.35)
    assert len(windows) == 16 and {(sy, sx) for _, _, sy, sx in windows} == {(5, 7)}
    assert {(y, x) for y, x, _, _ in windows} == {(y, x) for y in (0, 3, 6, 9) for x in (0, 4, 9, 13)}
    # a map too small to hold distinct windows still gives sixteen, each inside it
    tiny = descriptor.query_windows(1, 3)
    assert len(tiny) == 16 and all(y + sy <= 1 and x + sx <= 3 and sy >= 1 and sx >= 1 for y, x, sy, sx in tiny)


def test_each_region_vector_is_the_unit_gem_of_its_window_and_differs_from_the_whole_map():
    fmap = np.random.default_rng(5).random((14, 20, 512), dtype=np.float32) ** 4
    regions = descriptor.region_vectors(fmap)
    y, x, sy, sx = descriptor.query_windows(14, 20)[5]  # second row, second column
    assert (y, x) == (3, 4)
    assert regions.shape == (16, 512) and np.allclose(np.linalg.norm(regions, axis=1), 1.0, atol=1e-5)
    assert np.allclose(regions[5], descriptor.pool(fmap[y:y + sy, x:x + sx], "gem"), atol=1e-6)
    assert not np.allclose(regions[5], descriptor.pool(fmap, "gem"), atol=1e-3)


@pytest.fixture(scope="module")
def aspect_embedder():
    settings = EmbedderSettings(weights="random", random_seed=3, metrics_port=None, resize="keep_aspect",
                                input_size=256, pooling="rgem")
    embedder = Embedder.from_settings(settings)
    embedder.warm_up()
    return embedder


def test_images_keep_their_proportions_and_every_shape_gets_a_unit_vector(aspect_embedder):
    # decoded to a source image (proportions exact, longer side at most 512, never enlarged), then each
    # network pass resizes it: keep_aspect=256 gives a longer side of 256, both sides multiples of 16
    landscape, portrait = aspect_embedder.decode(jpeg(640, 480, 1)), aspect_embedder.decode(jpeg(300, 900, 2))
    assert landscape.shape == (384, 512, 3) and portrait.shape == (512, 171, 3)
    assert aspect_embedder.decode(jpeg(200, 100, 4)).shape == (100, 200, 3)
    assert [str(step) for step in aspect_embedder.runner.passes] == ["keep_aspect=256"]
    assert images.fit(landscape, "keep_aspect", 256).shape == (192, 256, 3)
    assert images.fit(portrait, "keep_aspect", 256).shape == (256, 80, 3)
    results = aspect_embedder.embed_images([jpeg(640, 480, 1), jpeg(300, 900, 2), jpeg(640, 480, 3), b"not an image"])
    vectors = results[:3]
    assert all(v.shape == (512,) and np.isclose(np.linalg.norm(v), 1.0, atol=1e-5) for v in vectors)
    assert "not an image" in str(results[3]) or "Pillow" in str(results[3])
    # The same image alone or batched with other shapes gives the same vector.
    alone = aspect_embedder.embed_images([jpeg(300, 900, 2)])[0]
    assert np.allclose(alone, vectors[1], atol=1e-5)


def test_regions_come_after_the_image_vector_which_they_leave_unchanged(aspect_embedder):
    pixels = [aspect_embedder.decode(jpeg(640, 480, 1)), aspect_embedder.decode(jpeg(300, 900, 2))]
    rows = aspect_embedder.embed_pixels(pixels, regions=True)
    assert rows.shape == (2, 17, 512) and np.allclose(np.linalg.norm(rows, axis=2), 1.0, atol=1e-5)
    assert np.allclose(rows[:, 0], aspect_embedder.embed_pixels(pixels), atol=1e-5)
    assert not np.allclose(rows[0, 1], rows[0, 16], atol=1e-3)  # opposite corners see different parts


def test_a_squash_model_has_no_region_vectors_and_says_so():
    squash = Embedder.from_settings(EmbedderSettings(weights="random", random_seed=3, metrics_port=None,
                                                     resize="squash"))
    assert not squash.has_regions
    with pytest.raises(ValueError, match="region vectors come from descriptor models"):
        squash.embed_pixels(np.zeros((1, 224, 224, 3), np.uint8), regions=True)


def test_every_choice_that_shapes_the_vectors_changes_the_fingerprint(aspect_embedder):
    squash = Embedder.from_settings(EmbedderSettings(weights="random", random_seed=3, metrics_port=None,
                                                     resize="squash"))
    other_size = Embedder.from_settings(EmbedderSettings(weights="random", random_seed=3, metrics_port=None,
                                                         resize="keep_aspect", input_size=320, pooling="rgem"))
    fingerprints = {aspect_embedder.info.fingerprint, squash.info.fingerprint, other_size.info.fingerprint}
    assert len(fingerprints) == 3
    assert aspect_embedder.info.pooling == "rgem(p=3);source=512;keep_aspect=256"
    assert squash.info.pooling == "gem(p=3)"
    # the default (resize=auto): both passes, their sizes and the source side named
    assert descriptor_name(EmbedderSettings(weights="random", metrics_port=None), None) == \
        "gem(p=3);source=512;squash=224+keep_aspect=448"


def test_settings_refuse_combinations_that_cannot_work_in_plain_words():
    with pytest.raises(ValueError, match="keep_aspect"):
        EmbedderSettings(weights="random", metrics_port=None, resize="squash", input_size=448)
    with pytest.raises(ValueError, match="keep_aspect"):
        EmbedderSettings(weights="random", metrics_port=None, resize="squash", pooling="rmac")
    with pytest.raises(ValueError, match="fc1"):
        EmbedderSettings(weights="random", metrics_port=None, feature="fc1", resize="keep_aspect")
    with pytest.raises(ValueError, match="fc1"):
        EmbedderSettings(weights="random", metrics_port=None, feature="fc1", resize="squash+keep_aspect")


def test_resize_auto_picks_the_descriptor_for_gem_on_either_backend_and_squash_for_fc1():
    def resolved(**values):
        settings = EmbedderSettings(weights="random", metrics_port=None, **values)
        return settings.resize, settings.input_size

    assert resolved() == ("squash+keep_aspect", 448)
    assert resolved(feature="fc1") == ("squash", 224)
    assert resolved(backend="onnx") == ("squash+keep_aspect", 448)
    assert resolved(resize="keep_aspect") == ("keep_aspect", 448)
    assert resolved(resize="squash") == ("squash", 224)
    assert resolved(input_size=320) == ("squash+keep_aspect", 320)


def test_an_unknown_whitening_is_refused_with_the_shipped_names():
    settings = EmbedderSettings(weights="random", metrics_port=None, resize="keep_aspect", whitening="no-such")
    with pytest.raises(ValueError, match="neither a shipped whitening"):
        Embedder.from_settings(settings)
