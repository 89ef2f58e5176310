"""The milvus index backend (cbir.bundle.milvus_index) against real Milvus: the embedded Milvus 2.3.5 standalone
server that the `milvus` package ships (`milvus-server`, started here on loopback with its own ports) and
milvus-lite databases (pymilvus runs them in-process). Real indexer gRPC servers on 127.0.0.1:0 serve the
bundles: the same top 10 as the Annoy backend and exact search, deletions and metadata filters with k hits,
a hot reload under load that fails no request and moves the Milvus alias, and errors in words."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pymilvus  # a dev dependency (cbir[milvus]), like the `milvus` package's milvus-server
import pytest

from cbir import filters
from cbir import vectors as wire
from cbir.bundle import (
    InvalidBundleInput,
    add_deleted,
    milvus_index,
    open_bundle,
    write_bundle,
)
from cbir.bundle.milvus_index import MilvusBackend
from cbir.errors import BundleError, UpstreamUnavailable
from cbir.filters import parse_filter
from cbir.health import wait_until_serving
from cbir.v1 import common_pb2, indexer_pb2, indexer_pb2_grpc
from services.indexer.index import SearchIndex
from services.indexer.server import IndexerServer
from services.indexer.settings import IndexerSettings

# The embedded server's launcher, shared with benchmarks/milvus_backend.py.
_spec = importlib.util.spec_from_file_location("cbir_milvus_server",
                                               Path(__file__).resolve().parents[1] / "benchmarks" / "_milvus.py")
_milvus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_milvus)

DIM = 64
N = 3000
FINGERPRINT = "fp-milvus"
COUNTRIES = ["fr", "de", "it", "es", "nl"]
RARE = {11, 222, 1333, 1444, 2555, 2666, 2777}


def clustered(n: int, d: int, seed: int = 0, clusters: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d)) * 3
    return (centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, d))).astype(np.float32)


def metadata_of(i: int) -> dict[str, str]:
    return {"country": COUNTRIES[i % 5], **({"rare": "yes"} if i in RARE else {})}


def build(root: Path, vectors: np.ndarray, index_type: str = "milvus", prefix: str = "item", **kwargs) -> Path:
    n, d = vectors.shape
    ids = [f"{prefix}{i}" for i in range(n)]
    return write_bundle(root, ids=ids, urls=[f"https://img.example/{i}.jpg" for i in ids], vectors=vectors,
                        model=common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=d, fingerprint=FINGERPRINT),
                        metric="angular", trees=10, index_type=index_type,
                        metadata=[metadata_of(i) for i in range(n)], **kwargs)


def exact_top(vectors: np.ndarray, query: np.ndarray, k: int, allowed=None) -> list[int]:
    rows = np.arange(len(vectors)) if allowed is None else np.array(sorted(allowed))
    unit = vectors[rows] / np.linalg.norm(vectors[rows], axis=1, keepdims=True)
    return rows[np.argsort(-(unit @ (query / np.linalg.norm(query))), kind="stable")[:k]].tolist()


def number(hit) -> int:
    return int(hit.item_id.lstrip("abcdefghijklmnopqrstuvwxyz"))


class Indexer:
    """A real IndexerServer on 127.0.0.1:0 and a stub on a channel to it."""

    def __init__(self, root: Path, wait: bool = True, **settings):
        defaults = {"bundle": root, "port": 0, "metrics_port": None, "poll_seconds": 0.05, "watch_seconds": 0.05,
                    "max_workers": 8, "grace_seconds": 0, "warm_up_queries": 8, "max_k": 100}
        self.server = IndexerServer(IndexerSettings(**{**defaults, **settings}))
        self.server.start_serving()
        self.target = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = indexer_pb2_grpc.IndexerStub(self.channel)
        if wait:
            wait_until_serving(self.target, service="cbir.v1.Indexer", timeout_s=60)

    def query(self, vector: np.ndarray, k: int = 10, conditions=()) -> indexer_pb2.QueryVectorResponse:
        request = indexer_pb2.QueryVectorRequest(vector=wire.to_proto(vector), k=k, model_fingerprint=FINGERPRINT,
                                                 filter=filters.to_proto(parse_filter(conditions)))
        return self.stub.QueryVector(request, timeout=20)

    def info(self) -> common_pb2.IndexInfo:
        return self.stub.GetIndexInfo(indexer_pb2.GetIndexInfoRequest(), timeout=10).index

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(0)


# ---------------------------------------------------------------------------------------- a real Milvus server


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    """The embedded Milvus standalone (`milvus-server`) on loopback, as the benchmarks run it (`_milvus`)."""
    with _milvus.embedded_milvus(tmp_path_factory.mktemp("milvus-server")) as uri:
        yield uri


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered(N, DIM)


@pytest.fixture(scope="module")
def served(milvus_server, vectors, tmp_path_factory):
    """(milvus indexer, annoy indexer, milvus bundle root) over the same vectors, each a real gRPC indexer."""
    root = tmp_path_factory.mktemp("milvus") / "photos"
    build(root, vectors, milvus_uri=milvus_server)
    other = tmp_path_factory.mktemp("annoy") / "photos"
    build(other, vectors, "annoy")
    milvus, annoy = Indexer(root), Indexer(other)
    yield milvus, annoy, root
    milvus.stop()
    annoy.stop()


@pytest.mark.slow
def test_top_10_over_grpc_equals_annoys_and_exact_search(served, vectors):
    """100 held-out queries through real indexers (50 new points of the items' clusters, 50 of other clusters,
    far from every item): the milvus bundle's top 10 is the Annoy bundle's, and the exact top 10, for >= 95 % of
    them; a stored vector finds itself first at score 1, distances ascending."""
    milvus, annoy, root = served
    rng = np.random.default_rng(7)
    near = vectors[rng.integers(0, N, 50)] + rng.normal(size=(50, DIM)).astype(np.float32)
    queries = np.concatenate([near, clustered(50, DIM, seed=7)])
    same_as_annoy = same_as_exact = 0
    for query in queries:
        found = [number(h) for h in milvus.query(query).hits]
        assert len(found) == 10
        same_as_annoy += set(found) == {number(h) for h in annoy.query(query).hits}
        same_as_exact += set(found) == set(exact_top(vectors, query, 10))
    assert same_as_annoy >= 95 and same_as_exact >= 95, (same_as_annoy, same_as_exact)
    reply = milvus.query(vectors[7])
    assert reply.hits[0].item_id == "item7" and reply.hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.distance for h in reply.hits] == sorted(h.distance for h in reply.hits)
    by_item = milvus.stub.QueryItem(indexer_pb2.QueryItemRequest(item_id="item7", k=10, exclude_self=True), timeout=10)
    assert len(by_item.hits) == 10 and "item7" not in [h.item_id for h in by_item.hits]
    info = milvus.info()
    assert (info.index_type, info.trees, info.default_search_k) == ("milvus", 0, milvus_index.EF_SEARCH)
    manifest = json.loads((root / reply.bundle_version / "manifest.json").read_text())
    assert manifest["milvus"]["uri"].startswith("http://127.0.0.1:")
    assert manifest["index_params"] == {"m": 32, "ef_construction": 200}
    client = pymilvus.MilvusClient(manifest["milvus"]["uri"])  # the collection, as other Milvus clients read it
    try:
        (row,) = client.get(manifest["milvus"]["alias"], ids=[7], output_fields=["item_id", "url", "metadata", "vector"])
    finally:
        client.close()
    assert (row["item_id"], row["url"], row["metadata"]) == ("item7", "https://img.example/item7.jpg", metadata_of(7))
    assert np.allclose(row["vector"], vectors[7])


@pytest.fixture(scope="module")
def searched(served):
    """The milvus bundle opened in-process (its own client of the same collection) behind the indexer's SearchIndex."""
    _, _, root = served
    index = SearchIndex(open_bundle(root), max_k=100)
    assert isinstance(index.bundle.index, MilvusBackend)
    yield index
    index.close()


