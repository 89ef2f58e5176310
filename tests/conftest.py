"""Fixtures shared by the end-to-end tests: a VGG-16 with seeded random weights (the real loading
code, `weights="random"`), a bundle built from real demo photos, and the three real services on
127.0.0.1:0."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil

import pytest

from cbir.health import wait_until_serving

# The embedder's precision "auto" picks bfloat16 on CPUs with bfloat16 instructions; the suite's vectors must
# not depend on which CPU runs it, so every embedder here (in-process or a service started by a test) computes
# in float32 unless a test asks otherwise (tests/test_embedder_precision.py).
os.environ.setdefault("CBIR_EMBEDDER_PRECISION", "float32")

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO_PHOTOS = ROOT / "demo" / "photos"
# A varied subset of the demo photos keeps the suite quick on 2 CPU cores.
E2E_PHOTOS = [
    "skimage-astronaut.jpg", "skimage-coffee.jpg", "skimage-chelsea.jpg", "skimage-rocket.jpg",
    "skimage-motorcycle_left.jpg", "opencv-baboon.jpg", "opencv-fruits.jpg", "opencv-messi5.jpg",
    "opencv-board.jpg", "opencv-home.jpg", "plasma-kite.jpg", "plasma-autumn.jpg",
    "mate-aqua.jpg", "mate-greenmeadow.jpg", "lomiri-dragonfly_by_bolly.jpg", "opencv-apple.jpg",
]


@pytest.fixture(scope="session")
def random_embedder():
    """VGG-16 (gem, 512-d) with weights drawn from a seeded generator, built once per session."""
    from services.embedder.embedder import Embedder
    from services.embedder.settings import EmbedderSettings

    return Embedder.from_settings(EmbedderSettings(weights="random", random_seed=7))


@pytest.fixture(scope="session")
def collection(tmp_path_factory) -> pathlib.Path:
    """A folder of real photos plus two files that are not usable images (they must be rejected)."""
    folder = tmp_path_factory.mktemp("collection")
    for name in E2E_PHOTOS:
        target = folder / ("nested" if name.startswith("opencv") else "") / name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(DEMO_PHOTOS / name, target)
    (folder / "truncated.jpg").write_bytes((DEMO_PHOTOS / E2E_PHOTOS[0]).read_bytes()[:2000])
    (folder / "notes.png").write_bytes(b"this is text, not a PNG")
    return folder


@dataclasses.dataclass
class BuiltBundle:
    root: pathlib.Path
    result: object  # apps.ingest.build.BuildResult


@pytest.fixture(scope="session")
def bundle(tmp_path_factory, collection, random_embedder) -> BuiltBundle:
    """`cbir index build` over the collection, in-process, with the random-weights model."""
    from apps.ingest.build import BuildOptions, build_index
    from apps.ingest.embedding import LocalEmbedding

    root = tmp_path_factory.mktemp("bundles") / "photos"
    result = build_index(collection, root, LocalEmbedding(random_embedder),
                         BuildOptions(batch_size=8, progress=False))
    return BuiltBundle(root, result)


@dataclasses.dataclass
class Stack:
    embedder: str
    indexer: str
    gateway: str
    servers: list


@pytest.fixture(scope="session")
def stack(random_embedder, bundle):
    """Embedder, indexer and gateway, each a real gRPC server on 127.0.0.1:0, wired together."""
    from services.embedder.server import EmbedderServer
    from services.embedder.settings import EmbedderSettings
    from services.gateway.server import GatewayServer
    from services.gateway.settings import GatewaySettings
    from services.indexer.server import IndexerServer
    from services.indexer.settings import IndexerSettings

    embedder = EmbedderServer(EmbedderSettings(port=0, metrics_port=None, weights="random", random_seed=7))
    embedder.start()
    embedder.load(random_embedder)
    indexer = IndexerServer(IndexerSettings(port=0, metrics_port=None, bundle=bundle.root))
    indexer.start_serving()
    wait_until_serving(f"127.0.0.1:{indexer.port}")
    gateway = GatewayServer(GatewaySettings(
        port=0, metrics_port=None,
        embedder_target=f"127.0.0.1:{embedder.port}", indexer_target=f"127.0.0.1:{indexer.port}",
    ))
    gateway.start_serving()
    yield Stack(f"127.0.0.1:{embedder.port}", f"127.0.0.1:{indexer.port}", f"127.0.0.1:{gateway.port}",
                [gateway, indexer, embedder])
    for server in (gateway, indexer, embedder):
        server.stop(0)




def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


_EXIT_STATUS = pytest.StashKey[int]()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without finalizing the interpreter once the results are reported: the suite runs gRPC, TensorFlow and
    Ray in one process, and a C thread of theirs that takes the GIL while Python finalizes crashes it (seen once in
    a clean-clone run: 830 passed, then a segmentation fault at exit, status 139; gRPC's polling threads do this,
    grpc/grpc#11804). The status is the run's own."""
    if _EXIT_STATUS in config.stash:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[_EXIT_STATUS])
