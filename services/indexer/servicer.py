"""`cbir.v1.Indexer` over gRPC: translates messages to `SearchIndex` calls and back.

Errors are raised as `cbir.errors` domain exceptions; `cbir.grpc_server.ErrorInterceptor` turns
them into status codes (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, UNAVAILABLE).
"""

from __future__ import annotations

from cbir import filters, vectors
from cbir.errors import InvalidRequest, NotReady
from cbir.local_features import BadLocalFeatures, LocalFeatures, from_bytes
from cbir.v1 import common_pb2, indexer_pb2, indexer_pb2_grpc

from . import duplicates_rpc
from .index import IndexHolder, SearchHit
from .loader import BundleLoader

SERVICE_NAME = "cbir.v1.Indexer"


def _hit(hit: SearchHit) -> common_pb2.Hit:
    return common_pb2.Hit(
        item_id=hit.item_id, url=hit.url, distance=hit.distance, score=hit.score, metadata=hit.metadata,
        inliers=hit.inliers, match=hit.match,
    )


def _local(request: indexer_pb2.QueryVectorRequest) -> list[LocalFeatures]:
    """The query's local features (and its mirror's), as sent; InvalidRequest when they cannot be read."""
    try:
        return [from_bytes(blob) for blob in (request.local_features, request.local_features_mirrored) if blob]
    except BadLocalFeatures as error:
        raise InvalidRequest(f"the query's local features cannot be read: {error}") from None


class IndexerServicer(indexer_pb2_grpc.IndexerServicer):
    def __init__(self, holder: IndexHolder, loader: BundleLoader | None = None, *, duplicates_workers: int = 1):
        self.holder = holder
        self.loader = loader
        self.duplicates_workers = duplicates_workers

    def QueryVector(self, request: indexer_pb2.QueryVectorRequest, context) -> indexer_pb2.QueryVectorResponse:
        with self.holder.lease() as index:
            index.check_fingerprint(request.model_fingerprint)  # a different model explains a wrong dimension
            vector = vectors.from_proto(request.vector, index.input_dimension)
            regions = [vectors.from_proto(region, index.input_dimension) for region in request.regions]
            hits = index.query_vector(vector, k=request.k, search_k=request.search_k, local=_local(request),
                                      min_score=request.min_score, regions=regions,
                                      conditions=filters.from_proto(request.filter))
            return indexer_pb2.QueryVectorResponse(hits=[_hit(h) for h in hits], bundle_version=index.version)

    def QueryItem(self, request: indexer_pb2.QueryItemRequest, context) -> indexer_pb2.QueryItemResponse:
        with self.holder.lease() as index:
            hits = index.query_item(
                request.item_id, k=request.k, search_k=request.search_k, exclude_self=request.exclude_self,
                min_score=request.min_score, conditions=filters.from_proto(request.filter),
            )
            return indexer_pb2.QueryItemResponse(hits=[_hit(h) for h in hits], bundle_version=index.version)

    def GetItems(self, request: indexer_pb2.GetItemsRequest, context) -> indexer_pb2.GetItemsResponse:
        with self.holder.lease() as index:
            records = index.get_items(list(request.item_ids))
            return indexer_pb2.GetItemsResponse(
                items=[common_pb2.Item(item_id=r.item_id, url=r.url, metadata=r.metadata) for r in records]
            )

    def GetIndexInfo(self, request: indexer_pb2.GetIndexInfoRequest, context) -> indexer_pb2.GetIndexInfoResponse:
        with self.holder.lease() as index:
            return indexer_pb2.GetIndexInfoResponse(
                index=index.info(), deleted_items=index.deleted_count, deleted_list=str(index.bundle.deleted_list)
            )

    def ReloadBundle(self, request: indexer_pb2.ReloadBundleRequest, context) -> indexer_pb2.ReloadBundleResponse:
        if self.loader is None:
            raise NotReady("this indexer cannot reload bundles (no loader attached)")
        result = self.loader.reload(request.version, allow_model_change=request.allow_model_change)
        return indexer_pb2.ReloadBundleResponse(
            reloaded=result.reloaded, bundle_version=result.version, previous_version=result.previous_version,
            item_count=result.item_count, deleted_items=result.deleted_items, seconds=result.seconds,
        )

    def FindDuplicates(self, request, context):
        """A stream of FindDuplicatesResponse (services.indexer.duplicates_rpc)."""
        rule = duplicates_rpc.rule_of(request)
        with self.holder.lease() as index:
            yield from duplicates_rpc.find_duplicates(index, rule, request, context, workers=self.duplicates_workers)
