"""SearchBatch: many queries in one call, their images embedded in one Embed call, one result per query.

The slow tests run the real services on 127.0.0.1:0 — the embedder (VGG-16 with seeded random
weights, conftest's `random_embedder`) behind a servicer that records each Embed request, the
indexer over conftest's bundle of demo photos, the gateway — and compare each batch result with
the single search of the same query. The quick ones use test_gateway.py's deterministic fake
upstreams to check what the gateway sends and how one failing upstream shows.
"""

from __future__ import annotations

import functools
import http.server
import json
import threading
import types

import grpc
import pytest
import test_gateway
from click.testing import CliRunner
from test_gateway import COLORS, FakeIndexer, png, rpc_error

from apps.cli import main as cli
from cbir.client import GatewayClient
from cbir.grpc_server import GrpcService
from cbir.health import wait_until_serving
from cbir.v1 import embedder_pb2_grpc, gateway_pb2
from services.embedder.servicer import EmbedderServicer
from services.gateway.server import GatewayServer
from services.gateway.settings import GatewaySettings
from services.gateway.upstreams import _parts
from services.indexer.server import IndexerServer
from services.indexer.settings import IndexerSettings

StatusCode = grpc.StatusCode
PHOTOS = ["skimage-astronaut.jpg", "skimage-coffee.jpg", "nested/opencv-baboon.jpg", "plasma-kite.jpg"]
BATCH = PHOTOS[:3]  # photos searched as one batch and one by one
MAX_BATCH = 4
MAX_K = 10
make_stack = test_gateway.make_stack  # the fixture of test_gateway.py's fake upstreams and real gateway


# --- the real services ----------------------------------------------------------------------------


