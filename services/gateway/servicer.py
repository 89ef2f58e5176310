"""`GatewayServicer`: the cbir.v1.Gateway RPCs, composed from the embedder and the indexer.

Handlers raise `cbir.errors` domain errors; `cbir.grpc_server.ErrorInterceptor` turns them into
statuses. Upstream failures are mapped in `services.gateway.upstreams`.

Each search has a deadline budget (`request_timeout_s`, or the caller's deadline if sooner) that
the download, the Embed call and the index query share. SearchByUrl downloads through
`cbir.download.Downloader` with a policy that refuses non-public addresses unless configured
(see `services.gateway.urls`).

SearchBatch answers many queries in one call, within its own budget (`batch_timeout_s`): the URLs
are downloaded (several at once), every image goes to the embedder in one Embed call, then the
index queries run with at most `batch_index_concurrency` in flight. A query that fails gets its own `BatchResult.error`; only a
request that is wrong as a whole (empty, too many queries, bad k, a malformed filter) fails the call.

Every search may carry a metadata filter (`cbir.v1.Filter`, `cbir.filters`): the gateway refuses a
malformed one before any download or embedding, and passes it on to the indexer, which applies it.

FindDuplicates passes the indexer's stream through, message by message, within its own budget
(`duplicates_timeout_s`, or the caller's deadline if sooner); the indexer judges the request. When the
caller goes away, the indexer's call is cancelled and its search stops.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from cbir import filters, metrics
from cbir.channels import ClientTls
from cbir.errors import CbirError, InvalidRequest
from cbir.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, indexer_pb2
from services.gateway.budget import Budget
from services.gateway.metrics import BATCH_QUERIES, BATCH_RESULTS
from services.gateway.settings import GatewaySettings
from services.gateway.status import gather_status
from services.gateway.upstreams import CallWindow, EmbedderUpstream, IndexerUpstream
from services.gateway.urls import UrlFetcher

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name  # "cbir.v1.Gateway"

_MIN_STATUS_TIMEOUT_S = 0.001
# What an empty query lacks, by its kind (None: a BatchQuery with nothing set).
_EMPTY = {
    "image": "image is empty: send the encoded bytes of a JPEG, PNG, WebP, ... image",
    "url": "url is empty: give the http(s) URL of an image",
    "item_id": "item_id is empty: give the id of an indexed image",
    None: "the query is empty: set its image, url or item_id",
}


def _ms(seconds: float) -> float:
    return seconds * 1000.0


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, settings: GatewaySettings, embedder: EmbedderUpstream, indexer: IndexerUpstream,
                 urls: UrlFetcher | None = None):
        self.settings = settings
        self.embedder = embedder
        self.indexer = indexer
        self.urls = urls or UrlFetcher.from_settings(settings)
        # SearchBatch's downloads: half of the download slots at most, the rest stay for SearchByUrl.
        self._batch_downloads = ThreadPoolExecutor(
            max(1, self.urls.max_concurrent // 2), thread_name_prefix="gateway-batch-fetch"
        )

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
        self._batch_downloads.shutdown(wait=False, cancel_futures=True)
        self.urls.close()

    def _budget(self, context) -> Budget:
        return Budget.for_request(self.settings.request_timeout_s, context)

    def _k(self, k: int) -> int:
        if k == 0:
            return self.settings.default_k
        if k > self.settings.max_k:
            raise InvalidRequest(f"k={k} is more than this gateway returns: ask for at most {self.settings.max_k}")
        return k

    @staticmethod
    def _filter(request) -> common_pb2.Filter | None:
        """The request's metadata filter, passed on to the indexer as sent (None: no filter). A malformed one is
        refused here, before anything is downloaded or embedded; the indexer judges its fields."""
        if not request.HasField("filter"):
            return None
        filters.from_proto(request.filter)
        return request.filter

    def SearchByImage(self, request: gateway_pb2.SearchByImageRequest, context) -> gateway_pb2.SearchByImageResponse:
        start = time.perf_counter()
        budget = self._budget(context)
        if not request.image:
            raise InvalidRequest(_EMPTY["image"])
        k = self._k(request.k)
        conditions = self._filter(request)
        found, embed_s, index_s = self._search_image(request.image, k, request.search_k, request.min_score, budget,
                                                     conditions)
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
            raise InvalidRequest(_EMPTY["url"])
        k = self._k(request.k)
        conditions = self._filter(request)
        with metrics.stage("gateway", "fetch") as fetch:
            fetched = self.urls.fetch(request.url, deadline=budget.end)
        found, embed_s, index_s = self._search_image(fetched.data, k, request.search_k, request.min_score, budget,
                                                     conditions)
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

    def _search_image(self, image: bytes, k: int, search_k: int, min_score: float, budget: Budget,
                      conditions: common_pb2.Filter | None = None):
        """Embed `image` (with its local features when `verify` is on), then ask the indexer:
        (QueryVectorResponse, embed seconds, index seconds)."""
        with metrics.stage("gateway", "embed") as embed:
            results, fingerprint = self._embed([image], self.settings.embed_timeout_s, budget)
            result = self.embedder.checked(results[0])
        with metrics.stage("gateway", "index") as index:
            found = self.indexer.query(self._vector_query(result, fingerprint, k, search_k, min_score, conditions),
                                       timeout_s=self.settings.index_timeout_s, budget=budget)
        return found, embed.seconds, index.seconds

    def _embed(self, images: list[bytes], timeout_s: float, budget: Budget):
        """(EmbedResults, model fingerprint) of `images` in one Embed call, with each one's local features (and
        its mirror's) and region vectors when `verify` is on, so that the indexer verifies its best candidates."""
        return self.embedder.embed(images, timeout_s=timeout_s, budget=budget, local_features=self.settings.verify)

    @staticmethod
    def _vector_query(result, fingerprint: str, k: int, search_k: int, min_score: float,
                      conditions: common_pb2.Filter | None = None) -> indexer_pb2.QueryVectorRequest:
        return indexer_pb2.QueryVectorRequest(
            vector=result.vector, k=k, search_k=search_k, model_fingerprint=fingerprint,
            local_features=result.local_features, local_features_mirrored=result.local_features_mirrored,
            min_score=min_score, regions=result.regions, filter=conditions,
        )

    @staticmethod
    def _item_query(item_id: str, k: int, search_k: int, exclude_self: bool, min_score: float,
                    conditions: common_pb2.Filter | None = None) -> indexer_pb2.QueryItemRequest:
        return indexer_pb2.QueryItemRequest(
            item_id=item_id, k=k, search_k=search_k, exclude_self=exclude_self, min_score=min_score,
            filter=conditions,
        )

    def SearchById(self, request: gateway_pb2.SearchByIdRequest, context) -> gateway_pb2.SearchByIdResponse:
        start = time.perf_counter()
        if not request.item_id:
            raise InvalidRequest(_EMPTY["item_id"])
        k = self._k(request.k)
        conditions = self._filter(request)

        with metrics.stage("gateway", "index") as index:
            found = self.indexer.query(
                self._item_query(request.item_id, k, request.search_k, request.exclude_self, request.min_score,
                                 conditions),
                timeout_s=self.settings.index_timeout_s,
                budget=self._budget(context),
            )

        return gateway_pb2.SearchByIdResponse(
            hits=found.hits,
            bundle_version=found.bundle_version,
            timings=gateway_pb2.Timings(index_ms=_ms(index.seconds), total_ms=_ms(time.perf_counter() - start)),
        )

    def SearchBatch(self, request: gateway_pb2.SearchBatchRequest, context) -> gateway_pb2.SearchBatchResponse:
        start = time.perf_counter()
        budget = Budget.for_request(self.settings.batch_timeout_s, context, "batch_timeout_s")
        count, limit = len(request.queries), self.settings.max_batch_queries
        if count == 0:
            raise InvalidRequest("the batch is empty: send at least one query (an image, a URL or an item id)")
        if count > limit:
            raise InvalidRequest(
                f"the batch has {count} queries, more than this gateway answers in one call: send at most {limit} "
                "(split it into several batches)"
            )
        k = self._k(request.k)
        conditions = self._filter(request)
        BATCH_QUERIES.observe(count)

        # What each query ended with so far: its index request, its image, or its domain error.
        outcomes: dict[int, object] = {}
        images: dict[int, bytes] = {}
        urls: dict[int, str] = {}
        for i, query in enumerate(request.queries):
            kind = query.WhichOneof("query")
            value = getattr(query, kind) if kind else None
            if not value:
                outcomes[i] = InvalidRequest(_EMPTY[kind])
            elif kind == "image":
                images[i] = value
            elif kind == "url":
                urls[i] = value
            else:
                outcomes[i] = self._item_query(value, k, request.search_k, request.exclude_self, request.min_score,
                                               conditions)

        timings = gateway_pb2.Timings()
        if urls:
            with metrics.stage("gateway", "fetch") as fetch:
                for i, fetched in self._fetch_batch(urls, budget).items():
                    if isinstance(fetched, CbirError):
                        outcomes[i] = fetched
                    else:
                        images[i] = fetched
            timings.fetch_ms = _ms(fetch.seconds)
        if images:
            with metrics.stage("gateway", "embed") as embed:
                outcomes.update(self._embed_batch(images, k, request.search_k, request.min_score, budget, conditions))
            timings.embed_ms = _ms(embed.seconds)

        window = CallWindow(self.settings.batch_index_concurrency)
        with metrics.stage("gateway", "index") as index:
            for i, outcome in sorted(outcomes.items()):
                if not isinstance(outcome, CbirError):
                    window.submit(i, lambda query=outcome: self.indexer.start_query(
                        query, timeout_s=self.settings.index_timeout_s, budget=budget))
            outcomes.update(window.drain())
        timings.index_ms = _ms(index.seconds)

        response = gateway_pb2.SearchBatchResponse(timings=timings)
        for i in range(count):
            outcome, result = outcomes[i], response.results.add()
            if isinstance(outcome, CbirError):
                result.error, result.code = str(outcome), outcome.code.name
            else:
                result.hits.extend(outcome.hits)
                response.bundle_version = response.bundle_version or outcome.bundle_version
            BATCH_RESULTS.labels(result.code or "OK").inc()
        response.timings.total_ms = _ms(time.perf_counter() - start)
        return response

    def _fetch_batch(self, urls: dict[int, str], budget: Budget) -> dict[int, bytes | CbirError]:
        """Each URL's image bytes, or the domain error that says why there are none; several downloads at once."""
        pending = {i: self._batch_downloads.submit(self.urls.fetch, url, deadline=budget.end) for i, url in urls.items()}
        fetched: dict[int, bytes | CbirError] = {}
        for i, future in pending.items():
            try:
                fetched[i] = future.result().data
            except CbirError as error:
                fetched[i] = error
        return fetched

    def _embed_batch(self, images: dict[int, bytes], k: int, search_k: int, min_score: float, budget: Budget,
                     conditions: common_pb2.Filter | None = None
                     ) -> dict[int, indexer_pb2.QueryVectorRequest | CbirError]:
        """Every image in one Embed call: each one's index query, or the domain error that says why it has none."""
        try:
            results, fingerprint = self._embed(list(images.values()), self.settings.batch_timeout_s, budget)
        except CbirError as error:  # the call as a whole: every image of it fails the same way
            return dict.fromkeys(images, error)
        queries: dict[int, indexer_pb2.QueryVectorRequest | CbirError] = {}
        for i, result in zip(images, results):
            try:
                queries[i] = self._vector_query(self.embedder.checked(result), fingerprint, k, search_k, min_score,
                                                conditions)
            except CbirError as error:
                queries[i] = error
        return queries

    def FindDuplicates(self, request, context):
        """The indexer's FindDuplicatesResponse stream (progress, groups, summary), passed through."""
        budget = Budget.for_request(self.settings.duplicates_timeout_s, context, "duplicates_timeout_s")
        yield from self.indexer.find_duplicates(request, timeout_s=self.settings.duplicates_timeout_s, budget=budget)

    def GetStatus(self, request: gateway_pb2.GetStatusRequest, context) -> gateway_pb2.GetStatusResponse:
        budget = Budget.for_request(self.settings.status_timeout_s, context, "status_timeout_s")
        response = gather_status(self.embedder, self.indexer, timeout_s=max(budget.remaining_s(), _MIN_STATUS_TIMEOUT_S))
        response.default_k = self.settings.default_k
        response.max_k = self.settings.max_k
        return response
