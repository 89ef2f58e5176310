"""The Keras model: preprocessing and GeM pooling layers against their formulas, and the fc1 feature."""

import keras
import numpy as np
import pytest

from services.embedder.embedder import Embedder
from services.embedder.model import GeMPooling, L2Normalize, Preprocess
from services.embedder.settings import EmbedderSettings

RNG = np.random.default_rng(7)


def test_caffe_preprocessing_matches_keras_vgg16_preprocess_input():
    """"caffe" preprocessing inside the model equals keras.applications.vgg16.preprocess_input (RGB->BGR, minus means)."""
    pixels = RNG.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    expected = keras.applications.vgg16.preprocess_input(pixels.astype(np.float32))
    np.testing.assert_allclose(np.asarray(Preprocess("caffe")(pixels)), expected, rtol=1e-6, atol=1e-4)


def test_torch_preprocessing_matches_torchvision_normalisation():
    """"torch" preprocessing is RGB/255 minus ImageNet mean over std, channel by channel."""
    pixels = RNG.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    expected = (pixels / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(np.asarray(Preprocess("torch")(pixels)), expected, rtol=1e-5, atol=1e-5)


def test_gem_pooling_and_l2_normalisation_follow_their_formulas():
    """GeM(p) = mean(x^p)^(1/p) over height and width; p=1 is the average; L2Normalize leaves zero rows at zero."""
    x = RNG.random((3, 5, 4, 6)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(GeMPooling(3.0)(x)), np.mean(x**3, axis=(1, 2)) ** (1 / 3), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(GeMPooling(1.0)(x)), x.mean(axis=(1, 2)), rtol=1e-5)
    rows = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(np.asarray(L2Normalize()(rows)), [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)


@pytest.mark.slow
def test_fc1_vectors_are_4096_d_and_full_weights_serve_both_features(tmp_path):
    """feature=fc1 (full network, random weights) gives 4096-d non-negative vectors (after fc1's ReLU), repeatably;
    its full weights file loads again for fc1 and, conv layers only, for gem (same conv weights as random gem)."""
    embedder = Embedder.from_settings(EmbedderSettings(weights="random", feature="fc1", metrics_port=None))
    assert (embedder.dimension, embedder.info.feature, embedder.info.pooling) == (4096, "fc1", "")
    assert embedder.info.fingerprint.startswith("vgg16-fc1-")
    pixels = RNG.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    first = embedder.embed_pixels(pixels)
    assert first.shape == (2, 4096) and first.dtype == np.float32
    assert (first >= 0).all() and (first > 0).any()
    scale = float(first.max())  # batch and single runs differ by float rounding only
    np.testing.assert_allclose(embedder.embed_pixels(pixels[:1]), first[:1], rtol=1e-4, atol=1e-5 * scale)

    full = embedder.save_weights(tmp_path / "vgg16-full.weights.h5")
    del embedder
    reloaded = Embedder.from_settings(EmbedderSettings(weights=str(full), feature="fc1", metrics_port=None))
    np.testing.assert_allclose(reloaded.embed_pixels(pixels), first, rtol=1e-5, atol=1e-6 * scale)
    del reloaded
    gem_from_full = Embedder.from_settings(EmbedderSettings(weights=str(full), feature="gem", metrics_port=None))
    gem_random = Embedder.from_settings(EmbedderSettings(weights="random", feature="gem", metrics_port=None))
    np.testing.assert_allclose(gem_from_full.embed_pixels(pixels), gem_random.embed_pixels(pixels), rtol=1e-5, atol=1e-6)