class RecordingEmbedder(EmbedderServicer):
    """The real embedder servicer; notes how many images each Embed request carried."""

    def __init__(self):
        super().__init__()
        self.embed_requests: list[int] = []

    def Embed(self, request, context):
        self.embed_requests.append(len(request.images))
        return super().Embed(request, context)


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def real(random_embedder, bundle, collection):
    """Recording embedder + real indexer + gateway (at most 4 queries a batch, k <= 10, URLs of 127.0.0.1
    allowed) + a client + an HTTP server of the collection's files."""
    embedder = RecordingEmbedder()
    embedder.attach(random_embedder)
    embedder_service = GrpcService("recording-embedder", port=0, max_workers=8, grace_seconds=0)
    embedder_service.add(embedder_pb2_grpc.add_EmbedderServicer_to_server, embedder, "cbir.v1.Embedder")
    embedder_service.start()
    embedder_service.set_serving(True)
    indexer = IndexerServer(IndexerSettings(port=0, metrics_port=None, bundle=bundle.root))
    indexer.start_serving()
    wait_until_serving(f"127.0.0.1:{indexer.port}")
    gateway = GatewayServer(GatewaySettings(
        port=0, metrics_port=None, embedder_target=f"127.0.0.1:{embedder_service.port}",
        indexer_target=f"127.0.0.1:{indexer.port}", max_batch_queries=MAX_BATCH, default_k=5, max_k=MAX_K,
        url_allow_networks=["127.0.0.1/32"], url_retries=0,
        # generous bounds: on a busy 2-core machine VGG-16 and the verification take their time
        embed_timeout_s=120, index_timeout_s=60, request_timeout_s=300, batch_timeout_s=300,
    ))
    gateway.start_serving()
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietFiles, directory=collection))
    files.daemon_threads = True
    threading.Thread(target=files.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    client = GatewayClient(f"127.0.0.1:{gateway.port}", timeout_s=300)
    yield types.SimpleNamespace(
        embedder=embedder, client=client, target=f"127.0.0.1:{gateway.port}",
        url=lambda path: f"http://127.0.0.1:{files.server_port}/{path}",
        photo=lambda name: (collection / name).read_bytes(),
    )
    client.close()
    files.shutdown()
    files.server_close()
    gateway.stop(0)
    indexer.stop(0)
    embedder_service.stop(0)
    embedder.close()


def same_hits(batch_hits, single_hits) -> None:
    """The same items in the same order, with the same scores, inliers and match classes."""
    assert [h.item_id for h in batch_hits] == [h.item_id for h in single_hits]
    assert [h.inliers for h in batch_hits] == [h.inliers for h in single_hits]
    assert [h.match for h in batch_hits] == [h.match for h in single_hits]
    assert [h.score for h in batch_hits] == pytest.approx([h.score for h in single_hits], abs=1e-4)


@pytest.mark.slow
def test_a_batch_of_photos_answers_each_as_its_own_search_in_one_embed_call(real):
    """Three photos in one SearchBatch: one Embed request carrying all three, and for each photo the hits that
    SearchByImage of that photo alone returns (the photo itself first)."""
    images = [real.photo(name) for name in BATCH]
    real.embedder.embed_requests.clear()
    batch = real.client.search_batch(images=images, k=5)
    assert real.embedder.embed_requests == [len(BATCH)]

    assert len(batch.results) == len(BATCH)
    for name, image, result in zip(BATCH, images, batch.results):
        assert not result.error and not result.code
        single = real.client.search_image(image, k=5)
        assert result.hits[0].item_id == name
        same_hits(result.hits, single.hits)
    assert batch.bundle_version == single.bundle_version
    assert batch.timings.embed_ms > 0 and batch.timings.index_ms > 0
    assert batch.timings.total_ms >= batch.timings.embed_ms + batch.timings.index_ms


@pytest.mark.slow
def test_a_bad_image_and_an_unknown_id_fail_only_their_own_results(real):
    """Good photo, corrupt bytes, unknown id: two errors in words with their status names, and the good
    photo's hits as if searched alone; the corrupt bytes went in the same Embed request as the photo."""
    good = real.photo(PHOTOS[1])
    real.embedder.embed_requests.clear()
    batch = real.client.search_batch(
        [good, b"\xff\xd8\xff\xe0 these bytes are no JPEG", gateway_pb2.BatchQuery(item_id="no-such-photo.jpg")], k=3
    )
    assert real.embedder.embed_requests == [2]
    ok, corrupt, unknown = batch.results
    assert not ok.error
    same_hits(ok.hits, real.client.search_image(good, k=3).hits)
    assert corrupt.code == "INVALID_ARGUMENT" and not corrupt.hits
    assert "image" in corrupt.error and "Traceback" not in corrupt.error
    assert unknown.code == "NOT_FOUND" and not unknown.hits
    assert "no-such-photo.jpg" in unknown.error


@pytest.mark.slow
def test_downloaded_urls_are_embedded_with_the_images_and_a_failed_download_fails_alone(real):
    """A URL of a photo is found like its bytes, in the same Embed request as the images; a URL that answers
    404 fails its own result with the reason."""
    real.embedder.embed_requests.clear()
    batch = real.client.search_batch(
        images=[real.photo(PHOTOS[0])], urls=[real.url(PHOTOS[3]), real.url("missing.jpg")], k=4
    )
    assert real.embedder.embed_requests == [2]
    by_bytes, by_url, missing = batch.results
    assert by_bytes.hits[0].item_id == PHOTOS[0]
    same_hits(by_url.hits, real.client.search_image(real.photo(PHOTOS[3]), k=4).hits)
    assert missing.code == "INVALID_ARGUMENT" and "404" in missing.error and not missing.hits
    assert batch.timings.fetch_ms > 0


@pytest.mark.slow
def test_item_ids_are_answered_like_search_by_id_without_the_embedder(real):
    """A batch of ids only: each result is SearchById's (exclude_self and min_score applied), no Embed call."""
    ids = [PHOTOS[0], PHOTOS[2]]
    real.embedder.embed_requests.clear()
    batch = real.client.search_batch(item_ids=ids, k=4, exclude_self=True, min_score=0.1)
    assert real.embedder.embed_requests == []
    for item_id, result in zip(ids, batch.results):
        single = real.client.search_id(item_id, k=4, exclude_self=True, min_score=0.1)
        assert item_id not in [h.item_id for h in result.hits]
        same_hits(result.hits, single.hits)
        assert all(h.score >= 0.1 for h in result.hits)
    assert batch.timings.embed_ms == 0


@pytest.mark.slow
@pytest.mark.parametrize("queries, words", [
    ([], "empty"),
    ([gateway_pb2.BatchQuery(item_id=PHOTOS[0])] * (MAX_BATCH + 1), f"at most {MAX_BATCH}"),
])
def test_an_empty_batch_and_one_over_the_limit_are_invalid_argument(real, queries, words):
    """The whole call is refused, in words, before any upstream is asked."""
    real.embedder.embed_requests.clear()
    error = rpc_error(real.client.search_batch, queries)
    assert error.code() is StatusCode.INVALID_ARGUMENT
    assert words in error.details()
    assert real.embedder.embed_requests == []


@pytest.mark.slow
def test_k_above_max_k_is_invalid_argument_for_the_whole_batch(real):
    real.embedder.embed_requests.clear()
    error = rpc_error(real.client.search_batch, images=[real.photo(PHOTOS[0])], k=MAX_K + 1)
    assert error.code() is StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_K}" in error.details()
    assert real.embedder.embed_requests == []


