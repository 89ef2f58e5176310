"""Index backends behind one interface (cbir.bundle.ann): Annoy and the faiss types hnsw, hnsw-sq8 and
ivfpq, each written with write_bundle, opened with open_bundle and queried through the indexer's
SearchIndex (and, for hnsw, through a real gRPC indexer)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner

from apps.cli import main as cli
from apps.ingest.build import BuildOptions, build_index
from apps.ingest.embedding import Embedded
from cbir import vectors as wire
from cbir.bundle import (
    FAISS_INDEX_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    InvalidBundleInput,
    faiss_index,
    open_bundle,
    write_bundle,
)
from cbir.bundle.annoy_index import AnnoyBackend
from cbir.bundle.faiss_index import FaissBackend
from cbir.bundle.files import sha256_of
from cbir.errors import BundleError
from cbir.health import wait_until_serving
from cbir.v1 import common_pb2, indexer_pb2, indexer_pb2_grpc
from services.indexer.index import SearchIndex
from services.indexer.server import IndexerServer
from services.indexer.settings import IndexerSettings

DIM = 64
N = 3000
# IVF-PQ needs 39 items per PQ centroid (faiss_index.IVFPQ_MIN_ITEMS = 9,984) to train
IVF_N = 10_000
IVF_DIM = 32
FAISS_TYPES = ["hnsw", "hnsw-sq8", "ivfpq"]
BACKENDS = ["annoy"] + FAISS_TYPES
# recall@10 against exact search at the bundle's default effort, on seeded clustered vectors
# (measured: 1.0 for every backend; IVF-PQ's own codes find the neighbours only through the exact re-rank)
RECALL_AT_10 = {"annoy": 0.95, "hnsw": 0.95, "hnsw-sq8": 0.95, "ivfpq": 0.9}


def model(dimension: int, fingerprint: str = "fp-backends") -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=dimension, fingerprint=fingerprint)


def clustered(n: int, d: int, seed: int = 0, clusters: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d)) * 3
    return (centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, d))).astype(np.float32)


def shape(index_type: str) -> tuple[int, int]:
    return (IVF_N, IVF_DIM) if index_type == "ivfpq" else (N, DIM)


def build(root: Path, index_type: str, *, metric: str = "angular", seed: int = 0, **kwargs) -> tuple[Path, np.ndarray]:
    n, d = shape(index_type)
    vectors = clustered(n, d, seed)
    ids = [f"item{i}" for i in range(n)]
    folder = write_bundle(
        root, ids=ids, urls=[f"file:///photos/{i}.jpg" for i in ids], vectors=vectors, model=model(d),
        metric=metric, trees=10, index_type=index_type, **kwargs,
    )
    return folder, vectors


def exact_neighbours(vectors: np.ndarray, query: np.ndarray, k: int, metric: str) -> list[int]:
    if metric == "angular":
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.argsort(-(unit @ (query / np.linalg.norm(query))), kind="stable")[:k].tolist()
    return np.argsort(np.linalg.norm(vectors - query, axis=1), kind="stable")[:k].tolist()


def rows(hits) -> list[int]:
    return [int(h.item_id[4:]) for h in hits]


def recall_at(index: SearchIndex, vectors: np.ndarray, queries: np.ndarray, k: int, metric: str = "angular",
              search_k: int = 0) -> float:
    found = [len(set(rows(index.query_vector(q, k=k, search_k=search_k))) & set(exact_neighbours(vectors, q, k, metric)))
             for q in queries]
    return float(np.mean(found)) / k


def rewrite_manifest(folder: Path, **changes) -> None:
    path = folder / MANIFEST_FILE
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def replace_index(folder: Path, source: Path) -> None:
    """index.faiss replaced by `source`, the manifest's size and checksum updated to match."""
    path = folder / FAISS_INDEX_FILE
    path.write_bytes(source.read_bytes())
    files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    rewrite_manifest(folder, files={**files, FAISS_INDEX_FILE: {"sha256": sha256_of(path), "bytes": path.stat().st_size}})


@pytest.fixture(scope="module", params=BACKENDS)
def served(request, tmp_path_factory):
    """(index type, SearchIndex, vectors) of an angular bundle of each backend, built once per module."""
    folder, vectors = build(tmp_path_factory.mktemp(request.param) / "b", request.param)
    index = SearchIndex(open_bundle(folder), max_k=1000)
    yield request.param, index, vectors
    index.close()


