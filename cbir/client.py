"""`GatewayClient`: the Python client of the cbir gateway (used by the CLI and the UI).

    with GatewayClient("127.0.0.1:50050") as client:
        response = client.search_image(open("cat.jpg", "rb").read(), k=10)
        for hit in response.hits:
            print(hit.score, hit.url)

Every method returns the `cbir.v1.gateway_pb2` response and raises `grpc.RpcError` (with
`.code()` and `.details()`) as gRPC does. A `dns:///name:port` target spreads calls over every
gateway replica the name resolves to.
"""

from __future__ import annotations

import json

import grpc

from cbir.v1 import gateway_pb2, gateway_pb2_grpc

# Room for a 16 MiB image plus the request around it, and for a long list of hits with metadata.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


class GatewayClient:
    """A channel to the gateway at `target`; every call waits at most `timeout_s` seconds."""

    def __init__(self, target: str, timeout_s: float = 60.0):
        self.target = target
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.service_config", _SERVICE_CONFIG),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def search_image(self, image: bytes, k: int = 0, search_k: int = 0) -> gateway_pb2.SearchByImageResponse:
        """The k items most similar to an encoded image (k=0: the gateway's default)."""
        request = gateway_pb2.SearchByImageRequest(image=image, k=k, search_k=search_k)
        return self._stub.SearchByImage(request, timeout=self.timeout_s)

    def search_id(
        self, item_id: str, k: int = 0, search_k: int = 0, exclude_self: bool = False
    ) -> gateway_pb2.SearchByIdResponse:
        """The k items most similar to an indexed item, optionally leaving the item itself out."""
        request = gateway_pb2.SearchByIdRequest(item_id=item_id, k=k, search_k=search_k, exclude_self=exclude_self)
        return self._stub.SearchById(request, timeout=self.timeout_s)

    def status(self) -> gateway_pb2.GetStatusResponse:
        """The upstreams' health, the embedder's model, the indexer's bundle and whether they fit."""
        return self._stub.GetStatus(gateway_pb2.GetStatusRequest(), timeout=self.timeout_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GatewayClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GatewayClient({self.target!r}, timeout_s={self.timeout_s})"
