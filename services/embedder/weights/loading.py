"""Loading resolved `Weights` into a Keras VGG-16, seeded random weights, and writing weights files."""

from __future__ import annotations

import zlib
from pathlib import Path

import h5py
import numpy as np

from cbir.errors import WeightsError
from services.embedder.weights.chain import Weights, one_line
from services.embedder.weights.weights_file import CONV_LAYERS, PREPROCESSING_ATTR


def apply_weights(base, weights: Weights) -> None:
    """Load `weights` into `base`, a Keras VGG-16 built with include_top=weights.include_top."""
    if weights.path is None:
        set_random_weights(base, weights.seed or 0)
        return
    try:
        base.load_weights(weights.path)
    except Exception as error:
        raise WeightsError(f"cannot load VGG-16 weights from {weights.path} ({weights.source}): {one_line(error)}") from None


def conv_only(base):
    """A VGG-16 without the top holding `base`'s conv weights: gem does not need 0.5 GB of fc layers in memory."""
    from services.embedder.model import build_vgg16

    notop = build_vgg16(include_top=False)
    for name in CONV_LAYERS:
        notop.get_layer(name).set_weights(base.get_layer(name).get_weights())
    return notop


def set_random_weights(base, seed: int) -> None:
    """Seeded He-normal kernels and zero biases; each layer's values depend only on (seed, layer name)."""
    for layer in base.layers:
        variables = layer.get_weights()
        if not variables:
            continue
        kernel_shape = variables[0].shape
        fan_in = int(np.prod(kernel_shape[:-1]))
        rng = np.random.default_rng([seed, zlib.crc32(layer.name.encode())])
        kernel = rng.standard_normal(kernel_shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        layer.set_weights([kernel, *(np.zeros_like(v) for v in variables[1:])])


def save_weights(base, path: Path, *, preprocessing: str = "caffe") -> Path:
    """Write `base`'s weights as a Keras 3 `.weights.h5` file that `weights=<path>` loads again."""
    path = Path(path)
    if not path.name.endswith(".weights.h5"):
        raise ValueError(f"Keras weights files are named *.weights.h5, not {path.name}")
    base.save_weights(path)
    with h5py.File(path, "a") as f:
        f.attrs[PREPROCESSING_ATTR] = preprocessing
    return path
