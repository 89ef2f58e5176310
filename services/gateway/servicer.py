"""`GatewayServicer`: the cbir.v1.Gateway RPCs, composed from the embedder and the indexer.

Handlers raise `cbir.errors` domain errors; `cbir.grpc_server.ErrorInterceptor` turns them into
statuses. Upstream failures are mapped in `services.gateway.upstreams`.
"""

from __future__ import annotations

import time

from cbir import metrics
from cbir.errors import InvalidRequest
from cbir.v1 import gateway_pb2, gateway_pb2_grpc, indexer_pb2
from services.gateway.settings import GatewaySettings
from services.gateway.status import gather_status
from services.gateway.upstreams import EmbedderUpstream, IndexerUpstream

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name  # "cbir.v1.Gateway"

_MIN_STATUS_TIMEOUT_S = 0.001


def _ms(seconds: float) -> float:
    return seconds * 1000.0


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, settings: GatewaySettings, embedder: EmbedderUpstream, indexer: IndexerUpstream):
        self.settings = settings
        self.embedder = embedder
        self.indexer = indexer

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> "GatewayServicer":
        """A servicer with its own channels to the upstreams named in `settings`."""
        size = settings.max_message_bytes
        return cls(
            settings,
            EmbedderUpstream(settings.embedder_target, max_message_bytes=size),
            IndexerUpstream(settings.indexer_target, max_message_bytes=size),
        )

    def close(self) -> None:
        self.embedder.close()
        self.indexer.close()

    def _k(self, k: int) -> int:
        if k == 0:
            return self.settings.default_k
        if k > self.settings.max_k:
            raise InvalidRequest(f"k={k} is more than this gateway returns: ask for at most {self.settings.max_k}")
        return k

    def SearchByImage(self, request: gateway_pb2.SearchByImageRequest, context) -> gateway_pb2.SearchByImageResponse:
        start = time.perf_counter()
        if not request.image:
            raise InvalidRequest("image is empty: send the encoded bytes of a JPEG, PNG, WebP, ... image")
        k = self._k(request.k)

        with metrics.stage("gateway", "embed"):
            embed_start = time.perf_counter()
            vector, fingerprint = self.embedder.embed(
                request.image, timeout_s=self.settings.embed_timeout_s, context=context
            )
            embed_s = time.perf_counter() - embed_start

        with metrics.stage("gateway", "index"):
            index_start = time.perf_counter()
            found = self.indexer.query_vector(
                indexer_pb2.QueryVectorRequest(
                    vector=vector, k=k, search_k=request.search_k, model_fingerprint=fingerprint
                ),
                timeout_s=self.settings.index_timeout_s,
                context=context,
            )
            index_s = time.perf_counter() - index_start

        return gateway_pb2.SearchByImageResponse(
            hits=found.hits,
            bundle_version=found.bundle_version,
            timings=gateway_pb2.Timings(
                embed_ms=_ms(embed_s), index_ms=_ms(index_s), total_ms=_ms(time.perf_counter() - start)
            ),
        )

    def SearchById(self, request: gateway_pb2.SearchByIdRequest, context) -> gateway_pb2.SearchByIdResponse:
        start = time.perf_counter()
        if not request.item_id:
            raise InvalidRequest("item_id is empty: give the id of an indexed image")
        k = self._k(request.k)

        with metrics.stage("gateway", "index"):
            index_start = time.perf_counter()
            found = self.indexer.query_item(
                indexer_pb2.QueryItemRequest(
                    item_id=request.item_id, k=k, search_k=request.search_k, exclude_self=request.exclude_self
                ),
                timeout_s=self.settings.index_timeout_s,
                context=context,
            )
            index_s = time.perf_counter() - index_start

        return gateway_pb2.SearchByIdResponse(
            hits=found.hits,
            bundle_version=found.bundle_version,
            timings=gateway_pb2.Timings(index_ms=_ms(index_s), total_ms=_ms(time.perf_counter() - start)),
        )

    def GetStatus(self, request: gateway_pb2.GetStatusRequest, context) -> gateway_pb2.GetStatusResponse:
        timeout_s = self.settings.status_timeout_s
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None:
            timeout_s = max(min(timeout_s, remaining), _MIN_STATUS_TIMEOUT_S)
        return gather_status(self.embedder, self.indexer, timeout_s=timeout_s)
