"""`GatewayClient`: the Python client of the cbir gateway (used by the CLI and the UI).

    with GatewayClient("127.0.0.1:50050") as client:
        response = client.search_image(open("cat.jpg", "rb").read(), k=10)
        for hit in response.hits:
            print(hit.score, hit.url)

Every method returns the `cbir.v1.gateway_pb2` response and raises `grpc.RpcError` (with
`.code()` and `.details()`) as gRPC does. A `dns:///name:port` target spreads calls over every
gateway replica the name resolves to.

TLS: give `tls_ca` (the CA that signed the gateway's certificate; `tls=True` alone trusts the
system's CAs), and for mutual TLS `tls_cert` + `tls_key` (PEM files).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cbir.channels import ClientTls, Retry, open_channel
from cbir.v1 import gateway_pb2, gateway_pb2_grpc

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name  # "cbir.v1.Gateway"
# Searches and status only read: a call that finds a gateway replica UNAVAILABLE is sent again
# (to the next replica) by gRPC itself.
RETRY = Retry({GATEWAY_SERVICE: ("SearchByImage", "SearchById", "SearchByUrl", "SearchBatch", "GetStatus")})


class GatewayClient:
    """A channel to the gateway at `target`; every call waits at most `timeout_s` seconds."""

    def __init__(
        self,
        target: str,
        timeout_s: float = 60.0,
        *,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_server_name: str | None = None,
    ):
        self.target = target
        self.timeout_s = timeout_s
        self.tls = ClientTls.from_settings(tls, tls_ca, tls_cert, tls_key, tls_server_name)
        self._channel = open_channel(target, tls=self.tls, retry=RETRY)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def search_image(self, image: bytes, k: int = 0, search_k: int = 0, min_score: float = 0.0
                     ) -> gateway_pb2.SearchByImageResponse:
        """The k items most similar to an encoded image (k=0: the gateway's default), none scoring below
        `min_score`."""
        request = gateway_pb2.SearchByImageRequest(image=image, k=k, search_k=search_k, min_score=min_score)
        return self._stub.SearchByImage(request, timeout=self.timeout_s)

    def search_id(
        self, item_id: str, k: int = 0, search_k: int = 0, exclude_self: bool = False, min_score: float = 0.0
    ) -> gateway_pb2.SearchByIdResponse:
        """The k items most similar to an indexed item, optionally leaving the item itself out."""
        request = gateway_pb2.SearchByIdRequest(item_id=item_id, k=k, search_k=search_k, exclude_self=exclude_self,
                                                min_score=min_score)
        return self._stub.SearchById(request, timeout=self.timeout_s)

    def search_url(self, url: str, k: int = 0, search_k: int = 0, min_score: float = 0.0
                   ) -> gateway_pb2.SearchByUrlResponse:
        """The k items most similar to the image at an http(s) URL, which the gateway downloads."""
        request = gateway_pb2.SearchByUrlRequest(url=url, k=k, search_k=search_k, min_score=min_score)
        return self._stub.SearchByUrl(request, timeout=self.timeout_s)

    def search_batch(
        self,
        queries: Iterable[gateway_pb2.BatchQuery | bytes] = (),
        *,
        images: Iterable[bytes] = (),
        urls: Iterable[str] = (),
        item_ids: Iterable[str] = (),
        k: int = 0,
        search_k: int = 0,
        min_score: float = 0.0,
        exclude_self: bool = False,
        timeout_s: float | None = None,
    ) -> gateway_pb2.SearchBatchResponse:
        """Many searches in one call: `queries` (BatchQuery messages, or encoded images as bytes), then `images`,
        `urls` and `item_ids`, in that order. The response has one BatchResult per query, same order: its hits,
        or its `error` (and `code`) when that query alone failed (a bad image, an unknown id, a failed download).
        The gateway embeds all the images together; it refuses an empty batch or one over its limit (64 by
        default) with INVALID_ARGUMENT. `timeout_s` (default: the client's) bounds the call: a batch of N images
        takes about N times one search's embedding (the gateway allows it `batch_timeout_s`, 180 s by default)."""
        for name, given in (("queries", queries), ("images", images), ("urls", urls), ("item_ids", item_ids)):
            if isinstance(given, (str, bytes)):
                raise TypeError(f"search_batch({name}=...) takes a list, not one {type(given).__name__}")
        request = gateway_pb2.SearchBatchRequest(k=k, search_k=search_k, min_score=min_score,
                                                 exclude_self=exclude_self)
        for query in queries:
            request.queries.append(gateway_pb2.BatchQuery(image=query) if isinstance(query, bytes) else query)
        request.queries.extend(gateway_pb2.BatchQuery(image=image) for image in images)
        request.queries.extend(gateway_pb2.BatchQuery(url=url) for url in urls)
        request.queries.extend(gateway_pb2.BatchQuery(item_id=item_id) for item_id in item_ids)
        return self._stub.SearchBatch(request, timeout=self.timeout_s if timeout_s is None else timeout_s)

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
        return f"GatewayClient({self.target!r}, timeout_s={self.timeout_s}{', tls' if self.tls else ''})"
