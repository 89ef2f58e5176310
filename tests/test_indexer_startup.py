"""Indexer start-up: settings, waiting for a missing or broken bundle, the `python -m services.indexer` process."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbir import vectors as wire
from cbir.bundle import INDEX_FILE, write_bundle
from cbir.v1 import common_pb2, indexer_pb2, indexer_pb2_grpc
from services.indexer.server import IndexerServer
from services.indexer.settings import IndexerSettings

REPO = Path(__file__).resolve().parents[1]
DIM = 16
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def write_demo(root: Path, n: int = 60, seed: int = 0) -> Path:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return write_bundle(
        root, ids=[f"p{i}" for i in range(n)], urls=[f"file:///p{i}.jpg" for i in range(n)], vectors=vectors,
        model=common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=DIM, fingerprint="fp"),
        metric="angular", trees=3,
    )


def health_status(channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service="cbir.v1.Indexer"), timeout=10).status


def wait_for_status(channel, wanted: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health_status(channel) == wanted:
            return
        time.sleep(0.02)
    raise AssertionError(f"health did not become {wanted} within {timeout}s")


def query(channel, k: int = 3):
    return indexer_pb2_grpc.IndexerStub(channel).QueryVector(
        indexer_pb2.QueryVectorRequest(vector=wire.to_proto(np.ones(DIM, np.float32)), k=k), timeout=10
    )


def wait_for_unavailable(channel, text: str, timeout: float = 30.0) -> str:
    """Poll until QueryVector answers UNAVAILABLE with `text` in its message (the first load attempt
    runs in the background); returns that message."""
    deadline = time.monotonic() + timeout
    details = ""
    while time.monotonic() < deadline:
        with pytest.raises(grpc.RpcError) as excinfo:
            query(channel)
        assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
        details = excinfo.value.details()
        if text in details:
            return details
        time.sleep(0.02)
    raise AssertionError(f"UNAVAILABLE message never mentioned {text!r}; last: {details!r}")


@pytest.fixture
def start_indexer():
    started = []

    def start(bundle: Path) -> grpc.Channel:
        settings = IndexerSettings(bundle=bundle, port=0, metrics_port=None, poll_seconds=0.05, max_workers=4)
        server = IndexerServer(settings)
        server.start_serving()
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        started.append((server, channel))
        return channel

    yield start
    for server, channel in started:
        channel.close()
        server.stop(0)


def test_missing_bundle_is_not_serving_then_serves_once_one_is_written(tmp_path, start_indexer):
    """Started on a path with no bundle: the process stays up, NOT_SERVING, RPCs get UNAVAILABLE saying
    which path is missing and how to build one; writing a bundle there turns it SERVING without a restart."""
    root = tmp_path / "bundles" / "demo"
    channel = start_indexer(root)
    assert health_status(channel) == NOT_SERVING
    details = wait_for_unavailable(channel, "cbir index build")
    assert f"no index bundle at {root}: the path does not exist" in details
    assert wait_for_unavailable(channel, "cbir index build") == details  # the same answer while it keeps polling
    with pytest.raises(grpc.RpcError) as excinfo:
        indexer_pb2_grpc.IndexerStub(channel).GetIndexInfo(indexer_pb2.GetIndexInfoRequest(), timeout=10)
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE

    version = write_demo(root)
    wait_for_status(channel, SERVING)
    reply = query(channel)
    assert len(reply.hits) == 3 and reply.bundle_version == version.name


def test_broken_bundle_is_not_serving_until_a_good_version_is_current(tmp_path, start_indexer):
    """A truncated index.ann keeps the indexer NOT_SERVING with the file named in the UNAVAILABLE message;
    a new good version made current is picked up."""
    root = tmp_path / "demo"
    broken = write_demo(root)
    with open(broken / INDEX_FILE, "r+b") as f:
        f.truncate(100)
    channel = start_indexer(root)
    details = wait_for_unavailable(channel, f"{broken / INDEX_FILE} is 100 bytes")
    assert "truncated" in details
    assert health_status(channel) == NOT_SERVING

    good = write_demo(root, seed=1)
    wait_for_status(channel, SERVING)
    assert query(channel).bundle_version == good.name


def test_settings_come_from_the_environment(monkeypatch):
    """CBIR_INDEXER_* variables set the fields; defaults run the local demo."""
    for name in list(os.environ):
        if name.startswith("CBIR_INDEXER_"):
            monkeypatch.delenv(name)
    defaults = IndexerSettings()
    assert (defaults.port, defaults.metrics_port, defaults.bundle) == (50052, 9102, Path("bundles/demo"))
    assert (defaults.max_k, defaults.prefault, defaults.poll_seconds, defaults.verify_checksums) == (1000, False, 5.0, True)
    monkeypatch.setenv("CBIR_INDEXER_BUNDLE", "/srv/bundles/openimages")
    monkeypatch.setenv("CBIR_INDEXER_MAX_K", "200")
    monkeypatch.setenv("CBIR_INDEXER_VERIFY_CHECKSUMS", "false")
    settings = IndexerSettings()
    assert (settings.bundle, settings.max_k, settings.verify_checksums) == (Path("/srv/bundles/openimages"), 200, False)
    monkeypatch.setenv("CBIR_INDEXER_POLL_SECONDS", "0")
    with pytest.raises(ValueError):
        IndexerSettings()


@pytest.mark.slow
def test_python_m_services_indexer_serves_and_stops_on_sigterm(tmp_path):
    """The real entry point: starts, serves the bundle from CBIR_INDEXER_BUNDLE, exits 0 on SIGTERM."""
    root = tmp_path / "demo"
    write_demo(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBIR_")}
    env.update(CBIR_INDEXER_BUNDLE=str(root), CBIR_INDEXER_PORT="0", CBIR_INDEXER_METRICS_PORT="0",
               CBIR_INDEXER_GRACE_SECONDS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.indexer"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True)
    reader.start()
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert process.poll() is None, "the indexer exited during start-up"
                continue
            match = re.search(r"gRPC port (\d+)", line)
            port = int(match.group(1)) if match else None
        assert port, "no 'gRPC port N' line in the log"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_for_status(channel, SERVING)
            assert len(query(channel, k=5).hits) == 5
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(10)  # EOF once the process is gone
        process.stderr.close()
