"""The gateway against real gRPC upstreams on 127.0.0.1:0 that are simple and deterministic.

The fake embedder decodes each image with Pillow and returns its normalised RGB histogram (768-d)
or, for bytes Pillow cannot read, an `EmbedResult.error`; the fake indexer does exact L2 search
over a handful of such vectors and refuses a vector whose model fingerprint is not its own. Both
run inside the real `GrpcService` (health, interceptors) and can be told to fail: abort with a
status, or hold a call for longer than the gateway's deadline (released as soon as the caller's
call ends, so the tests stay fast). The gateway itself is the real one, reached over a real
channel through `cbir.client.GatewayClient`.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client import REGISTRY

from cbir import filters
from cbir.client import GatewayClient
from cbir.grpc_server import GrpcService
from cbir.v1 import (
    common_pb2,
    embedder_pb2,
    embedder_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    indexer_pb2,
    indexer_pb2_grpc,
)
from services.gateway.server import GatewayServer
from services.gateway.settings import GatewaySettings

REPO = Path(__file__).resolve().parents[1]
FINGERPRINT = "fp-histogram-v1"
DIMENSION = 768
COLORS = {
    "red": (255, 0, 0),
    "dark-red": (200, 10, 10),
    "orange": (255, 128, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "navy": (0, 0, 128),
    "white": (255, 255, 255),
}
StatusCode = grpc.StatusCode


def png(rgb: tuple[int, int, int], size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def histogram(image: bytes) -> np.ndarray:
    """The fake model: Pillow decodes, the RGB histogram normalised by the pixel count is the vector."""
    with Image.open(io.BytesIO(image)) as decoded:
        rgb = decoded.convert("RGB")
        return np.asarray(rgb.histogram(), dtype=np.float32) / (rgb.width * rgb.height)


def to_vector(array: np.ndarray) -> common_pb2.Vector:
    return common_pb2.Vector(dimension=array.size, data=array.astype("<f4").tobytes())


# --- fake upstreams -------------------------------------------------------------------------------


class Behaviour:
    """What a fake upstream records about each call, and how it is told to misbehave."""

    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.requests: list[tuple[str, object]] = []
        self.remaining: list[float] = []  # the deadline each call arrived with, in seconds left
        self.cut_short: list[bool] = []  # a held call whose caller gave up before the hold ended
        self.fail: tuple[StatusCode, str] | None = None
        self.fail_methods: set[str] | None = None  # None = every method
        self.hold_s = 0.0
        self.released = threading.Event()  # set at teardown: no held call outlives its test
        self.hold_started = threading.Event()
        self.hold_ended = threading.Event()

    def enter(self, method: str, request, context) -> None:
        self.calls[method] += 1
        self.requests.append((method, request))
        self.remaining.append(context.time_remaining())
        applies = self.fail_methods is None or method in self.fail_methods
        if self.hold_s and applies:
            ended = threading.Event()
            context.add_callback(ended.set)  # the RPC ended: its deadline passed or it was cancelled
            self.hold_started.set()
            ended.wait(self.hold_s)
            self.cut_short.append(ended.is_set() and not self.released.is_set())
            self.hold_ended.set()
            if ended.is_set():
                context.abort(StatusCode.CANCELLED, "caller went away")
        if self.fail and applies:
            context.abort(*self.fail)

    def last(self, method: str):
        return [request for name, request in self.requests if name == method][-1]


class FakeEmbedder(embedder_pb2_grpc.EmbedderServicer):
    def __init__(self, fingerprint: str = FINGERPRINT):
        self.fingerprint = fingerprint
        self.behaviour = Behaviour()
        self.results_per_image = 1

    def Embed(self, request, context):
        self.behaviour.enter("Embed", request, context)
        results = []
        for image in request.images:
            try:
                results.append(embedder_pb2.EmbedResult(vector=to_vector(histogram(image))))
            except Exception as error:  # noqa: BLE001 - the reason goes back to the caller
                results.append(embedder_pb2.EmbedResult(error=f"not an image Pillow can read: {error}"))
        return embedder_pb2.EmbedResponse(
            results=results * self.results_per_image, model_fingerprint=self.fingerprint
        )

    def GetModelInfo(self, request, context):
        self.behaviour.enter("GetModelInfo", request, context)
        return embedder_pb2.GetModelInfoResponse(model=common_pb2.ModelInfo(
            name="histogram", feature="rgb", dimension=DIMENSION, weights_source="none",
            fingerprint=self.fingerprint,
        ))


class FakeIndexer(indexer_pb2_grpc.IndexerServicer):
    """Exact L2 search over one vector per colour; ties broken by id."""

    def __init__(self, fingerprint: str = FINGERPRINT):
        self.fingerprint = fingerprint
        self.behaviour = Behaviour()
        self.bundle_version = "v-test-1"
        self.items = {name: histogram(png(rgb)) for name, rgb in COLORS.items()}

    def search(self, query: np.ndarray, k: int, skip: str | None = None) -> list[common_pb2.Hit]:
        found = sorted(
            (float(np.linalg.norm(vector - query)), item_id)
            for item_id, vector in self.items.items() if item_id != skip
        )
        return [
            common_pb2.Hit(item_id=item_id, url=f"file:///photos/{item_id}.png", distance=d, score=1 / (1 + d))
            for d, item_id in found[:k]
        ]

    def QueryVector(self, request, context):
        self.behaviour.enter("QueryVector", request, context)
        if request.vector.dimension != DIMENSION:
            context.abort(StatusCode.INVALID_ARGUMENT, f"vector has dimension {request.vector.dimension}")
        if request.model_fingerprint and request.model_fingerprint != self.fingerprint:
            context.abort(
                StatusCode.FAILED_PRECONDITION,
                f"vector from model {request.model_fingerprint}, bundle built with {self.fingerprint}",
            )
        query = np.frombuffer(request.vector.data, dtype="<f4")
        return indexer_pb2.QueryVectorResponse(hits=self.search(query, request.k), bundle_version=self.bundle_version)

    def QueryItem(self, request, context):
        self.behaviour.enter("QueryItem", request, context)
        if request.item_id not in self.items:
            context.abort(StatusCode.NOT_FOUND, f"no item {request.item_id!r} in bundle {self.bundle_version}")
        skip = request.item_id if request.exclude_self else None
        hits = self.search(self.items[request.item_id], request.k, skip=skip)
        return indexer_pb2.QueryItemResponse(hits=hits, bundle_version=self.bundle_version)

    def GetIndexInfo(self, request, context):
        self.behaviour.enter("GetIndexInfo", request, context)
        return indexer_pb2.GetIndexInfoResponse(index=common_pb2.IndexInfo(
            item_count=len(self.items), dimension=DIMENSION, input_dimension=DIMENSION, metric="euclidean",
            model_fingerprint=self.fingerprint, bundle_version=self.bundle_version,
            model=common_pb2.ModelInfo(name="histogram", feature="rgb", dimension=DIMENSION, fingerprint=self.fingerprint),
        ))


def serve_fake(servicer) -> GrpcService:
    if isinstance(servicer, FakeEmbedder):
        add, name = embedder_pb2_grpc.add_EmbedderServicer_to_server, "cbir.v1.Embedder"
    else:
        add, name = indexer_pb2_grpc.add_IndexerServicer_to_server, "cbir.v1.Indexer"
    service = GrpcService(f"fake-{name}", port=0, max_workers=8, grace_seconds=0)
    service.add(add, servicer, name)
    service.start()
    service.set_serving(True)
    return service


def closed_port() -> int:
    """A port nothing listens on (bound once by the OS, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """Fake embedder + fake indexer + the real gateway + a client, torn down by the fixture."""

    def __init__(self, embedders: list[FakeEmbedder], indexer: FakeIndexer, client_timeout_s: float, **settings):
        self.embedders = embedders
        self.embedder = embedders[0]
        self.indexer = indexer
        self.embedder_services = [serve_fake(e) for e in embedders]
        self.indexer_service = serve_fake(indexer)
        self.embedder_service = self.embedder_services[0]
        ports = ",".join(f"127.0.0.1:{s.port}" for s in self.embedder_services)
        defaults = dict(
            port=0, metrics_port=None, default_k=3, max_k=5, max_workers=8,
            embedder_target=ports if len(embedders) == 1 else f"ipv4:{ports}",
            indexer_target=f"127.0.0.1:{self.indexer_service.port}",
        )
        self.settings = GatewaySettings(**{**defaults, **settings})
        self.gateway = GatewayServer(self.settings)
        self.gateway.start_serving()
        self.target = f"127.0.0.1:{self.gateway.port}"
        self.client = GatewayClient(self.target, timeout_s=client_timeout_s)

    def close(self) -> None:
        self.client.close()
        for fake in [*self.embedders, self.indexer]:
            fake.behaviour.released.set()
        self.gateway.stop(0)
        for service in [*self.embedder_services, self.indexer_service]:
            service.stop(0)


@pytest.fixture
def make_stack():
    stacks = []

    def make(*, embedders=None, indexer=None, client_timeout_s=10.0, **settings) -> Stack:
        stack = Stack(embedders or [FakeEmbedder()], indexer or FakeIndexer(), client_timeout_s, **settings)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()


@pytest.fixture
def stack(make_stack) -> Stack:
    return make_stack()


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


# --- searching ------------------------------------------------------------------------------------


def test_search_by_image_returns_the_indexers_hits_in_order_with_timings(stack):
    """The hits are the indexer's, in its order (nearest first), with its bundle version and timings."""
    image = png(COLORS["red"], size=24)
    response = stack.client.search_image(image, k=4)

    expected = stack.indexer.search(histogram(image), 4)
    assert [hit.item_id for hit in response.hits] == [hit.item_id for hit in expected]
    assert [hit.item_id for hit in response.hits][:2] == ["red", "orange"]  # orange differs in green only
    assert response.hits[0].distance == 0
    assert list(response.hits) == expected  # distances, scores, urls unchanged
    assert response.bundle_version == "v-test-1"
    timings = response.timings
    assert timings.embed_ms > 0 and timings.index_ms > 0
    assert timings.total_ms >= timings.embed_ms + timings.index_ms


def test_the_embedders_vector_and_model_fingerprint_reach_the_indexer(stack):
    """QueryVector carries exactly the embedder's vector and the fingerprint from its EmbedResponse."""
    image = png(COLORS["blue"])
    stack.client.search_image(image, k=2, search_k=77)

    query = stack.indexer.behaviour.last("QueryVector")
    assert query.model_fingerprint == FINGERPRINT
    assert query.vector == to_vector(histogram(image))
    assert (query.k, query.search_k) == (2, 77)
    assert list(stack.embedder.behaviour.last("Embed").images) == [image]


def test_an_index_built_with_another_model_refuses_the_query_with_failed_precondition(make_stack):
    """The embedder's fingerprint is what the indexer checks: a different one is refused, and says so."""
    stack = make_stack(embedders=[FakeEmbedder(fingerprint="fp-other-model")])
    error = rpc_error(stack.client.search_image, png(COLORS["red"]))
    assert error.code() is StatusCode.FAILED_PRECONDITION
    assert "fp-other-model" in error.details() and FINGERPRINT in error.details()


@pytest.mark.parametrize("kind", ["image", "id"])
def test_k_zero_asks_the_indexer_for_the_default_k(stack, kind):
    """k=0 becomes default_k (3 here) on the way to the indexer, for both kinds of search."""
    if kind == "image":
        response = stack.client.search_image(png(COLORS["green"]))
        sent = stack.indexer.behaviour.last("QueryVector")
    else:
        response = stack.client.search_id("green")
        sent = stack.indexer.behaviour.last("QueryItem")
    assert sent.k == 3
    assert len(response.hits) == 3


@pytest.mark.parametrize("kind", ["image", "id"])
def test_k_above_max_k_is_invalid_argument_and_reaches_no_upstream(stack, kind):
    """k > max_k (5 here) is refused with INVALID_ARGUMENT naming the limit; k = max_k is fine."""
    if kind == "image":
        error = rpc_error(stack.client.search_image, png(COLORS["green"]), k=6)
    else:
        error = rpc_error(stack.client.search_id, "green", k=6)
    assert error.code() is StatusCode.INVALID_ARGUMENT
    assert "5" in error.details()
    assert not stack.embedder.behaviour.calls and not stack.indexer.behaviour.calls

    ok = stack.client.search_image(png(COLORS["green"]), k=5) if kind == "image" else stack.client.search_id("green", k=5)
    assert len(ok.hits) == 5


@pytest.mark.parametrize("kind", ["image", "id", "batch"])
def test_a_searchs_filter_reaches_the_indexer_as_sent(stack, kind):
    """The metadata filter goes to the indexer unchanged (it knows the fields), for every kind of search."""
    wanted = filters.to_proto(filters.parse_filter(["country=fr", "tag in a,b", "year>=2010", "taken<2020-01-01"]))
    if kind == "image":
        stack.client.search_image(png(COLORS["green"]), filter=wanted)
        sent = [stack.indexer.behaviour.last("QueryVector")]
    elif kind == "id":
        stack.client.search_id("green", filter=["country=fr", "tag in a,b", "year>=2010", "taken<2020-01-01"])
        sent = [stack.indexer.behaviour.last("QueryItem")]
    else:
        stack.client.search_batch(images=[png(COLORS["green"])], item_ids=["green"], filter=wanted)
        sent = [stack.indexer.behaviour.last("QueryVector"), stack.indexer.behaviour.last("QueryItem")]
    assert [query.filter for query in sent] == [wanted] * len(sent)


@pytest.mark.parametrize("kind", ["image", "id", "batch"])
def test_a_malformed_filter_is_invalid_argument_before_any_upstream_call(stack, kind):
    bad = common_pb2.Filter(conditions=[common_pb2.Condition(field="year", number=common_pb2.Range(min="soon"))])
    if kind == "image":
        error = rpc_error(stack.client.search_image, png(COLORS["green"]), filter=bad)
    elif kind == "id":
        error = rpc_error(stack.client.search_id, "green", filter=bad)
    else:
        error = rpc_error(stack.client.search_batch, item_ids=["green"], filter=bad)
    assert error.code() is StatusCode.INVALID_ARGUMENT
    assert error.details() == "filter on 'year': 'soon' is not a number"
    assert not stack.embedder.behaviour.calls and not stack.indexer.behaviour.calls


def test_an_empty_image_is_invalid_argument_without_calling_the_embedder(stack):
    """No bytes, no embedding: INVALID_ARGUMENT from the gateway itself."""
    error = rpc_error(stack.client.search_image, b"")
    assert error.code() is StatusCode.INVALID_ARGUMENT
    assert "empty" in error.details()
    assert stack.embedder.behaviour.calls["Embed"] == 0


def test_a_bad_images_reason_from_the_embedder_reaches_the_client_as_invalid_argument(stack):
    """The per-image EmbedResult.error becomes INVALID_ARGUMENT with the embedder's words; no index query."""
    error = rpc_error(stack.client.search_image, b"this is not an image at all")
    assert error.code() is StatusCode.INVALID_ARGUMENT
    assert "not an image Pillow can read" in error.details()
    assert stack.indexer.behaviour.calls["QueryVector"] == 0


def test_an_image_near_the_message_limit_reaches_the_embedder(stack):
    """15 MiB of bytes pass the gateway's channel to the embedder (it answers: not an image)."""
    error = rpc_error(stack.client.search_image, os.urandom(15 * 1024 * 1024))
    assert error.code() is StatusCode.INVALID_ARGUMENT
    assert "not an image Pillow can read" in error.details()
    assert len(stack.embedder.behaviour.last("Embed").images[0]) == 15 * 1024 * 1024


def test_a_malformed_embed_response_is_internal_naming_the_embedder(stack):
    """Two results for one image is the embedder's bug: INTERNAL that says so, not a silent pick."""
    stack.embedder.results_per_image = 2
    error = rpc_error(stack.client.search_image, png(COLORS["red"]))
    assert error.code() is StatusCode.INTERNAL
    assert "embedder" in error.details() and "2 results" in error.details()


def test_search_by_id_passes_its_fields_through_and_returns_the_hits(stack):
    """item_id, k, search_k and exclude_self reach QueryItem; the hits come back in order with timings."""
    response = stack.client.search_id("red", k=2, search_k=9, exclude_self=True)
    sent = stack.indexer.behaviour.last("QueryItem")
    assert (sent.item_id, sent.k, sent.search_k, sent.exclude_self) == ("red", 2, 9, True)
    expected = stack.indexer.search(stack.indexer.items["red"], 2, skip="red")
    assert list(response.hits) == expected
    assert [hit.item_id for hit in response.hits] == ["orange", "blue"]
    assert response.bundle_version == "v-test-1"
    assert response.timings.index_ms > 0 and response.timings.total_ms >= response.timings.index_ms
    assert response.timings.embed_ms == 0
    assert stack.embedder.behaviour.calls["Embed"] == 0


def test_an_empty_item_id_is_invalid_argument(stack):
    """SearchById without an id is refused before the indexer is asked."""
    error = rpc_error(stack.client.search_id, "")
    assert error.code() is StatusCode.INVALID_ARGUMENT
    assert not stack.indexer.behaviour.calls


# --- upstream failures ----------------------------------------------------------------------------


def test_embedder_stopped_is_unavailable_naming_the_embedder_and_its_target(stack):
    """A stopped embedder: UNAVAILABLE whose message names "embedder" and where it was looked for."""
    stack.embedder_service.stop(0)
    error = rpc_error(stack.client.search_image, png(COLORS["red"]))
    assert error.code() is StatusCode.UNAVAILABLE
    assert error.details().startswith(f"embedder at {stack.settings.embedder_target} is unavailable")
    assert stack.indexer.behaviour.calls["QueryVector"] == 0


def test_embedder_on_a_closed_port_is_unavailable_naming_the_embedder(make_stack):
    """Nothing ever listened at the embedder's target: UNAVAILABLE naming it, not a hang or INTERNAL."""
    port = closed_port()
    stack = make_stack(embedder_target=f"127.0.0.1:{port}")
    error = rpc_error(stack.client.search_image, png(COLORS["red"]))
    assert error.code() is StatusCode.UNAVAILABLE
    assert f"embedder at 127.0.0.1:{port} is unavailable" in error.details()


@pytest.mark.parametrize("kind", ["image", "id"])
def test_indexer_stopped_is_unavailable_naming_the_indexer(stack, kind):
    """A stopped indexer: UNAVAILABLE whose message names "indexer" and its target, for both searches."""
    stack.indexer_service.stop(0)
    search = stack.client.search_image if kind == "image" else stack.client.search_id
    error = rpc_error(search, png(COLORS["red"]) if kind == "image" else "red")
    assert error.code() is StatusCode.UNAVAILABLE
    assert f"indexer at {stack.settings.indexer_target} is unavailable" in error.details()


def test_an_embedder_that_comes_back_is_used_again(stack):
    """Stopped, then restarted on the same port: the gateway reconnects and searches work again.

    Searches are retried until one succeeds (no assertion on how long that takes; gRPC's
    reconnect backoff is capped at 2 s by the gateway's channel options).
    """
    image = png(COLORS["red"])
    port = stack.embedder_service.port
    stack.embedder_service.stop(0)
    assert rpc_error(stack.client.search_image, image).code() is StatusCode.UNAVAILABLE

    revived = FakeEmbedder()
    service = GrpcService("fake-embedder-again", port=port, max_workers=4, grace_seconds=0)
    service.add(embedder_pb2_grpc.add_EmbedderServicer_to_server, revived, "cbir.v1.Embedder")
    service.start()
    service.set_serving(True)
    stack.embedder_services.append(service)
    for _ in range(600):
        try:
            response = stack.client.search_image(image, k=1)
            break
        except grpc.RpcError as error:
            assert error.code() is StatusCode.UNAVAILABLE
            revived.behaviour.released.wait(0.05)
    else:
        pytest.fail("the gateway never used the embedder again")
    assert [hit.item_id for hit in response.hits] == ["red"]
    assert revived.behaviour.calls["Embed"] >= 1


def test_an_upstream_answering_unavailable_is_unavailable_with_its_reason(stack):
    """An embedder still loading its model (UNAVAILABLE) is reported as such, with its own words."""
    stack.embedder.behaviour.fail = (StatusCode.UNAVAILABLE, "model is loading")
    error = rpc_error(stack.client.search_image, png(COLORS["red"]))
    assert error.code() is StatusCode.UNAVAILABLE
    assert "embedder" in error.details() and "model is loading" in error.details()


@pytest.mark.parametrize("upstream", ["embedder", "indexer"])
def test_an_upstream_slower_than_its_timeout_is_deadline_exceeded(make_stack, upstream):
    """A call held past embed/index_timeout_s (0.3 s) ends in DEADLINE_EXCEEDED naming the upstream.

    The upstream sees the gateway's deadline (0.3 s, give or take gRPC's rounding of timeouts on
    the wire; not the client's 10 s), and its held call is ended by it, not by its own 60 s hold.
    """
    stack = make_stack(embed_timeout_s=0.3, index_timeout_s=0.3)
    fake = stack.embedder if upstream == "embedder" else stack.indexer
    fake.behaviour.hold_s = 60
    error = rpc_error(stack.client.search_image, png(COLORS["red"]))
    assert error.code() is StatusCode.DEADLINE_EXCEEDED
    assert error.details().startswith(f"{upstream} at ")
    assert "0.3 s" in error.details()
    assert max(fake.behaviour.remaining) < 1
    assert fake.behaviour.hold_ended.wait(30)
    assert fake.behaviour.cut_short == [True]


def test_the_callers_own_short_deadline_bounds_the_upstream_call(make_stack):
    """A client that waits 0.5 s gets DEADLINE_EXCEEDED although embed_timeout_s is 30 s.

    The embedder receives the caller's remaining time as its deadline (about 0.5 s, not 30 s), and
    its held call is ended when that passes: the gateway does not wait longer than the caller.
    """
    stack = make_stack(client_timeout_s=0.5, embed_timeout_s=30)
    stack.embedder.behaviour.hold_s = 60
    error = rpc_error(stack.client.search_image, png(COLORS["red"]))
    assert error.code() is StatusCode.DEADLINE_EXCEEDED
    assert max(stack.embedder.behaviour.remaining) < 1
    assert stack.embedder.behaviour.hold_ended.wait(30)
    assert stack.embedder.behaviour.cut_short == [True]
    assert stack.indexer.behaviour.calls["QueryVector"] == 0


def test_a_caller_that_cancels_its_search_cancels_the_embedders_work(make_stack):
    """The client cancels while the embedder holds its call (for 5 s, within the 30 s timeout):
    the gateway cancels the Embed call at once, so the embedder's hold is cut short.
    """
    stack = make_stack(embed_timeout_s=30)
    stack.embedder.behaviour.hold_s = 5
    with grpc.insecure_channel(stack.target) as channel:
        search = gateway_pb2_grpc.GatewayStub(channel).SearchByImage.future(
            gateway_pb2.SearchByImageRequest(image=png(COLORS["red"])), timeout=30
        )
        assert stack.embedder.behaviour.hold_started.wait(30)
        search.cancel()
        assert stack.embedder.behaviour.hold_ended.wait(30)
    assert stack.embedder.behaviour.cut_short == [True]


def test_not_found_from_the_indexer_passes_through_with_its_message(stack):
    """An unknown item id: the indexer's NOT_FOUND and its message reach the client unchanged."""
    error = rpc_error(stack.client.search_id, "no-such-photo")
    assert error.code() is StatusCode.NOT_FOUND
    assert error.details() == "no item 'no-such-photo' in bundle v-test-1"


@pytest.mark.parametrize(
    "code", [StatusCode.INVALID_ARGUMENT, StatusCode.FAILED_PRECONDITION, StatusCode.RESOURCE_EXHAUSTED]
)
def test_the_callers_problems_reported_by_an_upstream_pass_through(stack, code):
    """INVALID_ARGUMENT, FAILED_PRECONDITION, RESOURCE_EXHAUSTED from the indexer keep code and message."""
    stack.indexer.behaviour.fail = (code, f"the indexer says {code.name}")
    error = rpc_error(stack.client.search_image, png(COLORS["red"]))
    assert error.code() is code
    assert error.details() == f"the indexer says {code.name}"


def test_an_unexpected_upstream_error_is_internal_naming_the_upstream_without_a_traceback(stack):
    """INTERNAL from the indexer: INTERNAL naming the indexer and its message, and no traceback."""
    stack.indexer.behaviour.fail = (StatusCode.INTERNAL, "disk on fire")
    error = rpc_error(stack.client.search_id, "red")
    assert error.code() is StatusCode.INTERNAL
    assert f"indexer at {stack.settings.indexer_target} failed QueryItem with INTERNAL: disk on fire" in error.details()
    assert "Traceback" not in error.details()


# --- GetStatus ------------------------------------------------------------------------------------


def states(response) -> dict[str, str]:
    return {upstream.name: upstream.state for upstream in response.upstreams}


def test_status_with_both_upstreams_up_is_serving_and_compatible(stack):
    """Both SERVING, the embedder's model and the indexer's bundle reported, compatible, no detail."""
    response = stack.client.status()
    assert states(response) == {"embedder": "SERVING", "indexer": "SERVING"}
    assert [u.target for u in response.upstreams] == [stack.settings.embedder_target, stack.settings.indexer_target]
    assert response.model.fingerprint == FINGERPRINT
    assert response.index.model_fingerprint == FINGERPRINT and response.index.item_count == len(COLORS)
    assert response.compatible is True
    assert response.detail == ""


@pytest.mark.parametrize("down", ["embedder", "indexer"])
def test_status_with_one_upstream_down_reports_it_unreachable(stack, down):
    """GetStatus still answers: the stopped one UNREACHABLE with why, the other SERVING, not compatible."""
    (stack.embedder_service if down == "embedder" else stack.indexer_service).stop(0)
    response = stack.client.status()
    up = "indexer" if down == "embedder" else "embedder"
    assert states(response) == {down: "UNREACHABLE", up: "SERVING"}
    detail = {u.name: u.detail for u in response.upstreams}
    assert "unavailable" in detail[down] and detail[up] == ""
    assert response.compatible is False
    assert f"no {'model' if down == 'embedder' else 'index'} info from the {down}" in response.detail
    assert response.HasField("index" if down == "embedder" else "model")
    assert not response.HasField("model" if down == "embedder" else "index")


def test_status_reports_an_upstream_that_is_not_serving(stack):
    """An upstream whose health says NOT_SERVING (loading) is shown as NOT_SERVING, not UNREACHABLE."""
    stack.indexer_service.set_serving(False)
    assert states(stack.client.status())["indexer"] == "NOT_SERVING"


def test_status_with_mismatched_fingerprints_is_incompatible_and_says_why(make_stack):
    """Embedder fp-a vs bundle fp-b: compatible=false, detail naming both fingerprints."""
    stack = make_stack(embedders=[FakeEmbedder("fp-a")], indexer=FakeIndexer("fp-b"))
    response = stack.client.status()
    assert states(response) == {"embedder": "SERVING", "indexer": "SERVING"}
    assert response.compatible is False
    assert "fp-a" in response.detail and "fp-b" in response.detail


def test_status_with_a_slow_upstream_answers_within_the_status_timeout(make_stack):
    """GetModelInfo held past status_timeout_s: GetStatus still answers, saying the embedder timed out."""
    stack = make_stack(status_timeout_s=0.3)
    stack.embedder.behaviour.fail_methods = {"GetModelInfo"}
    stack.embedder.behaviour.hold_s = 60
    response = stack.client.status()
    assert states(response)["embedder"] == "SERVING"
    embedder = next(u for u in response.upstreams if u.name == "embedder")
    assert "did not answer GetModelInfo" in embedder.detail
    assert response.compatible is False and not response.HasField("model")


# --- load balancing -------------------------------------------------------------------------------


def test_calls_are_spread_over_every_embedder_replica_with_round_robin(make_stack):
    """`ipv4:127.0.0.1:P1,127.0.0.1:P2`: with round_robin both replicas get searches (pick_first would not)."""
    stack = make_stack(embedders=[FakeEmbedder(), FakeEmbedder()])
    assert stack.settings.embedder_target.startswith("ipv4:")
    for _ in range(20):
        stack.client.search_image(png(COLORS["red"]))
    calls = [fake.behaviour.calls["Embed"] for fake in stack.embedders]
    assert sum(calls) == 20
    assert min(calls) > 0, calls


def test_dns_targets_reach_the_upstreams(make_stack):
    """`dns:///localhost:P` targets (what compose/Kubernetes names look like) resolve and work."""
    port_stack = make_stack()
    stack = make_stack(
        embedder_target=f"dns:///localhost:{port_stack.embedder_service.port}",
        indexer_target=f"dns:///localhost:{port_stack.indexer_service.port}",
    )
    response = stack.client.search_image(png(COLORS["navy"]), k=1)
    assert [hit.item_id for hit in response.hits] == ["navy"]
    assert port_stack.embedder.behaviour.calls["Embed"] == 1
    assert states(stack.client.status()) == {"embedder": "SERVING", "indexer": "SERVING"}


# --- the gateway process --------------------------------------------------------------------------


def test_the_gateway_reports_serving_once_started(stack):
    """grpc.health.v1 says SERVING for the server and for cbir.v1.Gateway as soon as it listens."""
    with grpc.insecure_channel(stack.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", "cbir.v1.Gateway"]:
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_upstream_calls_and_stages_are_measured(stack):
    """A search observes the per-upstream histograms and the embed/index stages; a failure counts its code."""
    before = {
        "embed": sample("cbir_gateway_upstream_seconds_count", upstream="embedder", method="Embed"),
        "query": sample("cbir_gateway_upstream_seconds_count", upstream="indexer", method="QueryVector"),
        "stage": sample("cbir_stage_seconds_count", service="gateway", stage="embed"),
        "index_stage": sample("cbir_stage_seconds_count", service="gateway", stage="index"),
        "errors": sample(
            "cbir_gateway_upstream_errors_total", upstream="indexer", method="QueryItem", grpc_code="NOT_FOUND"
        ),
    }
    stack.client.search_image(png(COLORS["red"]))
    rpc_error(stack.client.search_id, "no-such-photo")
    assert sample("cbir_gateway_upstream_seconds_count", upstream="embedder", method="Embed") == before["embed"] + 1
    assert sample("cbir_gateway_upstream_seconds_count", upstream="indexer", method="QueryVector") == before["query"] + 1
    assert sample("cbir_stage_seconds_count", service="gateway", stage="embed") == before["stage"] + 1
    assert sample("cbir_stage_seconds_count", service="gateway", stage="index") == before["index_stage"] + 2
    assert sample(
        "cbir_gateway_upstream_errors_total", upstream="indexer", method="QueryItem", grpc_code="NOT_FOUND"
    ) == before["errors"] + 1


def test_settings_defaults_and_environment_prefix(monkeypatch):
    """Defaults are the documented ones; CBIR_GATEWAY_* variables set fields; default_k > max_k is refused."""
    for name in list(os.environ):
        if name.startswith("CBIR_GATEWAY_"):
            monkeypatch.delenv(name)
    settings = GatewaySettings()
    assert (settings.port, settings.metrics_port, settings.embedder_target, settings.indexer_target) == (
        50050, 9100, "127.0.0.1:50051", "127.0.0.1:50052"
    )
    assert (settings.default_k, settings.max_k, settings.max_message_mb) == (20, 1000, 16)
    assert (settings.embed_timeout_s, settings.index_timeout_s, settings.status_timeout_s) == (30, 5, 2)

    monkeypatch.setenv("CBIR_GATEWAY_EMBEDDER_TARGET", "dns:///embedder:50051")
    monkeypatch.setenv("CBIR_GATEWAY_MAX_K", "50")
    settings = GatewaySettings()
    assert settings.embedder_target == "dns:///embedder:50051" and settings.max_k == 50
    with pytest.raises(ValueError, match="default_k"):
        GatewaySettings(default_k=60)


def test_python_dash_m_services_gateway_serves_and_stops_on_sigterm(make_stack):
    """`python -m services.gateway` reads CBIR_GATEWAY_*, answers GetStatus, and exits 0 on SIGTERM."""
    upstreams = make_stack()
    env = {
        **os.environ,
        "CBIR_GATEWAY_PORT": "0",
        "CBIR_GATEWAY_METRICS_PORT": "0",
        "CBIR_GATEWAY_EMBEDDER_TARGET": upstreams.settings.embedder_target,
        "CBIR_GATEWAY_INDEXER_TARGET": upstreams.settings.indexer_target,
        "CBIR_GATEWAY_GRACE_SECONDS": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.gateway"], cwd=REPO, env=env,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        port = None
        for line in process.stderr:
            found = re.search(r"gRPC port (\d+)", line)
            if found:
                port = int(found.group(1))
                break
        assert port, "the gateway never said which port it listens on"
        with GatewayClient(f"127.0.0.1:{port}", timeout_s=10) as client:
            assert client.status().compatible is True
            assert [h.item_id for h in client.search_id("blue", k=1).hits] == ["blue"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