# ---------------------------------------------------------------- search quality and conventions


def test_recall_at_10_against_exact_search_at_the_default_effort(served):
    """At search_k = 0 (the bundle's default effort) each backend finds the exact top 10 of held-out queries."""
    index_type, index, vectors = served
    queries = clustered(40, vectors.shape[1], seed=7)
    assert recall_at(index, vectors, queries, 10) >= RECALL_AT_10[index_type]


def test_a_stored_vector_finds_itself_first_with_score_one(served):
    """A stored vector comes back first at distance ~0, score ~1, distances ascending (Annoy's convention)."""
    _, index, vectors = served
    for i in (0, 17, len(vectors) - 1):
        hits = index.query_vector(vectors[i], k=5)
        assert hits[0].item_id == f"item{i}"
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].distance == pytest.approx(0.0, abs=2e-3)
        assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    by_item = index.query_item("item17", k=5)
    assert by_item[0].item_id == "item17" and by_item[0].score == pytest.approx(1.0, abs=1e-4)
    assert "item17" not in [h.item_id for h in index.query_item("item17", k=5, exclude_self=True)]


@pytest.mark.parametrize("index_type", BACKENDS)
@pytest.mark.parametrize("metric", ["angular", "euclidean"])
def test_distances_are_annoys_whatever_the_backend(tmp_path, index_type, metric):
    """angular: sqrt(2 - 2 cos); euclidean: the L2 distance (not squared), so score() reads every backend alike."""
    folder, vectors = build(tmp_path / "b", index_type, metric=metric)
    query = clustered(1, vectors.shape[1], seed=11)[0]
    with open_bundle(folder) as bundle:
        ids, distances = bundle.index.search(bundle.project(query), 10)
    if metric == "angular":
        unit = vectors[ids] / np.linalg.norm(vectors[ids], axis=1, keepdims=True)
        expected = np.sqrt(np.maximum(0, 2 - 2 * unit @ (query / np.linalg.norm(query))))
    else:
        expected = np.linalg.norm(vectors[ids] - query, axis=1)
    np.testing.assert_allclose(distances, expected, rtol=1e-3, atol=1e-3)


def test_effort_is_the_backends_own_and_changes_what_a_search_inspects(served):
    """search_k maps to Annoy's search_k, HNSW's efSearch (at least the candidates fetched) or IVF's nprobe (at most
    nlist); 0 is the bundle's default; a tiny effort on IVF-PQ finds fewer true neighbours than the default."""
    index_type, index, vectors = served
    bundle = index.bundle
    default = bundle.manifest.default_search_k
    assert index._search_k(10, 0) == (max(default, 10 * bundle.manifest.trees) if index_type == "annoy" else default)
    assert index._search_k(10, 10**15) < 2**31  # capped, never an overflow
    if index_type in ("hnsw", "hnsw-sq8"):
        assert default == faiss_index.HNSW_EF_SEARCH
        rerank = bundle.manifest.index_params.get("rerank", 1)
        assert index._search_k(10, 1) == 10 * rerank  # efSearch never below the candidates fetched
        assert index._search_k(10, 300) == 300
    if index_type == "ivfpq":
        nlist = bundle.manifest.index_params["nlist"]
        assert default == faiss_index.IVF_NPROBE and index._search_k(10, 10**15) == nlist
        queries = clustered(40, vectors.shape[1], seed=7)
        assert recall_at(index, vectors, queries, 10, search_k=1) < recall_at(index, vectors, queries, 10)
        # one list holds ~40 items, fewer than the 4 x 100 candidates: more lists are visited, k hits come back
        assert len(index.query_vector(queries[0], k=100, search_k=1)) == 100
    queries = clustered(10, vectors.shape[1], seed=8)
    if index_type == "ivfpq":  # every list visited, but only rerank x k candidates by their PQ codes
        assert recall_at(index, vectors, queries, 10, search_k=10**15) >= 0.95
    else:  # every tree, or an efSearch as large as the collection: exact
        everything = [rows(index.query_vector(q, k=10, search_k=10**15)) for q in queries]
        assert everything == [exact_neighbours(vectors, q, 10, "angular") for q in queries]


