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

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cbir import filters
from cbir.channels import ClientTls, Retry, open_channel
from cbir.v1 import common_pb2, duplicates_pb2, gateway_pb2, gateway_pb2_grpc

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name  # "cbir.v1.Gateway"
# Searches and status only read: a call that finds a gateway replica UNAVAILABLE is sent again
# (to the next replica) by gRPC itself.
# A search's metadata filter: conditions in the CLI syntax ("country=fr", "year>=2010"; one string may hold
# several separated by ';'), or a cbir.v1.Filter (see cbir.filters).
FilterSpec = str | Iterable[str] | common_pb2.Filter | None

RETRY = Retry({GATEWAY_SERVICE: ("SearchByImage", "SearchById", "SearchByUrl", "SearchBatch", "GetStatus",
                                  "FindDuplicates")})  # a stream: retried only until its first message


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

    def search_image(self, image: bytes, k: int = 0, search_k: int = 0, min_score: float = 0.0,
                     filter: FilterSpec = None) -> gateway_pb2.SearchByImageResponse:
        """The k items most similar to an encoded image (k=0: the gateway's default), none scoring below
        `min_score`, only items whose metadata meets `filter` (e.g. ["country=fr", "year>=2010"]; a malformed
        condition raises cbir.filters.FilterError before anything is sent)."""
        request = gateway_pb2.SearchByImageRequest(image=image, k=k, search_k=search_k, min_score=min_score,
                                                   filter=filter_message(filter))
        return self._stub.SearchByImage(request, timeout=self.timeout_s)

    def search_id(
        self, item_id: str, k: int = 0, search_k: int = 0, exclude_self: bool = False, min_score: float = 0.0,
        filter: FilterSpec = None,
    ) -> gateway_pb2.SearchByIdResponse:
        """The k items most similar to an indexed item, optionally leaving the item itself out."""
        request = gateway_pb2.SearchByIdRequest(item_id=item_id, k=k, search_k=search_k, exclude_self=exclude_self,
                                                min_score=min_score, filter=filter_message(filter))
        return self._stub.SearchById(request, timeout=self.timeout_s)

    def search_url(self, url: str, k: int = 0, search_k: int = 0, min_score: float = 0.0, filter: FilterSpec = None
                   ) -> gateway_pb2.SearchByUrlResponse:
        """The k items most similar to the image at an http(s) URL, which the gateway downloads."""
        request = gateway_pb2.SearchByUrlRequest(url=url, k=k, search_k=search_k, min_score=min_score,
                                                 filter=filter_message(filter))
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
        filter: FilterSpec = None,
    ) -> gateway_pb2.SearchBatchResponse:
        """Many searches in one call: `queries` (BatchQuery messages, or encoded images as bytes), then `images`,
        `urls` and `item_ids`, in that order. The response has one BatchResult per query, same order: its hits,
        or its `error` (and `code`) when that query alone failed (a bad image, an unknown id, a failed download).
        The gateway embeds all the images together; it refuses an empty batch or one over its limit (64 by
        default) with INVALID_ARGUMENT. `timeout_s` (default: the client's) bounds the call: a batch of N images
        takes about N times one search's embedding (the gateway allows it `batch_timeout_s`, 180 s by default).
        `filter` (as in `search_image`) applies to every query."""
        for name, given in (("queries", queries), ("images", images), ("urls", urls), ("item_ids", item_ids)):
            if isinstance(given, (str, bytes)):
                raise TypeError(f"search_batch({name}=...) takes a list, not one {type(given).__name__}")
        request = gateway_pb2.SearchBatchRequest(k=k, search_k=search_k, min_score=min_score,
                                                 exclude_self=exclude_self, filter=filter_message(filter))
        for query in queries:
            request.queries.append(gateway_pb2.BatchQuery(image=query) if isinstance(query, bytes) else query)
        request.queries.extend(gateway_pb2.BatchQuery(image=image) for image in images)
        request.queries.extend(gateway_pb2.BatchQuery(url=url) for url in urls)
        request.queries.extend(gateway_pb2.BatchQuery(item_id=item_id) for item_id in item_ids)
        return self._stub.SearchBatch(request, timeout=self.timeout_s if timeout_s is None else timeout_s)

    def find_duplicates(
        self,
        match_class: str | None = None,
        *,
        threshold: float | None = None,
        k: int = 0,
        limit: int = 0,
        verify_top: int = 0,
        search_k: int = 0,
        timeout_s: float | None = None,
        on_progress: Callable[[duplicates_pb2.DuplicateProgress], None] | None = None,
    ) -> Iterator[duplicates_pb2.DuplicateGroup]:
        """Groups of copies over the whole collection, largest first (each: `items` with their URLs, `pairs`
        with `score`, `inliers`, `match`). `match_class` "copy" (the default: copies and the same image) or
        "near-duplicate" (the same image only), or instead `threshold` (pairs whose global score is >= it);
        `k` nearest items judged per item (0: 10); `limit` the most groups (0: all); `verify_top` nearest items
        verified per item (0: 20); `search_k` the search effort per item (0: scaled to the neighbours asked). The
        groups arrive once every item is searched; `on_progress` sees the progress before. Stop iterating to
        cancel the search."""
        events = self.find_duplicates_events(match_class, threshold=threshold, k=k, limit=limit, verify_top=verify_top,
                                             search_k=search_k, timeout_s=timeout_s)
        try:
            for event in events:
                kind = event.WhichOneof("event")
                if kind == "group":
                    yield event.group
                elif kind == "progress" and on_progress is not None:
                    on_progress(event.progress)
        finally:
            events.cancel()  # nothing once the stream has ended; else stops the search

    def find_duplicates_events(self, match_class: str | None = None, *, threshold: float | None = None, k: int = 0,
                               limit: int = 0, verify_top: int = 0, search_k: int = 0, timeout_s: float | None = None):
        """`find_duplicates`' stream itself: FindDuplicatesResponse messages (progress, then the groups, then one
        summary), iterable, with `cancel()`. `timeout_s` (default: the client's) bounds the whole search."""
        if match_class is not None and threshold is not None:
            raise ValueError("give a match class or a threshold, not both")
        request = duplicates_pb2.FindDuplicatesRequest(k=k, limit=limit, verify_top=verify_top, search_k=search_k)
        if threshold is not None:
            request.threshold = threshold
        elif match_class is not None:
            request.match_class = match_class
        return self._stub.FindDuplicates(request, timeout=self.timeout_s if timeout_s is None else timeout_s)

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


def filter_message(spec: FilterSpec) -> common_pb2.Filter | None:
    """The cbir.v1.Filter of a search's `filter` argument (None: no filter); FilterError for a malformed condition."""
    if spec is None or isinstance(spec, common_pb2.Filter):
        return spec
    conditions = filters.parse_filter(spec)
    return filters.to_proto(conditions) if conditions else None
