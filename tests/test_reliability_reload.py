"""Index versions and hot reload, deletions, warm start: the real indexer on 127.0.0.1:0 over real bundles.

Bundles are small (random 16-d vectors) so that the tests are about the lifecycle, not the model:
a new version made `current` is served without one failed request; a broken one (truncated file,
bad checksum, another model, missing) is refused and the live version stays; items on the
deletion list disappear from answers at once; the indexer turns SERVING only with its index in
the page cache.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from cbir import vectors as wire
from cbir.bundle import INDEX_FILE, ITEMS_FILE, add_deleted, remove_deleted, set_current, write_bundle
from cbir.health import wait_until_serving
from cbir.v1 import common_pb2, indexer_pb2, indexer_pb2_grpc
from services.indexer.server import IndexerServer
from services.indexer.settings import IndexerSettings

DIM = 16
SERVING = health_pb2.HealthCheckResponse.SERVING
StatusCode = grpc.StatusCode


def model(fingerprint: str = "fp-1", dim: int = DIM) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=dim, fingerprint=fingerprint)


def write_version(root: Path, n: int, *, seed: int = 0, fingerprint: str = "fp-1", version: str | None = None,
                  make_current: bool = True, dim: int = DIM) -> tuple[Path, np.ndarray]:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    path = write_bundle(
        root, ids=[f"p{i}" for i in range(n)], urls=[f"file:///p{i}.jpg" for i in range(n)], vectors=vectors,
        model=model(fingerprint, dim), metric="angular", trees=4, version=version, make_current=make_current,
    )
    return path, vectors


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Indexer:
    """A started IndexerServer and a stub on a channel to it."""

    def __init__(self, root: Path, **settings):
        defaults = dict(bundle=root, port=0, metrics_port=None, poll_seconds=0.05, watch_seconds=0.05, max_workers=8,
                        grace_seconds=0)
        self.server = IndexerServer(IndexerSettings(**{**defaults, **settings}))
        self.server.start_serving()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = indexer_pb2_grpc.IndexerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def wait_serving(self, timeout: float = 60.0) -> None:
        wait_until_serving(f"127.0.0.1:{self.server.port}", timeout_s=timeout)

    def info(self) -> indexer_pb2.GetIndexInfoResponse:
        return self.stub.GetIndexInfo(indexer_pb2.GetIndexInfoRequest(), timeout=10)

    def version(self) -> str:
        return self.info().index.bundle_version

    def query_vector(self, vector: np.ndarray, k: int = 5):
        return self.stub.QueryVector(indexer_pb2.QueryVectorRequest(vector=wire.to_proto(vector), k=k), timeout=10)

    def query_item(self, item_id: str, k: int = 5, exclude_self: bool = False):
        return self.stub.QueryItem(
            indexer_pb2.QueryItemRequest(item_id=item_id, k=k, exclude_self=exclude_self), timeout=10
        )

    def reload(self, version: str = "", allow_model_change: bool = False):
        return self.stub.ReloadBundle(
            indexer_pb2.ReloadBundleRequest(version=version, allow_model_change=allow_model_change), timeout=60
        )

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0)


def wait_until(condition, timeout: float = 30.0) -> None:
    """Poll `condition` until true (no assertion on how long that takes, only a generous bound)."""
    event = threading.Event()
    deadline = timeout / 0.02
    for _ in range(int(deadline)):
        try:
            if condition():
                return
        except grpc.RpcError:
            pass
        event.wait(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture
def indexers():
    started: list[Indexer] = []

    def start(root: Path, **settings) -> Indexer:
        indexer = Indexer(root, **settings)
        started.append(indexer)
        indexer.wait_serving()
        return indexer

    yield start
    for indexer in started:
        indexer.close()


class Traffic:
    """Threads querying the indexer without pause, recording each answer's version or error code."""

    def __init__(self, indexer: Indexer, threads: int = 4):
        self.indexer = indexer
        self.stop = threading.Event()
        self.versions: list[list[str]] = [[] for _ in range(threads)]
        self.errors: Counter[str] = Counter()
        self.error_details: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        self.query = np.ones(DIM, np.float32)

    def _run(self, number: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                if i % 2:
                    reply = self.indexer.query_vector(self.query, k=5)
                else:
                    reply = self.indexer.query_item(f"p{i % 40}", k=5)
                if len(reply.hits) != 5:  # a short answer counts as a failure (an assert here would only end the thread)
                    self.errors["SHORT_ANSWER"] += 1
                self.versions[number].append(reply.bundle_version)
            except grpc.RpcError as error:
                self.errors[error.code().name] += 1
                self.error_details.append(error.details())

    def __enter__(self) -> "Traffic":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    @property
    def answered(self) -> int:
        return sum(len(v) for v in self.versions)


# --- hot reload ----------------------------------------------------------------------------------


def test_a_new_version_made_current_is_served_without_one_failed_request(tmp_path, indexers):
    """v1 is served; while 4 threads query without pause, v2 is written and `current` switched to it.
    The indexer follows the pointer: every request succeeds, each answer comes from v1 or v2, and no
    thread sees v1 again once it has seen v2. Index info reports the live version and its item count."""
    root = tmp_path / "photos"
    v1, _ = write_version(root, 60, version="v1")
    indexer = indexers(root)
    assert indexer.version() == "v1"
    with Traffic(indexer) as traffic:
        wait_until(lambda: traffic.answered > 50)
        write_version(root, 80, seed=1, version="v2")
        wait_until(lambda: indexer.version() == "v2")
        seen = traffic.answered
        wait_until(lambda: traffic.answered > seen + 50)
    assert traffic.errors == Counter(), traffic.error_details[:5]
    assert {v for versions in traffic.versions for v in versions} == {"v1", "v2"}
    for versions in traffic.versions:
        assert "v1" not in versions[versions.index("v2"):] if "v2" in versions else True
    info = indexer.info().index
    assert (info.bundle_version, info.item_count) == ("v2", 80)


@pytest.mark.parametrize("damage", ["truncated index", "bad checksum", "other model", "missing file"])
def test_a_broken_version_is_refused_and_the_live_one_stays(tmp_path, indexers, damage):
    """A version that cannot be served, offered both ways (ReloadBundle, and made `current`), is refused
    with the reason (FAILED_PRECONDITION naming the file or the models) while traffic goes on without one
    failure; the live version stays v1. A good v3 made current afterwards is picked up."""
    root = tmp_path / "photos"
    write_version(root, 60, version="v1")
    bad, _ = write_version(root, 60, seed=2, version="v2", make_current=False,
                           fingerprint="fp-other" if damage == "other model" else "fp-1")
    if damage == "truncated index":
        with open(bad / INDEX_FILE, "r+b") as f:
            f.truncate(os.path.getsize(bad / INDEX_FILE) // 2)
        expected = "truncated"
    elif damage == "bad checksum":
        data = bytearray((bad / ITEMS_FILE).read_bytes())
        data[-10] ^= 0xFF
        (bad / ITEMS_FILE).write_bytes(bytes(data))
        expected = "fails its checksum"
    elif damage == "missing file":
        (bad / INDEX_FILE).unlink()
        expected = "is missing"
    else:
        expected = "fp-other"
    indexer = indexers(root)
    refused_before = sample("cbir_indexer_reloads_total", trigger="pointer", result="refused")
    with Traffic(indexer) as traffic:
        wait_until(lambda: traffic.answered > 20)
        with pytest.raises(grpc.RpcError) as caught:
            indexer.reload("v2")
        assert caught.value.code() is StatusCode.FAILED_PRECONDITION
        assert expected in caught.value.details()
        set_current(root, "v2")
        wait_until(lambda: sample("cbir_indexer_reloads_total", trigger="pointer", result="refused") > refused_before)
        seen = traffic.answered
        wait_until(lambda: traffic.answered > seen + 20)
    assert traffic.errors == Counter(), traffic.error_details[:5]
    assert {v for versions in traffic.versions for v in versions} == {"v1"}
    assert indexer.version() == "v1"

    write_version(root, 70, seed=3, version="v3")
    wait_until(lambda: indexer.version() == "v3")
    assert indexer.info().index.item_count == 70


def test_the_reload_rpc_switches_versions_both_ways_and_another_model_only_when_allowed(tmp_path, indexers):
    """ReloadBundle serves a named version (a rollback) or `current`; it reports what it did; a version of
    another model needs allow_model_change."""
    root = tmp_path / "photos"
    write_version(root, 30, version="v1")
    indexer = indexers(root, watch_seconds=3600)  # the watcher stays out of it: only the RPC switches
    write_version(root, 40, seed=1, version="v2")
    assert indexer.version() == "v1"

    reply = indexer.reload()
    assert (reply.reloaded, reply.bundle_version, reply.previous_version, reply.item_count) == (True, "v2", "v1", 40)
    reply = indexer.reload()
    assert (reply.reloaded, reply.bundle_version) == (False, "v2")
    reply = indexer.reload("v1")
    assert (reply.reloaded, reply.bundle_version, reply.previous_version) == (True, "v1", "v2")
    assert indexer.version() == "v1"

    write_version(root, 20, seed=5, version="v3", fingerprint="fp-new", make_current=False)
    with pytest.raises(grpc.RpcError) as caught:
        indexer.reload("v3")
    assert caught.value.code() is StatusCode.FAILED_PRECONDITION
    assert "fp-new" in caught.value.details() and "allow_model_change" in caught.value.details()
    reply = indexer.reload("v3", allow_model_change=True)
    assert reply.bundle_version == "v3" and indexer.info().index.model_fingerprint == "fp-new"

    with pytest.raises(grpc.RpcError) as caught:
        indexer.reload("no-such-version")
    assert caught.value.code() is StatusCode.FAILED_PRECONDITION
    assert "versions found: v1, v2, v3" in caught.value.details()


def test_a_configured_model_fingerprint_is_enforced_at_start(tmp_path):
    """CBIR_INDEXER_MODEL_FINGERPRINT: a bundle of another model is not served even at start (UNAVAILABLE
    with the reason), a matching one is."""
    root = tmp_path / "photos"
    write_version(root, 20, fingerprint="fp-a", version="v1")
    indexer = Indexer(root, model_fingerprint="fp-b")
    try:
        wait_until(lambda: "fp-b" in rpc_details(indexer))
        assert "CBIR_INDEXER_MODEL_FINGERPRINT" in rpc_details(indexer)
        write_version(root, 20, fingerprint="fp-b", version="v2")
        indexer.wait_serving()
        assert indexer.version() == "v2"
    finally:
        indexer.close()


def rpc_details(indexer: Indexer) -> str:
    try:
        indexer.info()
    except grpc.RpcError as error:
        assert error.code() is StatusCode.UNAVAILABLE
        return error.details()
    return ""


# --- deletions -----------------------------------------------------------------------------------


def test_deleted_items_disappear_from_every_answer_at_once_and_come_back_when_undeleted(tmp_path, indexers):
    """Ids added to the root's deletion list vanish from QueryVector (which still returns k hits),
    QueryItem (NOT_FOUND for the item itself, absent from others' hits), GetItems, and the item count."""
    root = tmp_path / "photos"
    _, vectors = write_version(root, 40, version="v1")
    indexer = indexers(root)
    gone = ["p3", "p7"]
    before = [h.item_id for h in indexer.query_vector(vectors[3], k=40).hits]
    assert "p3" in before and "p7" in before
    add_deleted(root, gone)
    wait_until(lambda: indexer.info().deleted_items == 2)

    hits = [h.item_id for h in indexer.query_vector(vectors[3], k=10).hits]
    assert len(hits) == 10 and not set(gone) & set(hits)
    assert [h for h in before if h not in gone][:10] == hits  # the same ranking, the deleted left out
    everything = [h.item_id for h in indexer.query_vector(vectors[3], k=40).hits]
    assert sorted(everything) == sorted(set(before) - set(gone))  # k above what is left: all 38
    with pytest.raises(grpc.RpcError) as caught:
        indexer.query_item("p3")
    assert caught.value.code() is StatusCode.NOT_FOUND and "deleted" in caught.value.details()
    assert not set(gone) & {h.item_id for h in indexer.query_item("p1", k=39).hits}
    with pytest.raises(grpc.RpcError) as caught:
        indexer.stub.GetItems(indexer_pb2.GetItemsRequest(item_ids=["p1", "p7"]), timeout=10)
    assert caught.value.code() is StatusCode.NOT_FOUND and "'p7'" in caught.value.details()
    info = indexer.info()
    assert (info.index.item_count, info.deleted_items, info.deleted_list) == (38, 2, str(root / "deleted.txt"))

    remove_deleted(root, ["p7"])
    wait_until(lambda: indexer.info().deleted_items == 1)
    assert "p7" in {h.item_id for h in indexer.query_vector(vectors[7], k=3).hits}


def test_reload_applies_the_deletion_list_immediately_and_new_versions_keep_it(tmp_path, indexers):
    """With the watcher slowed down, ReloadBundle re-reads the deletion list at once; a new version
    served later also hides the listed ids."""
    root = tmp_path / "photos"
    write_version(root, 30, version="v1")
    indexer = indexers(root, watch_seconds=3600)
    add_deleted(root, ["p0"])
    reply = indexer.reload()
    assert (reply.reloaded, reply.deleted_items, reply.item_count) == (False, 1, 29)
    with pytest.raises(grpc.RpcError):
        indexer.query_item("p0")
    write_version(root, 35, seed=1, version="v2")
    reply = indexer.reload()
    assert (reply.bundle_version, reply.deleted_items, reply.item_count) == ("v2", 1, 34)
    with pytest.raises(grpc.RpcError) as caught:
        indexer.query_item("p0")
    assert caught.value.code() is StatusCode.NOT_FOUND


# --- warm start ----------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache (mincore on a fresh read-only mapping: no fault-in)."""
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), "mmap failed"
        try:
            residency = (ctypes.c_ubyte * pages)()
            assert _libc.mincore(address, size, residency) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in residency) / pages
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("warm_up", [True, False])
def test_serving_is_reported_only_once_the_index_is_in_memory(tmp_path, indexers, warm_up):
    """The index file is evicted from the page cache, then the indexer starts (checksums off, so nothing
    else reads it). With warm-up (the default), every page of index.ann and items.sqlite is resident when
    health says SERVING: no first query waits for the disk. Without it, pages are missing: the check
    can tell the difference."""
    root = tmp_path / "photos"
    # 64-d x 60k items: an index of ~30 MB, more than the kernel reads ahead around one page fault
    # (up to 8 MB on some virtual disks), so that only a warm-up can bring all of it in.
    version, _ = write_version(root, 60_000, version="v1", dim=64)
    for name in (INDEX_FILE, ITEMS_FILE):
        evict(version / name)
    assert resident_fraction(version / INDEX_FILE) < 0.5, "the page cache did not drop the file"
    indexers(root, verify_checksums=False, warm_up=warm_up)
    index_resident, items_resident = resident_fraction(version / INDEX_FILE), resident_fraction(version / ITEMS_FILE)
    if warm_up:
        assert (index_resident, items_resident) == (1.0, 1.0)
    else:
        assert index_resident < 1.0


def test_the_cli_deletes_and_reloads_through_the_indexer(tmp_path, indexers):
    """`cbir index delete ROOT ID --indexer T` applies the deletion at once (watcher slowed down);
    `cbir index reload --indexer T [--version V]` switches versions and reports it; a refusal is an error
    with the indexer's reason."""
    from click.testing import CliRunner

    from apps import cli

    root = tmp_path / "photos"
    write_version(root, 30, version="v1")
    indexer = indexers(root, watch_seconds=3600)
    target = f"127.0.0.1:{indexer.server.port}"
    runner = CliRunner()
    result = runner.invoke(cli.main, ["index", "delete", str(root), "p4", "--indexer", target])
    assert result.exit_code == 0, result.output
    assert "serving v1, 29 items, 1 deleted" in result.output
    write_version(root, 31, seed=1, version="v2")
    result = runner.invoke(cli.main, ["index", "reload", "--indexer", target])
    assert result.exit_code == 0 and "switched from v1 to v2 (30 items, 1 deleted" in result.output, result.output
    result = runner.invoke(cli.main, ["index", "reload", "--indexer", target, "--version", "v9"])
    assert result.exit_code != 0 and "FAILED_PRECONDITION" in result.output and "v9" in result.output
