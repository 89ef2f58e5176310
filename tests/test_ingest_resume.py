"""Resumable, exact ingest: a build killed at any point and started again gives the same bundle, with
each source item exactly once.

The main proof runs the real `cbir index build` (VGG-16 with seeded random weights) over 24 small
drawn images in a subprocess, kills it with SIGKILL once it has written a work shard, starts it
again, and compares the result with an uninterrupted build of the same model (in this process:
the session's random-weights VGG-16 has the same seed). The in-process tests crash a build
(with a quick stand-in model) after every batch, inside the bundle write, and after it, and check
the same.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cbir.bundle import list_versions, open_bundle, read_current
from cbir.errors import BadImage
from apps.ingest import build as build_module
from apps.ingest.build import BuildOptions, build_index
from apps.ingest.embedding import Embedded
from apps.ingest.shards import ShardStore
from apps.ingest.sources import SourceError
from cbir.v1 import common_pb2

REPO = Path(__file__).resolve().parents[1]
CBIR = [sys.executable, "-m", "apps"]


def draw_collection(folder: Path, count: int, size: int = 48) -> list[str]:
    """`count` distinct small images (colour, shape and position vary); returns their ids."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(42)
    names = []
    for i in range(count):
        image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        x, y = (int(v) for v in rng.integers(0, size // 2, 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if i % 2 else draw.rectangle)([x, y, x + size // 2, y + size // 3], fill=fill)
        name = f"img{i:03d}.png"
        image.save(folder / name)
        names.append(name)
    return names


def bundle_contents(root: Path) -> tuple[list[str], np.ndarray]:
    with open_bundle(root) as bundle:
        return [r.item_id for r in bundle.iter_items()], np.array(bundle.features())


def run_build(source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CBIR, "index", "build", str(source), "--out", str(out), "--weights", "random", "--batch-size", "4",
         "--shard-size", "4", "--trees", "5", "--no-progress", *extra],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600,
    )


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBIR_")}
    env["CBIR_EMBEDDER_RANDOM_SEED"] = "7"  # the seed of conftest's random_embedder
    env["CBIR_EMBEDDER_PRECISION"] = "float32"  # and its precision (conftest): the same vectors
    return env


@pytest.mark.slow
def test_a_build_killed_with_sigkill_resumes_and_holds_each_item_exactly_once(tmp_path, random_embedder):
    """kill -9 after the first work shard is on disk; the second run embeds only what is missing and
    the bundle equals that of an uninterrupted build: same ids, same order, same vectors."""
    source = tmp_path / "photos"
    names = draw_collection(source, 24)
    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        [*CBIR, "index", "build", str(source), "--out", str(out), "--weights", "random", "--batch-size", "4",
         "--shard-size", "4", "--trees", "5", "--no-progress"],
        cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob(".work/*/shard-*.npz")):
            assert process.poll() is None, "the build ended before writing a shard"
            assert time.monotonic() < deadline, "no shard written in 300 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        assert process.wait(60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stored, rejected, _, _ = ShardStore(next(out.glob(".work/*"))).load()
    assert 0 < len(stored) < len(names) and not rejected, "the kill did not land mid-way"
    assert list_versions(out) == [], "a bundle was written before the kill"

    resumed = run_build(source, out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{len(names) - len(stored)} embedded, {len(stored)} reused" in resumed.stdout
    from apps.ingest.embedding import LocalEmbedding

    build_index(source, tmp_path / "clean", LocalEmbedding(random_embedder),
                BuildOptions(batch_size=4, trees=5, progress=False))

    ids, vectors = bundle_contents(out)
    clean_ids, clean_vectors = bundle_contents(tmp_path / "clean")
    assert ids == names == clean_ids  # each source item exactly once, in source order
    np.testing.assert_allclose(vectors, clean_vectors, rtol=1e-4, atol=1e-5)
    assert not (out / ".work").exists(), "the work shards outlived the bundle"


# --- in-process crashes with a stand-in model -------------------------------------------------------


class Crash(Exception):
    """Stands for the process dying."""


def local_features_of(root: Path) -> list[bytes]:
    with open_bundle(root) as bundle:
        assert bundle.manifest.local_features == "colour-bytes"
        return [bundle.local.get(i) for i in range(bundle.item_count)]


class ColourEmbedding:
    """A quick model: the image's mean colour and a few pixel statistics; bad bytes are BadImage. Its "local
    features" are the bytes of those statistics: opaque to the build, which must keep each with its item."""

    parallel_batches = 1
    info = common_pb2.ModelInfo(name="colour", feature="mean", dimension=6, fingerprint="fp-colour",
                                local_features="colour-bytes")

    def __init__(self, crash_after_batches: int | None = None):
        self.crash_after = crash_after_batches
        self.batches = 0
        self.embedded: list[int] = []

    def prepare(self, data: bytes) -> np.ndarray:
        import io

        try:
            with Image.open(io.BytesIO(data)) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        except Exception as error:
            raise BadImage(f"not an image: {error}") from None
        return np.concatenate([pixels.mean(axis=(0, 1)), pixels.std(axis=(0, 1))])

    def embed(self, prepared: list[np.ndarray]) -> list[Embedded]:
        if self.crash_after is not None and self.batches >= self.crash_after:
            raise Crash()
        self.batches += 1
        self.embedded.append(len(prepared))
        return [Embedded(p.astype(np.float32) + 0.01, p.astype(np.float32).tobytes()) for p in prepared]


OPTIONS = BuildOptions(batch_size=3, shard_size=2, trees=3, progress=False)


@pytest.fixture(scope="module")
def small_collection(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("small")
    names = draw_collection(folder, 14, size=16)
    (folder / "broken.png").write_bytes(b"not a png")
    return folder, names


def test_a_build_crashed_after_any_batch_resumes_to_the_same_bundle(tmp_path, small_collection):
    """Crash after 0, 1, 2, ... batches, then run again: every time the bundle equals the uninterrupted
    one, the bad file is rejected once, and the second run embeds only what the first did not store."""
    source, names = small_collection
    clean = tmp_path / "clean"
    build_index(source, clean, ColourEmbedding(), OPTIONS)
    clean_ids, clean_vectors = bundle_contents(clean)
    assert clean_ids == names  # "broken.png" rejected
    batches = (len(names) + 1 + OPTIONS.batch_size - 1) // OPTIONS.batch_size
    for crash_after in range(batches):
        out = tmp_path / f"crash-{crash_after}"
        with pytest.raises(Crash):
            build_index(source, out, ColourEmbedding(crash_after), OPTIONS)
        stored, rejected, local, _ = ShardStore(out / ".work" / "fp-colour").load()
        assert all(np.array_equal(np.frombuffer(local[i], np.float32) + 0.01, stored[i]) for i in stored)
        second = ColourEmbedding()
        result = build_index(source, out, second, OPTIONS)
        ids, vectors = bundle_contents(out)
        assert ids == clean_ids, crash_after
        np.testing.assert_array_equal(vectors, clean_vectors)
        assert local_features_of(out) == local_features_of(clean), "an item's local features were lost or swapped"
        assert sum(second.embedded) == len(names) - len(stored), crash_after
        assert result.rejected == 1 and (out / "rejects.jsonl").read_text().count("\"item_id\": \"broken.png\"") == 1


def test_a_build_crashed_while_writing_the_bundle_or_after_it_recovers(tmp_path, small_collection, monkeypatch):
    """A crash inside write_bundle leaves only a hidden scratch folder (removed by the next build); a crash
    after the bundle is written but before the shards are removed just builds the same bundle again."""
    source, names = small_collection
    out = tmp_path / "out"
    real_write = build_module.write_bundle

    def crashing_write(root, **kwargs):
        (Path(root) / ".building-crashed").mkdir(parents=True, exist_ok=True)
        raise Crash()

    monkeypatch.setattr(build_module, "write_bundle", crashing_write)
    with pytest.raises(Crash):
        build_index(source, out, ColourEmbedding(), OPTIONS)
    assert list_versions(out) == [] and (out / ".building-crashed").exists()
    monkeypatch.setattr(build_module, "write_bundle", real_write)

    monkeypatch.setattr(ShardStore, "remove", lambda self: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        build_index(source, out, ColourEmbedding(), OPTIONS)
    monkeypatch.undo()
    assert not (out / ".building-crashed").exists()
    first = read_current(out)
    again = ColourEmbedding()
    build_index(source, out, again, OPTIONS)
    assert again.embedded == [] and read_current(out) != first  # nothing embedded twice; a new version
    assert bundle_contents(out)[0] == names


def test_a_torn_or_damaged_shard_is_set_aside_and_its_items_embedded_again(tmp_path, small_collection):
    """A temporary file left by a kill during a shard write is removed; an unreadable shard is set aside
    (not trusted, not fatal) and its items are embedded again, each once."""
    source, names = small_collection
    out = tmp_path / "out"
    with pytest.raises(Crash):
        build_index(source, out, ColourEmbedding(3), OPTIONS)
    work = out / ".work" / "fp-colour"
    shards = sorted(work.glob("shard-*.npz"))
    assert len(shards) >= 2
    shards[0].write_bytes(shards[0].read_bytes()[:50])  # damaged
    (work / ".tmp-shard-000099.npz").write_bytes(b"half")  # torn write
    second = ColourEmbedding()
    build_index(source, out, second, OPTIONS)
    assert bundle_contents(out)[0] == names
    assert sum(second.embedded) > 0


def test_two_builds_into_one_root_at_once_are_refused(tmp_path, small_collection):
    """The second build gets a clear error while the first holds the root's lock; afterwards it works."""
    source, _ = small_collection
    out = tmp_path / "out"
    with build_module.build_lock(out):
        with pytest.raises(SourceError, match="another `cbir index build` is writing"):
            build_index(source, out, ColourEmbedding(), OPTIONS)
    build_index(source, out, ColourEmbedding(), OPTIONS)
