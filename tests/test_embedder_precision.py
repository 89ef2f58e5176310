"""The embedder's `precision` setting: bfloat16 maths (Keras mixed precision) beside float32.

How close bfloat16 vectors are with ImageNet weights, and that retrieval keeps its quality, is measured
on real weights and the hard evaluation (BENCHMARKS.md); the seeded random weights of the suite are too
badly scaled for a closeness bound at the end of VGG-16, so here closeness is checked on a small network.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from pydantic import ValidationError

from services.embedder.devices import cpu_has_bfloat16, resolve_precision
from services.embedder.model import with_precision

from conftest import DEMO_PHOTOS


def small_network() -> keras.Model:
    keras.utils.set_random_seed(3)
    pixels = keras.Input(shape=(32, 32, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_a")(pixels)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_b")(x)
    return keras.Model(pixels, x)


def test_bfloat16_copy_computes_in_bfloat16_with_the_same_float32_weights_and_leaves_the_original_alone():
    base = small_network()
    mixed = with_precision(base, "bfloat16")
    assert with_precision(base, "float32") is base
    assert [layer.compute_dtype for layer in mixed.layers[1:]] == ["bfloat16", "bfloat16"]
    assert [layer.compute_dtype for layer in base.layers[1:]] == ["float32", "float32"]
    assert all(w.dtype == "float32" for w in mixed.weights)
    for ours, theirs in zip(mixed.get_weights(), base.get_weights()):
        np.testing.assert_array_equal(ours, theirs)

    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    exact = np.asarray(base(x))
    approx = np.asarray(mixed(x)).astype("float32")
    assert np.abs(approx - exact).max() <= 0.02 * np.abs(exact).max()  # bfloat16 keeps 8 bits of mantissa
    assert not np.array_equal(approx, exact)  # and it is not float32 in disguise


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        with_precision(small_network(), "float16")


def test_auto_is_bfloat16_only_where_the_hardware_has_it(tmp_path):
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert cpu_has_bfloat16(str(amx)) and not cpu_has_bfloat16(str(plain))
    assert not cpu_has_bfloat16(str(tmp_path / "missing"))

    assert resolve_precision("float32", "keras", gpus=1) == "float32"
    assert resolve_precision("bfloat16", "keras", gpus=0) == "bfloat16"
    assert resolve_precision("auto", "keras", gpus=1) == "bfloat16"
    assert resolve_precision("auto", "onnx", gpus=1) == "float32"
    assert resolve_precision("auto", "keras", gpus=0) == ("bfloat16" if cpu_has_bfloat16() else "float32")


def test_bfloat16_on_the_onnx_backend_is_refused_in_words():
    from services.embedder.settings import EmbedderSettings

    with pytest.raises(ValidationError, match="keras backend only"):
        EmbedderSettings(precision="bfloat16", backend="onnx", resize="squash", metrics_port=None)


def test_a_bfloat16_embedder_gives_unit_float32_vectors_under_the_same_fingerprint(random_embedder):
    from services.embedder.embedder import Embedder
    from services.embedder.settings import EmbedderSettings

    mixed = Embedder.from_settings(EmbedderSettings(weights="random", random_seed=7, precision="bfloat16",
                                                    metrics_port=None))
    assert random_embedder.info.precision == "float32" and mixed.info.precision == "bfloat16"
    assert mixed.info.fingerprint == random_embedder.info.fingerprint  # its vectors join the same bundles
    assert {layer.compute_dtype for layer in mixed.model.layers if isinstance(layer, keras.layers.Conv2D)} \
        == {"bfloat16"}

    images = [(DEMO_PHOTOS / name).read_bytes() for name in ("skimage-coffee.jpg", "opencv-baboon.jpg")]
    first = np.stack(mixed.embed_images(images))
    again = np.stack(mixed.embed_images(images))
    assert first.dtype == np.float32 and first.shape == (2, random_embedder.dimension)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first, again)
    regions = mixed.embed_pixels([mixed.decode(images[0])], regions=True)
    assert regions.dtype == np.float32 and np.isfinite(regions).all()