def test_deleted_items_are_left_out_and_k_hits_still_come_back(served):
    """With items hidden (a few, then most of the collection), every query still returns k hits, none hidden;
    Annoy asks for more neighbours, faiss leaves them out inside the search."""
    index_type, index, vectors = served
    query = vectors[5]
    nearest = rows(index.query_vector(query, k=30))
    try:
        index.set_deleted({f"item{i}" for i in nearest[:20]})
        hits = rows(index.query_vector(query, k=10))
        assert len(hits) == 10 and not set(hits) & set(nearest[:20])
        expected = [i for i in exact_neighbours(vectors, query, 40, "angular") if i not in nearest[:20]][:10]
        assert len(set(hits) & set(expected)) >= (7 if index_type == "ivfpq" else 9)  # the next nearest, not any 10
        by_item = rows(index.query_item(f"item{nearest[25]}", k=10, exclude_self=True))
        assert len(by_item) == 10 and not set(by_item) & (set(nearest[:20]) | {nearest[25]})
        most = {f"item{i}" for i in range(len(vectors)) if i % 10}  # 90% deleted
        index.set_deleted(most)
        hits = rows(index.query_vector(query, k=10))
        assert len(hits) == 10 and all(i % 10 == 0 for i in hits)
    finally:
        index.set_deleted(set())


def test_concurrent_queries_with_different_efforts_agree_with_sequential_ones(served):
    """Many threads querying one opened index, each with its own effort, get what one thread gets (the effort
    travels with each call, never through a shared attribute)."""
    _, index, vectors = served
    queries = clustered(24, vectors.shape[1], seed=9)
    efforts = [0, 1, 64, 500]

    def run(i: int) -> list[int]:
        return rows(index.query_vector(queries[i % len(queries)], k=10, search_k=efforts[i % len(efforts)]))

    sequential = [run(i) for i in range(96)]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(run, range(96))) == sequential


# ---------------------------------------------------------------- the bundle on disk


def test_a_manifest_without_index_type_is_annoy_and_keeps_its_bytes(tmp_path):
    """An Annoy bundle's manifest has no index_type (as before there were others) and opens as Annoy; a faiss
    bundle records its type, build parameters and default effort, and no trees."""
    folder, _ = build(tmp_path / "a", "annoy")
    text = (folder / MANIFEST_FILE).read_text(encoding="utf-8")
    assert "index_type" not in json.loads(text) and "index_params" not in json.loads(text)
    with open_bundle(folder) as bundle:
        assert bundle.manifest.index_type == "annoy" and isinstance(bundle.index, AnnoyBackend)
        assert bundle.manifest.to_json() == text
        assert set(bundle.manifest.files) == {INDEX_FILE, "items.sqlite", "features.npy"}
    folder, _ = build(tmp_path / "h", "hnsw", index_params={"m": 16, "ef_search": 64})
    text = (folder / MANIFEST_FILE).read_text(encoding="utf-8")
    data = json.loads(text)
    assert list(data)[7:11] == ["metric", "index_type", "index_params", "trees"]
    assert (data["index_type"], data["index_params"], data["trees"], data["default_search_k"]) == (
        "hnsw", {"m": 16, "ef_construction": faiss_index.HNSW_EF_CONSTRUCTION}, 0, 64)
    with open_bundle(folder) as bundle:
        assert isinstance(bundle.index, FaissBackend) and bundle.manifest.to_json() == text
        assert set(bundle.manifest.files) == {FAISS_INDEX_FILE, "items.sqlite", "features.npy"}


@pytest.mark.parametrize("index_type", FAISS_TYPES)
def test_the_faiss_index_is_memory_mapped(tmp_path, index_type):
    """The opened faiss index is a mapping of index.faiss (shared through the page cache), not a copy."""
    folder, _ = build(tmp_path / "b", index_type)
    with open_bundle(folder) as bundle:
        maps = Path("/proc/self/maps").read_text()
        assert str(folder / FAISS_INDEX_FILE) in maps
        bundle.index.search(bundle.project(clustered(1, shape(index_type)[1], seed=3)[0]), 5)
    assert str(folder / FAISS_INDEX_FILE) not in Path("/proc/self/maps").read_text()  # unmapped by close()


def test_pca_bundles_rerank_with_the_projected_features(tmp_path):
    """With PCA, the exact re-rank compares projected vectors: a stored vector still finds itself at score ~1."""
    folder, vectors = build(tmp_path / "b", "hnsw-sq8", pca_dimension=16)
    index = SearchIndex(open_bundle(folder))
    try:
        hits = index.query_vector(vectors[42], k=5)
        assert hits[0].item_id == "item42" and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert index.bundle.manifest.index_dimension == 16
    finally:
        index.close()


