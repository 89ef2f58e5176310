"""The onnx backend runs the default descriptor model, in float32 and in int8 (static quantization calibrated
on photos), and gives Keras's float32 vectors: float32 within cosine 0.9999, int8 within 0.99 (both with the
suite's seeded random weights, on real photos the calibration did not see). How close int8 is with ImageNet
weights, and that retrieval keeps its quality, is measured on the hard evaluation (BENCHMARKS.md)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from pydantic import ValidationError

from cbir.errors import SetupError
from services.embedder import onnx_backend
from services.embedder.embedder import Embedder
from services.embedder.settings import EmbedderSettings

from conftest import DEMO_PHOTOS, E2E_PHOTOS

pytestmark = pytest.mark.slow

CALIBRATION = ["mate-aqua.jpg", "opencv-home.jpg", "plasma-kite.jpg", "skimage-coffee.jpg", "opencv-baboon.jpg",
               "lomiri-fossa_by_jasper_roks.jpg"]
CHECKED = [name for name in E2E_PHOTOS if name not in CALIBRATION][:6]


def settings(**values) -> EmbedderSettings:
    return EmbedderSettings(weights="random", random_seed=7, metrics_port=None, **values)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    for name in CALIBRATION:
        shutil.copy(DEMO_PHOTOS / name, folder / name)
    (folder / "notes.txt").write_text("not a photo")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def int8_embedder(calibration, cache):
    return Embedder.from_settings(settings(backend="onnx", precision="int8", calibration=calibration, cache_dir=cache))


def pixels(embedder) -> list[np.ndarray]:
    return [embedder.decode((DEMO_PHOTOS / name).read_bytes()) for name in CHECKED]


def test_onnx_float32_runs_the_default_descriptor_with_keras_vectors_and_regions(random_embedder):
    """resize=auto on the onnx backend is the default descriptor (224 squashed + 448 aspect kept) through the
    exported trunk: the same fingerprint, and vectors and region vectors within cosine 0.9999 of Keras's."""
    onnx = Embedder.from_settings(settings(backend="onnx"))
    assert isinstance(onnx.runner.trunk, onnx_backend.OnnxRunner)
    assert onnx.info.fingerprint == random_embedder.info.fingerprint and onnx.info.precision == "float32"
    images = pixels(random_embedder)
    expected = random_embedder.embed_pixels(images, regions=True)
    got = onnx.embed_pixels(images, regions=True)
    assert got.shape == expected.shape and got.shape[1] > 1
    assert onnx_backend.cosines(expected.reshape(-1, 512), got.reshape(-1, 512)).min() >= 0.9999


def test_int8_gives_the_float32_vectors_within_cosine_0_99_under_the_same_fingerprint(random_embedder,
                                                                                       int8_embedder):
    """The int8 graph (photos it was not calibrated on, both passes, region vectors too) stays within cosine 0.99
    of Keras's float32 vectors, yet is not float32 in disguise; the fingerprint is the model's, the precision
    int8."""
    assert int8_embedder.info.fingerprint == random_embedder.info.fingerprint
    assert int8_embedder.info.precision == "int8"
    images = pixels(random_embedder)
    expected = random_embedder.embed_pixels(images, regions=True).reshape(-1, 512)
    got = int8_embedder.embed_pixels(images, regions=True).reshape(-1, 512)
    closeness = onnx_backend.cosines(expected, got)
    assert closeness.min() >= 0.99
    assert closeness.min() < 0.99999  # quantized: some vector moved


def test_a_restart_takes_the_int8_model_from_the_cache_and_other_photos_calibrate_anew(
        int8_embedder, calibration, cache, tmp_path, monkeypatch):
    """The quantized graph is kept in cache_dir: a second start with the same weights and photos does not
    calibrate again; a folder with other photos does."""
    assert list((cache / "onnx").glob("int8-*.onnx"))
    calls = []
    real = onnx_backend.quantize_int8
    monkeypatch.setattr(onnx_backend, "quantize_int8", lambda *args: calls.append(1) or real(*args))
    Embedder.from_settings(settings(backend="onnx", precision="int8", calibration=calibration, cache_dir=cache))
    assert calls == []
    other = tmp_path / "other"
    other.mkdir()
    for name in CHECKED[:2]:
        shutil.copy(DEMO_PHOTOS / name, other / name)
    Embedder.from_settings(settings(backend="onnx", precision="int8", calibration=other, cache_dir=cache))
    assert calls == [1]
    assert len(list((cache / "onnx").glob("int8-*.onnx"))) == 2


def test_int8_settings_that_cannot_work_are_refused_in_words(tmp_path):
    with pytest.raises(ValidationError, match="onnx backend"):
        settings(precision="int8", calibration=DEMO_PHOTOS)
    with pytest.raises(ValidationError, match="needs calibration photos"):
        settings(backend="onnx", precision="int8")
    with pytest.raises(ValidationError, match="is not a folder"):
        settings(backend="onnx", precision="int8", calibration=tmp_path / "missing")


def test_a_calibration_folder_without_photos_stops_the_start_with_a_reason(tmp_path, capfd):
    """A folder of no decodable photo is a SetupError naming the folder; the server logs it in one line and
    exits 1, with no traceback. (An undecodable file among photos is left out: the calibration fixture has one.)"""
    from services.embedder.server import EmbedderServer

    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    broken = settings(backend="onnx", precision="int8", calibration=tmp_path, cache_dir=tmp_path, port=0)
    with pytest.raises(SetupError, match="holds no photo that can be decoded"):
        Embedder.from_settings(broken)
    assert EmbedderServer(broken).run() == 1
    logged = capfd.readouterr().err
    assert "cannot start the embedder: the calibration folder" in logged and "Traceback" not in logged
