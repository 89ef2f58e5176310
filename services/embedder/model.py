"""The Keras VGG-16 network for one feature, with preprocessing and pooling inside the model.

`build_vgg16` makes Keras's own VGG-16 architecture (the one the official weight files fit);
`feature_model` wraps it into a model that takes (N, 224, 224, 3) uint8 RGB pixels and returns
the feature: one call runs preprocessing, the network and the pooling. `compile_inference` turns
that model into a traced TensorFlow function with a fixed signature (no retracing per batch
size).
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import tensorflow as tf
from keras import ops

log = logging.getLogger(__name__)

INPUT_SHAPE = (224, 224, 3)
DIMENSIONS = {"gem": 512, "fc1": 4096}
PREPROCESSING = ("caffe", "torch")

# Keras `vgg16.preprocess_input` ("caffe"): RGB -> BGR, minus the ImageNet means in BGR order.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# torchvision ImageNet normalisation ("torch"): RGB in [0, 1], minus mean, over std.
_TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
_TORCH_STD_RGB = (0.229, 0.224, 0.225)


class Preprocess(keras.layers.Layer):
    """uint8 RGB pixels -> the float input the weights were trained on ("caffe" or "torch")."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING}, not {mode!r}")
        self.mode = mode

    def call(self, pixels):
        x = ops.cast(pixels, "float32")
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR, "float32")
        mean = ops.convert_to_tensor(_TORCH_MEAN_RGB, "float32")
        std = ops.convert_to_tensor(_TORCH_STD_RGB, "float32")
        return (x / 255.0 - mean) / std

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


class GeMPooling(keras.layers.Layer):
    """Generalized-mean pooling over height and width: (mean(x^p))^(1/p); p=1 is average, p->inf max."""

    def __init__(self, p: float = 3.0, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.p = float(p)
        self.epsilon = float(epsilon)

    def call(self, x):
        x = ops.maximum(x, self.epsilon)  # ReLU output is >= 0; keeps x^(1/p) and its gradient finite
        return ops.power(ops.mean(ops.power(x, self.p), axis=(1, 2)), 1.0 / self.p)

    def get_config(self):
        return {**super().get_config(), "p": self.p, "epsilon": self.epsilon}


class L2Normalize(keras.layers.Layer):
    """Rows scaled to unit length; an all-zero row stays zero instead of becoming NaN."""

    def __init__(self, epsilon: float = 1e-12, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, x):
        norm = ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True))
        return x / ops.maximum(norm, self.epsilon)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def build_vgg16(include_top: bool) -> keras.Model:
    """Keras's VGG-16 architecture without weights; `include_top` adds flatten, fc1, fc2, predictions."""
    return keras.applications.VGG16(include_top=include_top, weights=None, input_shape=INPUT_SHAPE)


def with_precision(base: keras.Model, precision: str) -> keras.Model:
    """`base` with the same weights computing in `precision`: "float32" gives `base` itself; "bfloat16" a
    copy whose layers use Keras's "mixed_bfloat16" policy (bfloat16 maths, float32 weights)."""
    if precision == "float32":
        return base
    if precision != "bfloat16":
        raise ValueError(f"precision must be float32 or bfloat16, not {precision!r}")

    def mixed(layer):
        if isinstance(layer, keras.layers.InputLayer):
            return layer.__class__.from_config(layer.get_config())
        return layer.__class__.from_config({**layer.get_config(), "dtype": "mixed_bfloat16"})

    copy = keras.models.clone_model(base, clone_function=mixed)
    copy.set_weights(base.get_weights())
    return copy


POOLINGS = ("gem", "mac", "avg")


def pooling_name(feature: str, gem_p: float, pooling: str = "gem", scales: tuple[float, ...] = (1.0,)) -> str:
    """ModelInfo.pooling (part of the model fingerprint): "gem(p=3)", "mac", "avg", plus ";scales=1,1.414"
    for a multi-scale model; "" for fc1. Single-scale GeM keeps its original name (existing bundles stay valid)."""
    if feature != "gem":
        return ""
    name = f"gem(p={gem_p:g})" if pooling == "gem" else pooling
    if tuple(scales) != (1.0,):
        name += ";scales=" + ",".join(f"{scale:g}" for scale in scales)
    return name


def _pool(x, pooling: str, gem_p: float, suffix: str = ""):
    if pooling == "gem":
        return GeMPooling(gem_p, name=f"gem{suffix}")(x)
    if pooling == "mac":
        return keras.layers.GlobalMaxPooling2D(name=f"mac{suffix}")(x)
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name=f"avg{suffix}")(x)
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")