@pytest.mark.slow
def test_cli_search_with_two_files_prints_one_table_per_file(real, collection):
    """`cbir search A B` sends one batch and prints a table under each file's name; --json prints a list; a file
    that is no image shows its error under its name and makes the exit status 1."""
    a, b = (str(collection / name) for name in PHOTOS[:2])
    real.embedder.embed_requests.clear()
    result = CliRunner().invoke(cli, ["search", a, b, "--k", "2", "--gateway", real.target])
    assert result.exit_code == 0, result.output
    assert real.embedder.embed_requests == [2]
    lines = result.output.splitlines()
    for path, name in [(a, PHOTOS[0]), (b, PHOTOS[1])]:
        at = lines.index(f"== {path}")
        assert lines[at + 1].split() == ["rank", "score", "inliers", "match", "item", "/", "url"]
        assert lines[at + 2].split()[0] == "1" and name in lines[at + 2]
        assert lines[at + 3].split()[0] == "2" and lines[at + 4] == ""
    assert lines[-1].startswith("bundle ") and "2 queries" in lines[-1]

    one = CliRunner().invoke(cli, ["search", a, "--k", "2", "--gateway", real.target])  # one file: as before
    assert one.exit_code == 0, one.output
    assert real.embedder.embed_requests == [2, 1]
    lines = one.output.splitlines()
    assert len(lines) == 4 and lines[0].split()[0] == "rank" and PHOTOS[0] in lines[1]
    assert lines[3].startswith("bundle ") and ": embed " in lines[3] and "queries" not in lines[3]

    broken = collection / "notes.png"  # text, not a PNG
    as_json = CliRunner().invoke(cli, ["search", a, str(broken), "--k", "2", "--gateway", real.target, "--json"])
    assert as_json.exit_code == 1
    answers = json.loads(as_json.stdout)
    assert [answer["query"] for answer in answers] == [a, str(broken)]
    assert answers[0]["hits"][0]["item_id"] == PHOTOS[0] and answers[0]["error"] == ""
    assert answers[1]["hits"] == [] and answers[1]["code"] == "INVALID_ARGUMENT" and answers[1]["error"]
    assert "1 of 2 queries failed" in as_json.stderr


# --- what the gateway sends, against fake upstreams -----------------------------------------------