@pytest.mark.slow
@pytest.mark.parametrize("listed", [milvus_index.MAX_FILTER_IDS, 16], ids=["milvus-filters", "fetch-more"])
def test_deleted_and_filtered_items_never_come_back_and_k_hits_do(searched, vectors, monkeypatch, listed):
    """Deleted items and metadata filters, sent to Milvus as an id filter expression or (more ids than
    `listed`) applied here to more hits: k hits, none deleted, all allowed, nearly the exact ones. Milvus does
    the search, except where reading the allowed items costs less than the HNSW search (here, with its
    3,000 items: 20 % of them at any effort, 7 items) and they are searched exactly."""
    monkeypatch.setattr(milvus_index, "MAX_FILTER_IDS", listed)
    query = vectors[5]
    nearest = exact_top(vectors, query, 30)
    exact_search = []
    real_nearest_in = milvus_index.nearest_in
    monkeypatch.setattr(milvus_index, "nearest_in", lambda *a, **kw: exact_search.append(1) or real_nearest_in(*a, **kw))
    try:
        searched.set_deleted({f"item{i}" for i in nearest[:20]})
        hits = [number(h) for h in searched.query_vector(query, k=10)]
        expected = [i for i in exact_top(vectors, query, 40) if i not in nearest[:20]][:10]
        assert len(hits) == 10 and not set(hits) & set(nearest[:20]) and len(set(hits) & set(expected)) >= 9
        by_item = [number(h) for h in searched.query_item(f"item{nearest[25]}", k=10, exclude_self=True)]
        assert len(by_item) == 10 and not set(by_item) & (set(nearest[:20]) | {nearest[25]})
        assert not exact_search
        # 60 % allowed at ef 30 x 32 links / 0.6: the HNSW search inspects fewer vectors than the 1,780 allowed
        for conditions, allowed, effort, exact in ((["country in fr,de,it"], {i for i in range(N) if i % 5 < 3}, 30, False),
                                                   (["country=fr"], {i for i in range(N) if i % 5 == 0}, 0, True)):
            allowed = allowed - set(nearest[:20])
            hits = [number(h) for h in searched.query_vector(query, k=10, search_k=effort,
                                                            conditions=parse_filter(conditions))]
            assert len(hits) == 10 and set(hits) <= allowed
            assert len(set(hits) & set(exact_top(vectors, query, 10, allowed))) >= 9
            assert bool(exact_search) == exact, conditions
        most = {f"item{i}" for i in range(N) if i % 10}  # 90 % deleted: more ids than Milvus is sent
        searched.set_deleted(most)
        hits = [number(h) for h in searched.query_vector(query, k=10)]
        assert len(hits) == 10 and all(i % 10 == 0 for i in hits)
        searched.set_deleted(set())
        rare = [number(h) for h in searched.query_vector(query, k=5, conditions=parse_filter(["rare=yes"]))]
        assert rare == exact_top(vectors, query, 5, RARE) and exact_search  # 7 items: searched exactly
    finally:
        searched.set_deleted(set())