def test_a_corrupted_faiss_file_is_refused_in_plain_words(tmp_path):
    """Bytes changed: the checksum says so. Without checksums, a file faiss cannot read, or an index of another
    type or from other vectors, is a BundleError naming index.faiss and what to do, never a crash."""
    folder, _ = build(tmp_path / "b", "hnsw")
    path = folder / FAISS_INDEX_FILE
    original = path.read_bytes()
    path.write_bytes(original[:100] + bytes(b ^ 0xFF for b in original[100:200]) + original[200:])
    with pytest.raises(BundleError) as excinfo:
        open_bundle(folder)
    assert FAISS_INDEX_FILE in str(excinfo.value) and "checksum" in str(excinfo.value)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, len(original), dtype=np.uint8).tobytes())
    with pytest.raises(BundleError) as excinfo:
        open_bundle(folder, verify_checksums=False)
    message = str(excinfo.value)
    assert "faiss cannot read" in message and FAISS_INDEX_FILE in message and "cbir index build" in message
    other, _ = build(tmp_path / "other", "hnsw-sq8")
    replace_index(folder, other / FAISS_INDEX_FILE)
    with pytest.raises(BundleError, match="holds a faiss IndexHNSWSQ, but the manifest says index_type 'hnsw'"):
        open_bundle(folder)
    other, _ = build(tmp_path / "seed1", "hnsw", seed=1)
    replace_index(folder, other / FAISS_INDEX_FILE)
    with pytest.raises(BundleError, match="differs from row 0 of features.npy"):
        open_bundle(folder)
    other, _ = build(tmp_path / "32d", "hnsw", pca_dimension=32)
    replace_index(folder, other / FAISS_INDEX_FILE)
    with pytest.raises(BundleError, match="is a 32-d index .* but the manifest says 64-d angular"):
        open_bundle(folder)


def test_an_ivfpq_index_from_other_vectors_is_refused(tmp_path):
    """IVF-PQ cannot give its vectors back exactly, but item 0's code must sit near row 0 of the features."""
    folder, _ = build(tmp_path / "b", "ivfpq")
    other, _ = build(tmp_path / "other", "ivfpq", seed=1)
    replace_index(folder, other / FAISS_INDEX_FILE)
    with pytest.raises(BundleError, match="differs from row 0"):
        open_bundle(folder)


def test_manhattan_is_refused_for_faiss_in_words(tmp_path):
    """manhattan is Annoy's alone: write_bundle refuses it before writing anything, and a manifest that pairs
    them does not open."""
    n, d = shape("hnsw")
    with pytest.raises(InvalidBundleInput) as excinfo:
        write_bundle(tmp_path / "b", ids=[f"i{i}" for i in range(n)], urls=[""] * n, vectors=clustered(n, d),
                     model=model(d), metric="manhattan", trees=10, index_type="hnsw")
    assert "manhattan metric is only available with the annoy index" in str(excinfo.value)
    assert not (tmp_path / "b").exists()
    folder, _ = build(tmp_path / "c", "hnsw")
    rewrite_manifest(folder, metric="manhattan")
    with pytest.raises(BundleError, match="manhattan metric is only available with the annoy index"):
        open_bundle(folder)


def test_a_collection_too_small_for_ivfpq_is_refused_naming_the_index_to_use(tmp_path):
    """Fewer items than IVF-PQ needs to train: a sentence saying how many it needs and which index to use."""
    n, d = 2000, IVF_DIM
    with pytest.raises(InvalidBundleInput) as excinfo:
        write_bundle(tmp_path / "b", ids=[f"i{i}" for i in range(n)], urls=[""] * n, vectors=clustered(n, d),
                     model=model(d), metric="angular", trees=10, index_type="ivfpq")
    message = str(excinfo.value)
    assert f"at least {faiss_index.IVFPQ_MIN_ITEMS:,} items" in message and "2,000" in message
    assert "use --index hnsw" in message
    assert not (tmp_path / "b").exists()


