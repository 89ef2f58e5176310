"""The indexer over real gRPC: a real server on 127.0.0.1:0 serving a real bundle."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import prometheus_client
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbir import vectors as wire
from cbir.bundle import write_bundle
from cbir.health import wait_until_serving
from cbir.v1 import common_pb2, indexer_pb2, indexer_pb2_grpc
from services.indexer.server import IndexerServer
from services.indexer.settings import IndexerSettings

DIM = 32
N = 500
FINGERPRINT = "fp-grpc-test"


def clustered(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(10, DIM)) * 3
    return (centers[rng.integers(0, 10, n)] + rng.normal(size=(n, DIM))).astype(np.float32)


@pytest.fixture(scope="module")
def vectors():
    return clustered(N)


@pytest.fixture(scope="module")
def server(tmp_path_factory, vectors):
    root = tmp_path_factory.mktemp("bundles") / "demo"
    ids = [f"photo-{i}" for i in range(N)]
    write_bundle(
        root, ids=ids, urls=[f"https://img.example/{i}.jpg" for i in ids], vectors=vectors,
        model=common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=DIM, fingerprint=FINGERPRINT),
        metric="angular", trees=8, pca_dimension=16, metadata=[{"idx": i} for i in range(N)],
    )
    settings = IndexerSettings(bundle=root, port=0, metrics_port=0, max_workers=8, max_k=100, poll_seconds=0.05)
    srv = IndexerServer(settings)
    srv.start_serving()
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    wait_until_serving(f"127.0.0.1:{srv.port}", service="cbir.v1.Indexer", timeout_s=30)
    yield srv, channel
    channel.close()
    srv.stop(0)


@pytest.fixture
def stub(server):
    return indexer_pb2_grpc.IndexerStub(server[1])


def assert_still_serving(server, stub, vectors) -> None:
    health = health_pb2_grpc.HealthStub(server[1])
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    reply = stub.QueryVector(indexer_pb2.QueryVectorRequest(vector=wire.to_proto(vectors[0]), k=1), timeout=10)
    assert reply.hits[0].item_id == "photo-0"


def test_query_vector_returns_the_nearest_items_best_first(stub, vectors):
    """A stored vector comes back as its own item first (score ~1), with URL and metadata, hits best first."""
    reply = stub.QueryVector(
        indexer_pb2.QueryVectorRequest(vector=wire.to_proto(vectors[7]), k=25, model_fingerprint=FINGERPRINT),
        timeout=10,
    )
    assert len(reply.hits) == 25
    first = reply.hits[0]
    assert (first.item_id, first.url, dict(first.metadata)) == ("photo-7", "https://img.example/photo-7.jpg", {"idx": "7"})
    assert first.score == pytest.approx(1.0, abs=1e-4)
    distances = [h.distance for h in reply.hits]
    assert distances == sorted(distances)
    assert reply.bundle_version


def test_query_item_excludes_itself_when_asked(stub):
    """QueryItem by id: the item itself first, or left out with exclude_self."""
    hits = stub.QueryItem(indexer_pb2.QueryItemRequest(item_id="photo-3", k=5), timeout=10).hits
    assert hits[0].item_id == "photo-3"
    others = stub.QueryItem(indexer_pb2.QueryItemRequest(item_id="photo-3", k=5, exclude_self=True), timeout=10).hits
    assert len(others) == 5 and "photo-3" not in [h.item_id for h in others]


def test_get_items_in_request_order(stub):
    """GetItems answers in the order asked, with URLs and metadata."""
    items = stub.GetItems(indexer_pb2.GetItemsRequest(item_ids=["photo-9", "photo-1"]), timeout=10).items
    assert [(i.item_id, i.url, dict(i.metadata)) for i in items] == [
        ("photo-9", "https://img.example/photo-9.jpg", {"idx": "9"}),
        ("photo-1", "https://img.example/photo-1.jpg", {"idx": "1"}),
    ]


def test_get_index_info(stub, server):
    """GetIndexInfo describes the served bundle."""
    info = stub.GetIndexInfo(indexer_pb2.GetIndexInfoRequest(), timeout=10).index
    assert (info.item_count, info.dimension, info.input_dimension, info.metric) == (N, 16, DIM, "angular")
    assert (info.trees, info.pca_dimension, info.model_fingerprint) == (8, 16, FINGERPRINT)
    assert info.model.fingerprint == FINGERPRINT and info.model.dimension == DIM
    assert info.bundle_path.startswith(str(server[0].settings.bundle)) and info.default_search_k > 0


def vector_request(vector=None, **fields):
    if vector is None:
        vector = wire.to_proto(np.ones(DIM, np.float32))
    return indexer_pb2.QueryVectorRequest(vector=vector, **{"k": 5, **fields})


BAD_REQUESTS = [
    ("k=0", "QueryVector", lambda: vector_request(k=0), grpc.StatusCode.INVALID_ARGUMENT, "between 1 and 100"),
    ("k=10**6", "QueryVector", lambda: vector_request(k=10**6), grpc.StatusCode.INVALID_ARGUMENT, "between 1 and 100"),
    ("negative search_k", "QueryVector", lambda: vector_request(search_k=-5), grpc.StatusCode.INVALID_ARGUMENT,
     "search_k must be >= 0"),
    ("wrong dimension", "QueryVector", lambda: vector_request(wire.to_proto(np.ones(DIM + 3, np.float32))),
     grpc.StatusCode.INVALID_ARGUMENT, f"dimension {DIM + 3}, this index expects {DIM}"),
    ("NaN values", "QueryVector", lambda: vector_request(wire.to_proto(np.full(DIM, np.nan, np.float32))),
     grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    ("empty vector", "QueryVector", lambda: indexer_pb2.QueryVectorRequest(k=5), grpc.StatusCode.INVALID_ARGUMENT,
     "empty"),
    ("data shorter than dimension", "QueryVector",
     lambda: vector_request(common_pb2.Vector(dimension=DIM, data=b"\0" * 8)), grpc.StatusCode.INVALID_ARGUMENT,
     "holds 8 bytes"),
    ("other model", "QueryVector", lambda: vector_request(model_fingerprint="fp-other"),
     grpc.StatusCode.FAILED_PRECONDITION, "'fp-other'"),
    ("unknown item", "QueryItem", lambda: indexer_pb2.QueryItemRequest(item_id="ghost", k=5),
     grpc.StatusCode.NOT_FOUND, "'ghost'"),
    ("item k=0", "QueryItem", lambda: indexer_pb2.QueryItemRequest(item_id="photo-1", k=0),
     grpc.StatusCode.INVALID_ARGUMENT, "between 1 and 100"),
    ("unknown ids", "GetItems", lambda: indexer_pb2.GetItemsRequest(item_ids=["photo-1", "nope", "nada"]),
     grpc.StatusCode.NOT_FOUND, "'nope', 'nada'"),
    ("empty GetItems", "GetItems", lambda: indexer_pb2.GetItemsRequest(), grpc.StatusCode.INVALID_ARGUMENT,
     "no item ids"),
]


@pytest.mark.parametrize("method,make,code,message", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_the_right_code_and_message_and_the_server_keeps_serving(
    server, stub, vectors, method, make, code, message
):
    """Each malformed request is answered with its status code and a message saying what is wrong;
    the next good request is answered as usual."""
    with pytest.raises(grpc.RpcError) as excinfo:
        getattr(stub, method)(make(), timeout=10)
    assert excinfo.value.code() == code
    assert message in excinfo.value.details()
    assert_still_serving(server, stub, vectors)


def test_fingerprint_message_says_how_to_fix_it(stub):
    """The FAILED_PRECONDITION for another model names both fingerprints and what to do."""
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.QueryVector(vector_request(model_fingerprint="fp-other"), timeout=10)
    details = excinfo.value.details()
    assert "'fp-other'" in details and repr(FINGERPRINT) in details and "cbir index build" in details


def sample(name: str, labels: dict) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics(server, stub, vectors):
    """Queries are timed per stage (ann_query, id_lookup, pca); items and bundle info are exported on /metrics."""
    stages = ("ann_query", "id_lookup", "pca")
    before = {s: sample("cbir_stage_seconds_count", {"service": "indexer", "stage": s}) for s in stages}
    stub.QueryVector(vector_request(wire.to_proto(vectors[2])), timeout=10)
    for s in stages:
        assert sample("cbir_stage_seconds_count", {"service": "indexer", "stage": s}) == before[s] + 1
    body = urllib.request.urlopen(f"http://127.0.0.1:{server[0].service.metrics_port}/metrics", timeout=10).read().decode()
    assert f"cbir_indexer_items {float(N)}" in body
    info_line = next(line for line in body.splitlines() if line.startswith("cbir_indexer_bundle_info{"))
    for fragment in (f'model_fingerprint="{FINGERPRINT}"', 'metric="angular"', 'dimension="16"', "version=\""):
        assert fragment in info_line


def test_concurrent_rpcs(stub, vectors):
    """Many QueryVector calls in flight at once through the server's thread pool all get their own answer."""
    futures = [
        (i, stub.QueryVector.future(vector_request(wire.to_proto(vectors[i]), k=3), timeout=30))
        for i in range(0, N, 16)  # 32 at once: below the server's max_concurrent_rpcs (64)
    ]
    assert all(f.result().hits[0].item_id == f"photo-{i}" for i, f in futures)