@pytest.mark.slow
def test_filters_and_deletions_reach_milvus_through_the_indexer(served, vectors):
    """Over gRPC: a metadata filter gives k matching hits; items on the bundle root's deletion list vanish."""
    milvus, _, root = served
    query = vectors[40]
    hits = milvus.query(query, k=10, conditions=["country=de"]).hits
    assert len(hits) == 10 and all(dict(h.metadata)["country"] == "de" for h in hits)
    first = milvus.query(query, k=3).hits[0].item_id
    add_deleted(root, [first])
    try:
        deadline = time.monotonic() + 10
        while first in [h.item_id for h in milvus.query(query, k=3).hits]:
            assert time.monotonic() < deadline, "the deleted item still comes back"
            time.sleep(0.05)
        assert len(milvus.query(query, k=10).hits) == 10
    finally:
        (root / "deleted.txt").unlink()


@pytest.mark.slow
def test_a_new_version_goes_live_under_load_without_a_failed_request_and_moves_the_alias(milvus_server, tmp_path):
    """Four clients query without pause while a new version is built into its own collection and made current:
    the alias names the new collection, the indexer swaps to it, no request fails, and every answer is the exact
    top 5 of the version it names (the indexer searches each version's own collection, never the alias, which
    names the new collection before the indexer has swapped)."""
    root = tmp_path / "photos"
    versions = {"a": clustered(600, DIM, seed=1), "b": clustered(600, DIM, seed=2)}
    first = build(root, versions["a"], prefix="a", milvus_uri=milvus_server)
    indexer = Indexer(root)
    client = pymilvus.MilvusClient(milvus_server)
    old = json.loads((first / "manifest.json").read_text())["milvus"]
    assert client.describe_alias(old["alias"])["collection_name"] == old["collection"]
    stop, errors, answers = threading.Event(), [], []

    def hammer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            try:
                query = rng.normal(size=DIM).astype(np.float32)
                reply = indexer.query(query, k=5)
                answers.append((reply.bundle_version, query, [h.item_id for h in reply.hits]))
            except grpc.RpcError as error:
                errors.append(f"{error.code()}: {error.details()}")

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        second = build(root, versions["b"], prefix="b", milvus_uri=milvus_server)
        deadline = time.monotonic() + 60
        while indexer.info().bundle_version != second.name:
            assert time.monotonic() < deadline, "the indexer did not switch to the new version"
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        indexer.stop()
    new = json.loads((second / "manifest.json").read_text())["milvus"]
    assert not errors, errors[:3]
    assert {version for version, _, _ in answers} == {first.name, second.name}
    for version, query, hits in answers:
        prefix = "a" if version == first.name else "b"
        assert hits == [f"{prefix}{i}" for i in exact_top(versions[prefix], query, 5)]
    assert (new["alias"], client.describe_alias(new["alias"])["collection_name"]) == (old["alias"], new["collection"])
    assert client.has_collection(old["collection"])  # the old version stays servable
    client.close()