def test_auto_is_annoy_below_a_million_items_and_ivfpq_from_there(tmp_path):
    """The build's default index type follows the collection's size (the measured choice, BENCHMARKS.md);
    faiss cannot serve manhattan, so auto stays with Annoy for it; parameters need a named index type."""
    from cbir.bundle.ann import AUTO_IVFPQ_ITEMS, resolve_index_type

    assert resolve_index_type("auto", AUTO_IVFPQ_ITEMS - 1, "angular") == "annoy"
    assert resolve_index_type("auto", AUTO_IVFPQ_ITEMS, "angular") == "ivfpq"
    assert resolve_index_type("auto", AUTO_IVFPQ_ITEMS, "euclidean") == "ivfpq"
    assert resolve_index_type("auto", 10 * AUTO_IVFPQ_ITEMS, "manhattan") == "annoy"
    assert resolve_index_type("hnsw", 10, "angular") == "hnsw"

    n, d = shape("annoy")
    kwargs = dict(ids=[f"i{i}" for i in range(n)], urls=[""] * n, vectors=clustered(n, d), model=model(d),
                  metric="angular", trees=10, index_type="auto")
    with open_bundle(write_bundle(tmp_path / "auto", **kwargs).parent) as bundle:
        assert bundle.manifest.index_type == "annoy" and (bundle.path / INDEX_FILE).exists()
    with pytest.raises(InvalidBundleInput, match="need an index type, not auto"):
        write_bundle(tmp_path / "params", **kwargs, index_params={"nlist": 8})
    assert not (tmp_path / "params").exists()


@pytest.mark.parametrize(
    "index_type,params,message",
    [("hnsw", {"nlist": 4}, "'nlist' do not apply to index type 'hnsw'"),
     ("hnsw", {"m": 0}, r"index_params\['m'\] must be an integer >= 1, got 0"),
     ("ivfpq", {"pq_m": 5}, r"index_params\['pq_m'\] 5 must divide the index dimension 32"),
     ("annoy", {"m": 8}, "do not apply to the annoy index")],
)
def test_index_params_that_cannot_work_are_refused(tmp_path, index_type, params, message):
    with pytest.raises(InvalidBundleInput, match=message):
        build(tmp_path / "b", index_type, index_params=params)


# ---------------------------------------------------------------- the indexer and the CLI


@pytest.fixture(scope="module")
def hnsw_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc") / "photos"
    _, vectors = build(root, "hnsw", pca_dimension=32)
    settings = IndexerSettings(bundle=root, port=0, metrics_port=0, max_workers=8, max_k=100, poll_seconds=0.05)
    server = IndexerServer(settings)
    server.start_serving()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    wait_until_serving(f"127.0.0.1:{server.port}", service="cbir.v1.Indexer", timeout_s=30)
    yield indexer_pb2_grpc.IndexerStub(channel), vectors
    channel.close()
    server.stop(0)


def test_an_hnsw_bundle_answers_query_vector_and_query_item_over_grpc(hnsw_server):
    """A real indexer on 127.0.0.1:0 serves an HNSW bundle (with PCA): QueryVector, QueryItem, GetIndexInfo."""
    stub, vectors = hnsw_server
    reply = stub.QueryVector(
        indexer_pb2.QueryVectorRequest(vector=wire.to_proto(vectors[7]), k=10, model_fingerprint="fp-backends"),
        timeout=10)
    assert len(reply.hits) == 10 and reply.hits[0].item_id == "item7"
    assert reply.hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.distance for h in reply.hits] == sorted(h.distance for h in reply.hits)
    reply = stub.QueryItem(indexer_pb2.QueryItemRequest(item_id="item7", k=10, exclude_self=True, search_k=300),
                           timeout=10)
    assert len(reply.hits) == 10 and "item7" not in [h.item_id for h in reply.hits]
    info = stub.GetIndexInfo(indexer_pb2.GetIndexInfoRequest(), timeout=10).index
    assert (info.index_type, info.trees, info.default_search_k, info.dimension) == (
        "hnsw", 0, faiss_index.HNSW_EF_SEARCH, 32)


def test_query_threads_are_limited_in_each_thread_that_searches(tmp_path):
    """set_query_threads(1) (what the indexer does) applies in every searching thread: OpenMP's thread count is
    a per-thread setting, so setting it once in the main thread would leave gRPC's threads at the default."""
    import faiss

    folder, vectors = build(tmp_path / "b", "hnsw")
    seen = []
    with open_bundle(folder) as bundle:
        def search() -> None:
            bundle.index.search(vectors[0], 5)
            seen.append(faiss.omp_get_max_threads())

        faiss_index.set_query_threads(1)
        try:
            worker = threading.Thread(target=search)
            worker.start()
            worker.join()
        finally:
            faiss_index.set_query_threads(0)
    assert seen == [1]


