"""`cbir.client.GatewayClient` against a recording fake gateway, a real gRPC server on 127.0.0.1:0.

The fake answers each RPC with a response built from its request (so a test sees what arrived)
and records the deadline each call came with; it can be told to abort with a status. The
gateway's own behaviour is tested in test_gateway.py.
"""

from __future__ import annotations

import socket

import grpc
import pytest

from cbir.client import GatewayClient
from cbir.grpc_server import GrpcService
from cbir.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

MiB = 1024 * 1024


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(self):
        self.requests: list[object] = []
        self.remaining: list[float] = []
        self.fail: tuple[grpc.StatusCode, str] | None = None
        self.hits_per_search = 1
        self.hit_metadata_bytes = 0

    def _enter(self, request, context):
        self.requests.append(request)
        self.remaining.append(context.time_remaining())
        if self.fail:
            context.abort(*self.fail)

    def _hits(self, first_id: str, k: int) -> list[common_pb2.Hit]:
        metadata = {"blob": "x" * self.hit_metadata_bytes} if self.hit_metadata_bytes else {}
        count = max(self.hits_per_search, k)
        return [
            common_pb2.Hit(item_id=f"{first_id}-{i}", url=f"file:///{i}.jpg", distance=i, score=1 / (1 + i), metadata=metadata)
            for i in range(count)
        ]

    def SearchByImage(self, request, context):
        self._enter(request, context)
        return gateway_pb2.SearchByImageResponse(
            hits=self._hits(f"img{len(request.image)}", request.k), bundle_version="v1",
            timings=gateway_pb2.Timings(embed_ms=1, index_ms=2, total_ms=3),
        )

    def SearchById(self, request, context):
        self._enter(request, context)
        return gateway_pb2.SearchByIdResponse(hits=self._hits(request.item_id, request.k), bundle_version="v1")

    def GetStatus(self, request, context):
        self._enter(request, context)
        return gateway_pb2.GetStatusResponse(
            upstreams=[gateway_pb2.UpstreamStatus(name="embedder", target="e:1", state="SERVING")],
            compatible=True,
        )


@pytest.fixture
def fake():
    servicer = FakeGateway()
    service = GrpcService("fake-gateway", port=0, max_workers=4, grace_seconds=0, max_message_bytes=64 * MiB)
    service.add(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, "cbir.v1.Gateway")
    service.start()
    service.set_serving(True)
    servicer.target = f"127.0.0.1:{service.port}"
    yield servicer
    service.stop(0)


@pytest.fixture
def client(fake):
    with GatewayClient(fake.target) as client:
        yield client


def test_search_image_sends_image_k_and_search_k_and_returns_the_response(fake, client):
    """The image bytes, k and search_k arrive as given; the SearchByImageResponse comes back whole."""
    response = client.search_image(b"\x89PNG-bytes", k=7, search_k=500)
    assert fake.requests == [gateway_pb2.SearchByImageRequest(image=b"\x89PNG-bytes", k=7, search_k=500)]
    assert isinstance(response, gateway_pb2.SearchByImageResponse)
    assert [hit.item_id for hit in response.hits] == [f"img10-{i}" for i in range(7)]
    assert response.bundle_version == "v1" and response.timings.total_ms == 3


def test_search_id_sends_every_field_and_returns_the_response(fake, client):
    """item_id, k, search_k and exclude_self arrive as given; defaults are 0, 0 and False."""
    response = client.search_id("photo-1", k=2, search_k=9, exclude_self=True)
    client.search_id("photo-2")
    assert fake.requests == [
        gateway_pb2.SearchByIdRequest(item_id="photo-1", k=2, search_k=9, exclude_self=True),
        gateway_pb2.SearchByIdRequest(item_id="photo-2", k=0, search_k=0, exclude_self=False),
    ]
    assert isinstance(response, gateway_pb2.SearchByIdResponse)
    assert [hit.item_id for hit in response.hits] == ["photo-1-0", "photo-1-1"]


def test_status_returns_the_gateways_status(fake, client):
    """status() is GetStatus: the GetStatusResponse as the gateway sent it."""
    response = client.status()
    assert isinstance(response, gateway_pb2.GetStatusResponse)
    assert response.compatible is True and response.upstreams[0].state == "SERVING"


def test_every_call_carries_the_clients_timeout(fake):
    """timeout_s is each call's deadline: the server sees about 0.25 s left (not none, not 60 s)."""
    with GatewayClient(fake.target, timeout_s=0.25) as client:
        client.search_image(b"x")
        client.search_id("a")
        client.status()
    assert len(fake.remaining) == 3
    assert all(0 < remaining < 1 for remaining in fake.remaining), fake.remaining


def test_the_default_timeout_is_60_seconds(fake, client):
    """Without timeout_s a call still has a deadline, of 60 s."""
    client.status()
    assert client.timeout_s == 60.0
    assert 30 < fake.remaining[0] <= 61


def test_errors_are_raised_as_grpc_rpc_errors_with_code_and_details(fake, client):
    """A gateway status comes back as grpc.RpcError with its code and message, for every method."""
    fake.fail = (grpc.StatusCode.NOT_FOUND, "no item 'x'")
    for call in (lambda: client.search_image(b"x"), lambda: client.search_id("x"), client.status):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == "no item 'x'"


def test_a_16_mib_image_is_sent_and_a_large_answer_received(fake, client):
    """Neither gRPC's 4 MiB receive default nor any send limit stops a 16 MiB image or a 6 MiB answer."""
    fake.hits_per_search = 3
    fake.hit_metadata_bytes = 2 * MiB
    response = client.search_image(b"\xff" * (16 * MiB))
    assert len(fake.requests[0].image) == 16 * MiB
    assert response.ByteSize() > 6 * MiB


def test_close_and_the_context_manager_close_the_channel(fake):
    """After `with` (or close()) the channel is closed: a further call fails instead of reconnecting."""
    with GatewayClient(fake.target) as client:
        client.status()
    with pytest.raises(ValueError):
        client.status()
    other = GatewayClient(fake.target)
    other.close()
    with pytest.raises(ValueError):
        other.search_id("a")


def test_an_unreachable_gateway_raises_unavailable():
    """Nothing at the target: grpc.RpcError UNAVAILABLE, as gRPC reports it (no hang, no other type)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with GatewayClient(f"127.0.0.1:{port}", timeout_s=10) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.status()
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