# ---------------------------------------------------------------------------------------- milvus-lite


@pytest.fixture
def lite_bundle(tmp_path, monkeypatch) -> tuple[Path, np.ndarray]:
    """A milvus bundle built without a server: a milvus-lite database inside its version folder."""
    monkeypatch.delenv(milvus_index.URI_ENV, raising=False)
    vectors = clustered(2000, 32, seed=3)
    return build(tmp_path / "lite", vectors), vectors


def test_a_milvus_lite_bundle_is_self_contained_and_served_over_grpc(lite_bundle):
    """By default the collection goes into a milvus-lite database in the version folder (its alias with it);
    a real indexer serves it with the exact top 10 for >= 95 % of queries; another process cannot open the
    database while the indexer holds it, and is told so in words."""
    folder, vectors = lite_bundle
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["index_type"] == "milvus" and manifest["milvus"]["uri"] == "milvus.db"
    assert (folder / "milvus.db").is_dir() and "milvus.db" not in manifest["files"]
    indexer = Indexer(folder.parent)
    try:
        queries = clustered(40, 32, seed=8)
        same = sum({number(h) for h in indexer.query(q).hits} == set(exact_top(vectors, q, 10)) for q in queries)
        assert same >= 38
        other = subprocess.run(
            [sys.executable, "-c", ("import sys; from cbir.bundle import open_bundle\n"
                                    "try:\n    open_bundle(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)"),
             str(folder.parent)], capture_output=True, text=True, timeout=120, check=False)
        assert other.stdout.startswith(f"BundleError the milvus-lite database {folder / 'milvus.db'} is open in "
                                       "another process"), other.stdout + other.stderr[-2000:]
    finally:
        indexer.stop()
    client = pymilvus.MilvusClient(str(folder / "milvus.db"))  # released by the indexer's close
    try:
        assert client.describe_alias("cbir_lite")["collection_name"] == manifest["milvus"]["collection"]
    finally:
        client.close()
        milvus_index._release_lite(os.path.abspath(folder / "milvus.db"))


def test_milvus_going_away_while_serving_is_unavailable_in_words(lite_bundle, monkeypatch):
    """The Milvus behind an opened bundle stops: a search is UpstreamUnavailable naming the collection and why."""
    folder, vectors = lite_bundle
    monkeypatch.setattr(milvus_index, "SEARCH_TIMEOUT_S", 1.0)
    bundle = open_bundle(folder.parent)
    try:
        assert bundle.index.search(vectors[3], 5)[0][0] == 3
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(str(folder / "milvus.db"))
        with pytest.raises(UpstreamUnavailable) as caught:
            bundle.index.search(vectors[3], 5)
        message = str(caught.value)
        assert message.startswith(f"Milvus collection {bundle.manifest.milvus.collection} at {folder / 'milvus.db'} "
                                  "did not answer a search: ")
        assert "Traceback" not in message and "<" not in message
    finally:
        bundle.close()


# ---------------------------------------------------------------------------------------- errors in words