def test_cli_builds_each_index_type_and_refuses_manhattan_with_faiss(tmp_path):
    """`cbir index build-from-features --index hnsw --index-param ...` re-indexes a bundle; `index info` shows the
    index type (annoy for a manifest that does not say); --metric manhattan with a faiss index, or parameters for
    Annoy, are usage errors in words; too few items for ivfpq names the index to use."""
    source, _ = build(tmp_path / "annoy", "annoy")
    runner = CliRunner()
    info = runner.invoke(cli, ["index", "info", str(source)])
    assert info.exit_code == 0 and json.loads(info.output)["index_type"] == "annoy"
    result = runner.invoke(cli, ["index", "build-from-features", str(source), "--out", str(tmp_path / "hnsw"),
                                 "--index", "hnsw", "--index-param", "m=8", "--index-param", "ef_search=40"])
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(cli, ["index", "info", str(tmp_path / "hnsw")]).output)
    assert (info["index_type"], info["index_params"]["m"], info["default_search_k"]) == ("hnsw", 8, 40)
    result = runner.invoke(cli, ["index", "build-from-features", str(source), "--out", str(tmp_path / "p"),
                                 "--index", "annoy", "--index-param", "m=8"])
    assert result.exit_code == 2 and "annoy index takes no --index-param" in result.output
    result = runner.invoke(cli, ["index", "build-from-features", str(source), "--out", str(tmp_path / "p"),
                                 "--index-param", "m=8"])  # the default, auto: which index the parameter is for?
    assert result.exit_code == 2 and "--index-param needs an index type" in result.output
    result = runner.invoke(cli, ["index", "build-from-features", str(source), "--out", str(tmp_path / "m"),
                                 "--index", "ivfpq", "--metric", "manhattan"])
    assert result.exit_code == 2 and "only available with the annoy index" in result.output
    result = runner.invoke(cli, ["index", "build-from-features", str(source), "--out", str(tmp_path / "small"),
                                 "--index", "ivfpq"])
    assert result.exit_code == 1 and "use --index hnsw" in result.output


class PixelEmbedding:
    """A quick stand-in model for `cbir index build`: an image's pixels, scaled down, as its vector."""

    parallel_batches = 1
    info = common_pb2.ModelInfo(name="pixels", feature="raw", dimension=48, fingerprint="fp-pixels")

    def __init__(self):
        self.embedded = 0

    def prepare(self, data: bytes) -> np.ndarray:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB").resize((4, 4)), dtype=np.float32).reshape(-1) / 255 + 0.01

    def embed(self, prepared: list[np.ndarray]) -> list[Embedded]:
        self.embedded += len(prepared)
        return [Embedded(p, b"") for p in prepared]


def test_index_build_writes_the_index_type_asked_and_refuses_ivfpq_before_embedding(tmp_path):
    """`cbir index build --index hnsw` writes an HNSW bundle; --index ivfpq on a small collection is refused
    before a single image is embedded, saying which index to use."""
    from PIL import Image

    source = tmp_path / "photos"
    source.mkdir()
    rng = np.random.default_rng(5)
    for i in range(30):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(source / f"p{i:02d}.png")
    embedding = PixelEmbedding()
    result = build_index(source, tmp_path / "out", embedding,
                         BuildOptions(index_type="hnsw", index_params={"m": 8}, progress=False))
    with open_bundle(result.bundle) as bundle:
        assert (bundle.index_type, bundle.manifest.index_params["m"], bundle.item_count) == ("hnsw", 8, 30)
        assert bundle.index.search_by_item(3, 1)[0] == [3]
    embedding = PixelEmbedding()
    with pytest.raises(InvalidBundleInput, match="use --index hnsw"):
        build_index(source, tmp_path / "ivf", embedding, BuildOptions(index_type="ivfpq", progress=False))
    assert embedding.embedded == 0
    with pytest.raises(InvalidBundleInput, match="only available with the annoy index"):
        build_index(source, tmp_path / "m", embedding, BuildOptions(index_type="hnsw", metric="manhattan", progress=False))
