"""`GatewayServicer`: the cbir.v1.Gateway RPCs, composed from the embedder and the indexer.

Handlers raise `cbir.errors` domain errors; `cbir.grpc_server.ErrorInterceptor` turns them into
statuses. Upstream failures are mapped in `services.gateway.upstreams`.

Each search has a deadline budget (`request_timeout_s`, or the caller's deadline if sooner) that
the download, the Embed call and the index query share. SearchByUrl downloads through
`cbir.download.Downloader` with a policy that refuses non-public addresses unless configured
(see `services.gateway.urls`).
"""

from __future__ import annotations

import time

from cbir import metrics
from cbir.channels import ClientTls
from cbir.errors import InvalidRequest
from cbir.v1 import gateway_pb2, gateway_pb2_grpc, indexer_pb2
from services.gateway.budget import Budget
from services.gateway.settings import GatewaySettings
from services.gateway.status import gather_status
from services.gateway.upstreams import EmbedderUpstream, IndexerUpstream
from services.gateway.urls import UrlFetcher

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name  # "cbir.v1.Gateway"

_MIN_STATUS_TIMEOUT_S = 0.001


def _ms(seconds: float) -> float:
    return seconds * 1000.0


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, settings: GatewaySettings, embedder: EmbedderUpstream, indexer: IndexerUpstream,
                 urls: UrlFetcher | None = None):
        self.settings = settings
        self.embedder = embedder
        self.indexer = indexer
        self.urls = urls or UrlFetcher.from_settings(settings)

    @classmethod
    def from_settings(cls, settings: GatewaySettings, **fetcher_options) -> "GatewayServicer":
        """A servicer with its own channels to the upstreams named in `settings`."""
        size = settings.max_message_bytes
        tls = ClientTls.from_settings(
            settings.upstream_tls, settings.upstream_tls_ca, settings.upstream_tls_cert, settings.upstream_tls_key,
            settings.upstream_tls_server_name,
        )
        return cls(
            settings,
            EmbedderUpstream(settings.embedder_target, max_message_bytes=size, tls=tls),
            IndexerUpstream(settings.indexer_target, max_message_bytes=size, tls=tls),
            UrlFetcher.from_settings(settings, **fetcher_options),
        )

    def close(self) -> None:
        self.embedder.close()
        self.indexer.close()
        self.urls.close()

    def _budget(self, context) -> Budget:
        return Budget.for_request(self.settings.request_timeout_s, context)

    def _k(self, k: int) -> int:
        if k == 0:
            return self.settings.default_k
        if k > self.settings.max_k:
            raise InvalidRequest(f"k={k} is more than this gateway returns: ask for at most {self.settings.max_k}")
        return k

    def SearchByImage(self, request: gateway_pb2.SearchByImageRequest, context) -> gateway_pb2.SearchByImageResponse:
        start = time.perf_counter()
        budget = self._budget(context)
        if not request.image:
            raise InvalidRequest("image is empty: send the encoded bytes of a JPEG, PNG, WebP, ... image")
        k = self._k(request.k)
        found, embed_s, index_s = self._search_image(request.image, k, request.search_k, request.min_score, budget)
        return gateway_pb2.SearchByImageResponse(
            hits=found.hits,
            bundle_version=found.bundle_version,
            timings=gateway_pb2.Timings(
                embed_ms=_ms(embed_s), index_ms=_ms(index_s), total_ms=_ms(time.perf_counter() - start)
            ),
        )

    def SearchByUrl(self, request: gateway_pb2.SearchByUrlRequest, context) -> gateway_pb2.SearchByUrlResponse:
        start = time.perf_counter()
        budget = self._budget(context)
        if not request.url:
            raise InvalidRequest("url is empty: give the http(s) URL of an image")
        k = self._k(request.k)
        with metrics.stage("gateway", "fetch") as fetch:
            fetched = self.urls.fetch(request.url, deadline=budget.end)
        found, embed_s, index_s = self._search_image(fetched.data, k, request.search_k, request.min_score, budget)
        return gateway_pb2.SearchByUrlResponse(
            hits=found.hits,
            bundle_version=found.bundle_version,
            timings=gateway_pb2.Timings(
                fetch_ms=_ms(fetch.seconds), embed_ms=_ms(embed_s), index_ms=_ms(index_s),
                total_ms=_ms(time.perf_counter() - start),
            ),
            image_bytes=len(fetched.data),
            content_type=fetched.content_type,
        )

    def _search_image(self, image: bytes, k: int, search_k: int, min_score: float, budget: Budget):
        """Embed `image` (with its local features when `verify` is on), then ask the indexer:
        (QueryVectorResponse, embed seconds, index seconds)."""
        with metrics.stage("gateway", "embed") as embed:
            result, fingerprint = self.embedder.embed(image, timeout_s=self.settings.embed_timeout_s, budget=budget,
                                                      local_features=self.settings.verify)

        with metrics.stage("gateway", "index") as index:
            found = self.indexer.query_vector(
                indexer_pb2.QueryVectorRequest(
                    vector=result.vector, k=k, search_k=search_k, model_fingerprint=fingerprint,
                    local_features=result.local_features, local_features_mirrored=result.local_features_mirrored,
                    min_score=min_score,
                ),
                timeout_s=self.settings.index_timeout_s,
                budget=budget,
            )
        return found, embed.seconds, index.seconds

    def SearchById(self, request: gateway_pb2.SearchByIdRequest, context) -> gateway_pb2.SearchByIdResponse:
        start = time.perf_counter()
        if not request.item_id:
            raise InvalidRequest("item_id is empty: give the id of an indexed image")
        k = self._k(request.k)

        with metrics.stage("gateway", "index") as index:
            found = self.indexer.query_item(
                indexer_pb2.QueryItemRequest(
                    item_id=request.item_id, k=k, search_k=request.search_k, exclude_self=request.exclude_self,
                    min_score=request.min_score,
                ),
                timeout_s=self.settings.index_timeout_s,
                budget=self._budget(context),
            )

        return gateway_pb2.SearchByIdResponse(
            hits=found.hits,
            bundle_version=found.bundle_version,
            timings=gateway_pb2.Timings(index_ms=_ms(index.seconds), total_ms=_ms(time.perf_counter() - start)),
        )

    def GetStatus(self, request: gateway_pb2.GetStatusRequest, context) -> gateway_pb2.GetStatusResponse:
        budget = Budget.for_request(self.settings.status_timeout_s, context)
        response = gather_status(self.embedder, self.indexer, timeout_s=max(budget.remaining_s(), _MIN_STATUS_TIMEOUT_S))
        response.default_k = self.settings.default_k
        response.max_k = self.settings.max_k
        return response