def feature_model(base: keras.Model, *, feature: str, preprocessing: str, gem_p: float = 3.0,
                  pooling: str = "gem", scales: tuple[float, ...] = (1.0,)) -> keras.Model:
    """(N, 224, 224, 3) uint8 RGB -> (N, D) float32 features, using the layers (and weights) of `base`.

    gem: block5_conv3's ReLU output pooled over height and width (`pooling`: GeM with exponent
    `gem_p`, MAC = max, or average), L2-normalised, 512-d. With several `scales` the preprocessed
    image is also resized to 224 * scale (bilinear, antialiased when shrinking), each scale's
    pooled vector is L2-normalised, and their mean is L2-normalised again (multi-scale query).
    fc1: the output of layer fc1 (after its ReLU), 4096-d; `base` must include the top.
    """
    if feature not in DIMENSIONS:
        raise ValueError(f"feature must be one of {sorted(DIMENSIONS)}, not {feature!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    scales = tuple(float(scale) for scale in scales)
    if feature == "fc1" and (pooling != "gem" or scales != (1.0,)):
        raise ValueError("feature fc1 has no pooling and no multi-scale option")
    layer = "block5_conv3" if feature == "gem" else "fc1"
    trunk = keras.Model(base.inputs, base.get_layer(layer).output, name=f"vgg16_to_{layer}")
    pixels = keras.Input(shape=INPUT_SHAPE, dtype="uint8", name="pixels")
    prepared = Preprocess(preprocessing, name=f"preprocess_{preprocessing}")(pixels)
    if feature == "fc1":
        return keras.Model(pixels, trunk(prepared), name="vgg16_fc1")
    if scales == (1.0,):  # the original single-scale graph, layer for layer
        x = L2Normalize(name="l2_normalize")(_pool(trunk(prepared), pooling, gem_p))
        return keras.Model(pixels, x, name=f"vgg16_{feature}")
    # Multi-scale: the conv layers (shared weights) applied to each resized input. They accept any
    # height and width; the fixed-size `trunk` model does not, so its layers are called one by one.
    conv_layers = [candidate for candidate in trunk.layers if not isinstance(candidate, keras.layers.InputLayer)]
    vectors = []
    for index, scale in enumerate(scales):
        x = prepared
        if scale != 1.0:
            side = int(round(INPUT_SHAPE[0] * scale))
            x = keras.layers.Resizing(side, side, interpolation="bilinear", antialias=scale < 1.0,
                                      name=f"resize_{index}")(x)
        for conv_layer in conv_layers:
            x = conv_layer(x)
        vectors.append(L2Normalize(name=f"l2_normalize_{index}")(_pool(x, pooling, gem_p, suffix=f"_{index}")))
    x = L2Normalize(name="l2_normalize")(keras.layers.Average(name="scale_mean")(vectors))
    return keras.Model(pixels, x, name=f"vgg16_{feature}_multiscale")


def trunk_model(base: keras.Model, *, preprocessing: str) -> keras.Model:
    """(N, H, W, 3) uint8 RGB of any H, W -> (N, H/16, W/16, 512) block5_conv3 activations (after ReLU),
    with the layers (and weights) of `base`. The descriptor is made from them in NumPy (`descriptor`)."""
    pixels = keras.Input(shape=(None, None, 3), dtype="uint8", name="pixels")
    x = Preprocess(preprocessing, name=f"preprocess_{preprocessing}")(pixels)
    for layer in base.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        x = layer(x)
        if layer.name == "block5_conv3":
            break
    return keras.Model(pixels, x, name="vgg16_block5_conv3")


def compile_trunk(model: keras.Model):
    """A traced `model(x, training=False)` for (N, H, W, 3) uint8 of any H, W (one trace for every shape)."""
    signature = [tf.TensorSpec(shape=(None, None, None, 3), dtype=tf.uint8, name="pixels")]
    call = tf.function(lambda pixels: tf.cast(model(pixels, training=False), tf.float32), input_signature=signature)

    def run(batch: np.ndarray) -> np.ndarray:
        return call(tf.convert_to_tensor(batch, dtype=tf.uint8)).numpy()

    return run


def compile_inference(model: keras.Model):
    """A traced `model(x, training=False)`: takes an (N, 224, 224, 3) uint8 array, returns (N, D) float32.

    One trace serves every batch size (the batch dimension is left open). On this code's CPU
    measurements it is as fast as `predict_on_batch` and has less per-call overhead.
    """
    signature = [tf.TensorSpec(shape=(None, *INPUT_SHAPE), dtype=tf.uint8, name="pixels")]
    call = tf.function(lambda pixels: tf.cast(model(pixels, training=False), tf.float32), input_signature=signature)

    def run(batch: np.ndarray) -> np.ndarray:
        return call(tf.convert_to_tensor(batch, dtype=tf.uint8)).numpy()

    return run

