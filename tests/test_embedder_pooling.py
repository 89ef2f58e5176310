"""Pooling choices of the conv features (GeM, MAC, average) and the multi-scale option: their
formulas, their names in ModelInfo.pooling and so in the model fingerprint, and that the default
(GeM p=3, one scale) is unchanged for existing bundles."""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from pydantic import ValidationError

from services.embedder.embedder import model_info
from services.embedder.model import Preprocess, build_vgg16, feature_model, pooling_name
from services.embedder.settings import EmbedderSettings
from services.embedder.weights import Weights, set_random_weights

PIXELS = np.random.default_rng(11).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def base():
    model = build_vgg16(include_top=False)
    set_random_weights(model, 5)
    return model


@pytest.fixture(scope="module")
def conv_maps(base):
    """block5_conv3's ReLU output for PIXELS, computed with a plain Keras model (no pooling code)."""
    trunk = keras.Model(base.inputs, base.get_layer("block5_conv3").output)
    return trunk(Preprocess("caffe")(PIXELS)).numpy()


def _l2(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("pooling, expected", [
    ("gem", lambda f: np.mean(np.maximum(f, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)),
    ("mac", lambda f: f.max(axis=(1, 2))),
    ("avg", lambda f: f.mean(axis=(1, 2))),
])
def test_each_pooling_follows_its_formula(base, conv_maps, pooling, expected):
    """gem = (mean x^3)^(1/3), mac = max, avg = mean over height and width, then L2-normalised; they differ."""
    model = feature_model(base, feature="gem", preprocessing="caffe", pooling=pooling)
    got = model(PIXELS).numpy()
    np.testing.assert_allclose(got, _l2(expected(conv_maps)), rtol=1e-4, atol=1e-6)
    if pooling != "gem":
        gem = feature_model(base, feature="gem", preprocessing="caffe")(PIXELS).numpy()
        assert np.abs(got - gem).max() > 1e-3


def test_default_gem_model_is_the_original_graph(base):
    """pooling=gem with one scale builds the same layers as before the pooling options (same names, one trunk)."""
    model = feature_model(base, feature="gem", preprocessing="caffe", gem_p=3.0)
    assert [layer.name for layer in model.layers] == ["pixels", "preprocess_caffe", "vgg16_to_block5_conv3", "gem",
                                                      "l2_normalize"]


def test_multi_scale_averages_normalised_vectors_of_each_scale(base, conv_maps):
    """scales (1, 1.5): the 224 image and its bilinear 336x336 resize through the same conv weights (checked
    with an independently built 336x336 VGG-16), each GeM vector L2-normalised, averaged, normalised."""
    model = feature_model(base, feature="gem", preprocessing="caffe", scales=(1.0, 1.5))
    got = model(PIXELS).numpy()
    big = keras.applications.VGG16(include_top=False, weights=None, input_shape=(336, 336, 3))
    big.set_weights(base.get_weights())
    resized = tf.image.resize(Preprocess("caffe")(PIXELS), (336, 336), method="bilinear")
    maps = keras.Model(big.inputs, big.get_layer("block5_conv3").output)(resized).numpy()

    def gem(f):
        return _l2(np.mean(np.maximum(f, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3))

    np.testing.assert_allclose(got, _l2((gem(conv_maps) + gem(maps)) / 2), rtol=1e-4, atol=1e-6)


def test_pooling_names_and_fingerprints():
    """ModelInfo.pooling names pooling and scales; every choice has its own fingerprint, and the default
    keeps the fingerprint existing bundles were built with."""
    weights = Weights(source="keras-cache", fingerprint="a" * 64, preprocessing="caffe", include_top=False, path=Path("x"))
    default = model_info(feature="gem", weights=weights, gem_p=3.0)
    assert default == model_info(feature="gem", weights=weights, gem_p=3.0, pooling="gem", scales=(1.0,))
    assert default.pooling == "gem(p=3)"
    variants = {
        "mac": model_info(feature="gem", weights=weights, gem_p=3.0, pooling="mac"),
        "avg": model_info(feature="gem", weights=weights, gem_p=3.0, pooling="avg"),
        "gem(p=3);scales=1,1.414": model_info(feature="gem", weights=weights, gem_p=3.0, scales=(1.0, 1.414)),
        "mac;scales=0.707,1": model_info(feature="gem", weights=weights, gem_p=3.0, pooling="mac", scales=(0.707, 1.0)),
    }
    assert {name: info.pooling for name, info in variants.items()} == {name: name for name in variants}
    assert len({default.fingerprint} | {info.fingerprint for info in variants.values()}) == 1 + len(variants)
    assert pooling_name("fc1", 3.0) == ""


def test_settings_parse_scales_and_refuse_what_fc1_cannot_do(monkeypatch):
    monkeypatch.setenv("CBIR_EMBEDDER_SCALES", "1, 1.414")
    monkeypatch.setenv("CBIR_EMBEDDER_POOLING", "mac")
    settings = EmbedderSettings()
    assert (settings.scales, settings.pooling) == ((1.0, 1.414), "mac")
    monkeypatch.delenv("CBIR_EMBEDDER_SCALES")
    monkeypatch.delenv("CBIR_EMBEDDER_POOLING")
    assert (EmbedderSettings().scales, EmbedderSettings().pooling) == ((1.0,), "gem")
    for bad in (dict(scales="1,x"), dict(scales=""), dict(scales="1,1"), dict(scales="8"),
                dict(feature="fc1", pooling="mac"), dict(feature="fc1", scales="1,1.414"), dict(pooling="max")):
        with pytest.raises(ValidationError):
            EmbedderSettings(**bad)