def test_a_milvus_that_cannot_be_reached_is_a_sentence_at_open_and_over_grpc(lite_bundle, tmp_path):
    """A server nobody listens on, a database without the collection, no pymilvus: a BundleError saying what
    and what to do; an indexer pointed at an unreachable Milvus answers UNAVAILABLE with that sentence."""
    folder, _ = lite_bundle
    closed = f"http://127.0.0.1:{_milvus.free_port()}"
    with pytest.raises(BundleError) as caught:
        open_bundle(folder.parent, milvus_uri=closed)
    message = str(caught.value)
    assert message.startswith(f"cannot reach the Milvus server at {closed}: Fail connecting to server")
    assert "CBIR_MILVUS_URI" in message and "Traceback" not in message and "<" not in message
    with pytest.raises(BundleError, match=r"the Milvus at \S+empty.db has no collection cbir_lite_\w+, which holds "
                                          r"the index of bundle version"):
        open_bundle(folder.parent, milvus_uri=str(tmp_path / "empty.db"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["milvus"]["uri"] = closed
    (folder / "manifest.json").write_text(json.dumps(manifest))
    indexer = Indexer(folder.parent, wait=False)
    try:
        deadline = time.monotonic() + 30
        while True:
            with pytest.raises(grpc.RpcError) as caught:
                indexer.query(np.ones(32, np.float32))
            if "cannot reach" in caught.value.details() or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"cannot reach the Milvus server at {closed}" in caught.value.details()
    finally:
        indexer.stop()


def test_without_pymilvus_a_milvus_bundle_says_what_to_install(lite_bundle, monkeypatch):
    folder, _ = lite_bundle
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # import pymilvus raises ImportError
    with pytest.raises(BundleError, match=r"pymilvus is not installed: pip install 'cbir\[milvus\]'"):
        open_bundle(folder.parent)


@pytest.mark.parametrize("kwargs,message", [
    ({"milvus_uri": "/tmp/somewhere/index"}, ("is neither a server address (like http://milvus:19530) nor a "
                                              "milvus-lite database (a path ending in .db)")),
    ({"milvus_uri": "http://user:secret@milvus:19530"}, "the Milvus URI holds credentials"),
    ({"metric": "manhattan"}, "the manhattan metric is only available with the annoy index"),
    ({"index_params": {"nlist": 4}}, ("index_params 'nlist' do not apply to index type 'milvus' (it takes m, "
                                      "ef_construction, ef_search)")),
    ({"index_params": {"m": 1}}, "index_params['m'] must be between 2 and 2048"),
])
def test_a_build_that_cannot_work_is_refused_before_anything_is_written(tmp_path, kwargs, message):
    vectors = clustered(50, 8)
    metric = kwargs.pop("metric", "angular")
    with pytest.raises(InvalidBundleInput) as caught:
        write_bundle(tmp_path / "b", ids=[f"i{i}" for i in range(50)], urls=[""] * 50, vectors=vectors,
                     model=common_pb2.ModelInfo(name="m", feature="f", dimension=8, fingerprint="fp"), metric=metric,
                     trees=1, index_type="milvus", **kwargs)
    assert message in str(caught.value)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_a_build_against_a_milvus_nobody_serves_is_refused_in_words_and_leaves_nothing(tmp_path):
    closed = f"http://127.0.0.1:{_milvus.free_port()}"
    with pytest.raises(InvalidBundleInput) as caught:
        build(tmp_path / "b", clustered(50, 8), milvus_uri=closed)
    assert str(caught.value).startswith(f"cannot reach the Milvus server at {closed}: ")
    assert not list((tmp_path / "b").iterdir())  # no version, no scratch folder


def test_the_compose_profiles_job_reindexes_a_bundles_features_into_milvus(tmp_path, monkeypatch):
    """`cbir index build-from-features ROOT --out ROOT --index milvus` (the compose profile's one-shot job): the
    bundle's stored vectors, ids, URLs and metadata go into a collection, as a new current version."""
    from apps.ingest.from_features import build_from_features

    monkeypatch.delenv(milvus_index.URI_ENV, raising=False)
    vectors = clustered(500, 16, seed=4)
    root = tmp_path / "demo"
    first = build(root, vectors, "annoy")
    result = build_from_features(root, root, index_type="milvus")
    with open_bundle(root) as bundle:
        assert bundle.version != first.name and result.bundle == bundle.path
        assert isinstance(bundle.index, MilvusBackend) and bundle.index.count == 500
        assert bundle.index.search(vectors[42], 3)[0][0] == 42
        assert bundle.items_by_annoy_ids([42])[0].metadata == metadata_of(42)
        assert '"index_type": "milvus"' in (bundle.path / "manifest.json").read_text()
