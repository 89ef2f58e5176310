"""FindDuplicates through real servers: the indexer (a real gRPC server on 127.0.0.1:0 over a bundle of demo
photos and copies made from them, built with the seeded random VGG-16 and RootSIFT) and the gateway in front of
it, reached with `cbir.client.GatewayClient`. The groups must be the ones `cbir duplicates` finds (one core),
requests a person got wrong are INVALID_ARGUMENT in words, and a caller that goes away stops the search."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from test_duplicates import COPIES, ORIGINALS, SAME_IMAGE, root  # noqa: F401 - `root`: the bundle fixture

from apps import duplicates as dup
from cbir import pdq
from cbir.client import GatewayClient
from cbir.health import wait_until_serving
from cbir.v1 import duplicates_pb2, indexer_pb2_grpc
from services.gateway.server import GatewayServer
from services.gateway.settings import GatewaySettings
from services.indexer import duplicates as core
from services.indexer import duplicates_rpc
from services.indexer.server import IndexerServer
from services.indexer.settings import IndexerSettings

ITEMS = len(ORIGINALS) + len(COPIES)
CROP = frozenset(("copy-crop.jpg", "opencv-home.jpg"))


@pytest.fixture(scope="module")
def servers(root):  # noqa: F811 - the imported fixture
    """(indexer target, gateway target): the indexer serves the copies bundle; the gateway's embedder is not
    there at all (FindDuplicates needs only the indexer)."""
    indexer = IndexerServer(IndexerSettings(port=0, metrics_port=None, bundle=root))
    indexer.start_serving()
    wait_until_serving(f"127.0.0.1:{indexer.port}")
    gateway = GatewayServer(GatewaySettings(port=0, metrics_port=None, embedder_target="127.0.0.1:1",
                                            indexer_target=f"127.0.0.1:{indexer.port}"))
    gateway.start_serving()
    yield f"127.0.0.1:{indexer.port}", f"127.0.0.1:{gateway.port}"
    gateway.stop(0)
    indexer.stop(0)


@pytest.fixture
def client(servers):
    with GatewayClient(servers[1], timeout_s=120) as client:
        yield client


def item_sets(groups) -> set[frozenset[str]]:
    return {frozenset(item.item_id for item in group.items) for group in groups}


@pytest.mark.slow
def test_the_stream_has_the_groups_cbir_duplicates_finds_with_urls_and_evidence(root, client):  # noqa: F811
    """Through the gateway: progress from 0 to every item, then the copy groups, largest first and numbered,
    then the summary. They are exactly the groups of `cbir duplicates` on the same bundle (the one core, with the
    PDQ hashes the build stored), among them the 60 % crop verified by its inliers and the mirrored, rotated and
    re-encoded copies the same image by PDQ; every item carries its URL."""
    events = list(client.find_duplicates_events())
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "progress" and kinds[-1] == "summary"
    assert kinds == sorted(kinds, key=["progress", "group", "summary"].index)  # progress, then groups, then summary
    progress = [event.progress for event in events if event.HasField("progress")]
    assert (progress[0].items_searched, progress[0].items_total) == (0, ITEMS)
    assert (progress[-1].items_searched, progress[-1].items_total) == (ITEMS, ITEMS)
    groups = [event.group for event in events if event.HasField("group")]
    assert [g.number for g in groups] == list(range(1, len(groups) + 1))
    assert [len(g.items) for g in groups] == sorted((len(g.items) for g in groups), reverse=True)

    expected = dup.find_duplicates(root, dup.Rule("copy"), k=core.DEFAULT_K, progress=False)
    assert expected.pdq == "stored"
    assert item_sets(groups) == {frozenset(g.items) for g in expected.groups}
    assert {(p.item_a, p.item_b, p.match, p.inliers, p.decided_by) for g in groups for p in g.pairs} == \
        {(p.a, p.b, p.match, p.inliers, p.decided_by) for g in expected.groups for p in g.pairs}
    assert CROP in item_sets(groups)
    assert all(group & set(COPIES) for group in item_sets(groups))  # no two unrelated photos grouped
    crop = next(p for g in groups for p in g.pairs if frozenset((p.item_a, p.item_b)) == CROP)
    assert crop.decided_by == "inliers" and crop.inliers >= 12  # (random weights: every score ~1, "same_image")
    assert {frozenset((p.item_a, p.item_b)) for g in groups for p in g.pairs if p.decided_by == "pdq"} == \
        {frozenset((copy, COPIES[copy])) for copy in SAME_IMAGE}
    # each pair carries its PDQ distance, as `cbir duplicates` measured it
    assert {(p.item_a, p.item_b, p.pdq_distance if p.HasField("pdq_distance") else None) for g in groups
            for p in g.pairs} == {(p.a, p.b, p.pdq_distance) for g in expected.groups for p in g.pairs}
    assert all(p.pdq_distance <= pdq.MATCH_BITS for g in groups for p in g.pairs if p.decided_by == "pdq")
    for group in groups:
        assert all(item.url.startswith("file://") and item.url.endswith(item.item_id) for item in group.items)
    summary = events[-1].summary
    assert (summary.groups, summary.groups_sent, summary.items_searched) == (len(groups), len(groups), ITEMS)
    assert summary.pairs == sum(len(g.pairs) for g in groups) and summary.bundle_version


@pytest.mark.slow
def test_threshold_rule_and_limit_at_the_indexer(servers):
    """At the indexer itself: a threshold of 0 accepts every pair unverified, so all the items form one group of
    pairs decided by their score (or, for the same image, by its stored PDQ hashes); `limit` caps the groups sent, and the summary says how many there were."""
    with grpc.insecure_channel(servers[0]) as channel:
        stub = indexer_pb2_grpc.IndexerStub(channel)
        events = list(stub.FindDuplicates(duplicates_pb2.FindDuplicatesRequest(threshold=0.0, k=3), timeout=120))
        (group,) = [event.group for event in events if event.HasField("group")]
        assert len(group.items) == ITEMS
        assert {(p.decided_by, p.inliers) for p in group.pairs} == {("score", 0), ("pdq", 0)}

        events = list(stub.FindDuplicates(duplicates_pb2.FindDuplicatesRequest(limit=1), timeout=120))
        assert sum(event.HasField("group") for event in events) == 1
        assert events[-1].summary.groups_sent == 1 and events[-1].summary.groups >= 2


@pytest.mark.slow
@pytest.mark.parametrize("request_args, message", [
    ({"match_class": "duplicates"}, ("unknown class 'duplicates': ask for 'copy' (copies and the same image) or "
                                     "'near-duplicate' (the same image only)")),
    ({"threshold": 1.5}, "the threshold is a similarity between 0 and 1, got 1.5"),
    ({"threshold": float("nan")}, "the threshold is a similarity between 0 and 1, got nan"),
    ({"k": 5000}, "k (the nearest items judged per item) must be between 1 and 1000, got 5000"),
    ({"verify_top": 5000}, "verify_top (the nearest items verified per item) must be between 1 and 1000, got 5000"),
])
def test_a_wrong_request_is_invalid_argument_in_words(client, request_args, message):
    """Through the gateway: the indexer's INVALID_ARGUMENT and its sentence come through unchanged, before any
    search (no message of the stream arrives)."""
    arrived = []
    with pytest.raises(grpc.RpcError) as caught:
        arrived += client.find_duplicates(**request_args, on_progress=arrived.append)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == message
    assert arrived == []


@pytest.mark.slow
@pytest.mark.parametrize("through", ["indexer", "gateway"])
def test_a_caller_that_goes_away_stops_the_search(servers, monkeypatch, through):
    """Each item's search is slowed to 0.3 s (≈2 s for the whole bundle on the indexer's 2 threads) and no
    progress is sent after the first message (gRPC would stop a stream at its next message anyway). The caller
    cancels after the first message: the indexer starts at most the searches already queued, then none, and
    answers the next request in full."""
    started, lock = [], threading.Lock()
    search = core.DuplicateScan._search

    def slow_search(self, record):
        with lock:
            started.append(record.item_id)
        time.sleep(0.3)
        return search(self, record)

    monkeypatch.setattr(core.DuplicateScan, "_search", slow_search)
    monkeypatch.setattr(duplicates_rpc, "PROGRESS_EVERY_S", 3600.0)
    target = servers[0] if through == "indexer" else servers[1]
    with grpc.insecure_channel(target) as channel:
        method = "/cbir.v1.Indexer/FindDuplicates" if through == "indexer" else "/cbir.v1.Gateway/FindDuplicates"
        call = channel.unary_stream(method, request_serializer=duplicates_pb2.FindDuplicatesRequest.SerializeToString,
                                    response_deserializer=duplicates_pb2.FindDuplicatesResponse.FromString)(
            duplicates_pb2.FindDuplicatesRequest(), timeout=60)
        first = next(call)
        assert first.progress.items_searched == 0
        call.cancel()
    time.sleep(1.5)
    with lock:
        after_cancel = len(started)
    time.sleep(1.0)
    assert len(started) == after_cancel < ITEMS  # stopped, and it stays stopped

    monkeypatch.setattr(core.DuplicateScan, "_search", search)
    with GatewayClient(servers[1], timeout_s=120) as client:
        assert len(list(client.find_duplicates())) >= 1


def test_rule_of_a_request_defaults_to_copies():
    """No rule in the request is the class "copy"; a threshold of 0 is a rule of its own (a oneof, not a zero)."""
    rule_of = duplicates_rpc.rule_of
    assert rule_of(duplicates_pb2.FindDuplicatesRequest()) == core.Rule("copy")
    assert rule_of(duplicates_pb2.FindDuplicatesRequest(match_class="near-duplicate")) == core.Rule("near-duplicate")
    assert rule_of(duplicates_pb2.FindDuplicatesRequest(threshold=0.0)) == core.Rule(None, 0.0)


def test_without_an_indexer_the_gateway_says_so():
    """The gateway's indexer is not running: UNAVAILABLE, naming the indexer and where it was looked for."""
    gateway = GatewayServer(GatewaySettings(port=0, metrics_port=None, embedder_target="127.0.0.1:1",
                                            indexer_target="127.0.0.1:1"))
    gateway.start_serving()
    try:
        with GatewayClient(f"127.0.0.1:{gateway.port}", timeout_s=20) as client, \
                pytest.raises(grpc.RpcError) as caught:
            list(client.find_duplicates())
    finally:
        gateway.stop(0)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert caught.value.details().startswith("indexer at 127.0.0.1:1 is unavailable")