class ConcurrencyIndexer(FakeIndexer):
    """The fake indexer, each QueryVector taking 50 ms; records the most queries it answered at once."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        self.in_flight = self.peak = 0

    def QueryVector(self, request, context):
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            threading.Event().wait(0.05)
            return super().QueryVector(request, context)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_index_queries_run_concurrently_but_at_most_batch_index_concurrency_at_once(make_stack):
    """Eight images: one Embed request; their QueryVector calls overlap, never more than 3 at once; each result
    is its own colour's."""
    indexer = ConcurrencyIndexer()
    stack = make_stack(indexer=indexer, batch_index_concurrency=3, max_batch_queries=8, max_workers=16)
    names = ["red", "green", "blue", "navy", "white", "orange", "dark-red", "green"]
    batch = stack.client.search_batch(images=[png(COLORS[name]) for name in names], k=1)
    assert stack.embedder.behaviour.calls["Embed"] == 1
    assert [result.hits[0].item_id for result in batch.results] == names
    assert 1 < indexer.peak <= 3


@pytest.mark.parametrize("verify", [True, False])
def test_the_embed_request_asks_for_local_features_as_single_searches_do(make_stack, verify):
    stack = make_stack(verify=verify)
    stack.client.search_batch(images=[png(COLORS["red"]), png(COLORS["blue"])])
    sent = stack.embedder.behaviour.last("Embed")
    assert (len(sent.images), sent.local_features, sent.mirrored, sent.regions) == (2, verify, verify, verify)
    assert stack.indexer.behaviour.last("QueryVector").k == stack.settings.default_k


def test_an_embedder_that_is_down_fails_the_image_queries_and_the_ids_are_still_answered(make_stack):
    """Per query, as a single search would end: UNAVAILABLE naming the embedder; the id query needs no embedder."""
    stack = make_stack()
    stack.embedder_service.stop(0)
    image, item = stack.client.search_batch([png(COLORS["red"]), gateway_pb2.BatchQuery(item_id="red")],
                                            k=2).results
    assert image.code == "UNAVAILABLE" and image.error.startswith("embedder at")
    assert [h.item_id for h in item.hits] == ["red", "orange"] and not item.error


def test_an_empty_query_fails_only_its_own_result(make_stack):
    stack = make_stack()
    results = stack.client.search_batch([gateway_pb2.BatchQuery(), gateway_pb2.BatchQuery(item_id=""),
                                         gateway_pb2.BatchQuery(item_id="blue")], k=1).results
    assert [r.code for r in results] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", ""]
    assert "image, url or item_id" in results[0].error and "item_id is empty" in results[1].error
    assert results[2].hits[0].item_id == "blue"
    assert stack.embedder.behaviour.calls["Embed"] == 0


def test_a_batch_has_its_own_deadline_budget_and_a_spent_one_fails_its_queries_in_words(make_stack):
    """An Embed call of 0.6 s: too slow for a single search (0.3 s), within a batch's budget (5 s); a batch whose
    budget (0.3 s) runs out gets DEADLINE_EXCEEDED per query, saying which bound it hit."""
    stack = make_stack(request_timeout_s=0.3, embed_timeout_s=0.3, batch_timeout_s=5)
    stack.embedder.behaviour.hold_s = 0.6
    assert rpc_error(stack.client.search_image, png(COLORS["red"])).code() is StatusCode.DEADLINE_EXCEEDED
    result = stack.client.search_batch(images=[png(COLORS["red"])], k=1).results[0]
    assert result.hits[0].item_id == "red" and not result.error

    short = make_stack(batch_timeout_s=0.3)
    short.embedder.behaviour.hold_s = 0.6
    result = short.client.search_batch(images=[png(COLORS["red"])], k=1).results[0]
    assert result.code == "DEADLINE_EXCEEDED" and "budget (batch_timeout_s)" in result.error and not result.hits


def test_images_are_split_over_embed_requests_only_when_one_message_cannot_hold_them():
    assert _parts([b"a" * 3, b"b" * 3, b"c" * 3], 6) == [[b"aaa", b"bbb"], [b"ccc"]]
    assert _parts([b"a" * 9, b"b"], 6) == [[b"a" * 9], [b"b"]]
    assert _parts([b"a", b"b"], 6) == [[b"a", b"b"]]
    assert _parts([], 6) == []


def test_the_client_refuses_a_single_string_where_a_list_belongs():
    with GatewayClient("127.0.0.1:1") as client, pytest.raises(TypeError, match="takes a list"):
        client.search_batch(item_ids="red")
