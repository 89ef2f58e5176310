"""Where the build's vectors come from: VGG-16 in this process, or the embedder service.

Both do the same two steps: `prepare` (runs in worker threads, in parallel: decode and local
features for the local model, nothing for the service, which does both itself) and `embed` (one
batch), which gives each image an `Embedded` (its vector, and its local features when the model
has them: `info.local_features`) or the reason it was refused. Made `queries=True` (the evaluation,
where any image may be a query), each also carries what a query sends the indexer: its query-side
local features (more keypoints, and its mirror image's) and its region vectors.
"""

from __future__ import annotations

from typing import NamedTuple

import grpc
import numpy as np

from cbir import vectors
from cbir.errors import BadImage
from cbir.channels import ClientTls, Retry, open_channel
from cbir.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc

EMBEDDER_SERVICE = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name  # "cbir.v1.Embedder"
# A replica restarting (UNAVAILABLE) or busy (RESOURCE_EXHAUSTED at its concurrency limit): gRPC
# sends the batch again after a backoff, to the next replica. Embedding only computes: safe to repeat.
BUILD_RETRY = Retry({EMBEDDER_SERVICE: ("Embed", "GetModelInfo")}, codes=("UNAVAILABLE", "RESOURCE_EXHAUSTED"),
                    max_attempts=5, initial_backoff_s=0.5, max_backoff_s=4.0)


class Embedded(NamedTuple):
    vector: np.ndarray
    local: bytes = b""  # cbir.local_features bytes; b"" when the model has none
    query_local: tuple[bytes, ...] = ()  # as a query sends them (and its mirror's), when made with queries=True
    regions: np.ndarray | None = None  # (R, D) region vectors, when made with queries=True and the model has them


class LocalEmbedding:
    """VGG-16 in this process (the embedder service's own code)."""

    parallel_batches = 1  # one model; decoding overlaps with it in the prepare threads

    def __init__(self, embedder, queries: bool = False):
        """`queries`: also each image's mirror's local features and region vectors (what a query sends)."""
        self._embedder = embedder
        self._queries = queries
        self.info: common_pb2.ModelInfo = embedder.info
        self.gives_regions = queries and embedder.has_regions
        self.gives_query_local = queries and embedder.has_local_features

    def prepare(self, data: bytes) -> tuple[np.ndarray, list[bytes], list[bytes]]:
        pixels = self._embedder.decode(data)
        query = self._embedder.local_features(pixels, query=True) if self._queries else []
        return pixels, self._embedder.local_features(pixels), query

    def embed(self, prepared: list[tuple[np.ndarray, list[bytes], list[bytes]]]) -> list[Embedded | str]:
        pixels = [p for p, _, _ in prepared]
        if self._queries and self._embedder.has_regions:
            rows = self._embedder.embed_pixels(pixels, regions=True)
            return [Embedded(row[0], *local, query_local=tuple(query), regions=row[1:])
                    for row, (_, local, query) in zip(rows, prepared)]
        vectors = self._embedder.embed_pixels(pixels if self._embedder.keep_aspect else np.stack(pixels))
        return [Embedded(vector, *local, query_local=tuple(query)) for vector, (_, local, query) in zip(vectors, prepared)]


class RemoteEmbedding:
    """The embedder service; several batches in flight reach every replica (round_robin)."""

    def __init__(self, target: str, *, parallel_batches: int = 4, timeout_s: float = 300.0,
                 tls: ClientTls | None = None, queries: bool = False):
        self.parallel_batches = parallel_batches
        self._queries = queries
        self._timeout_s = timeout_s
        self._channel = open_channel(target, tls=tls, max_message_bytes=256 * 1024 * 1024, retry=BUILD_RETRY)
        self._stub = embedder_pb2_grpc.EmbedderStub(self._channel)
        self.info = self._call(self._stub.GetModelInfo, embedder_pb2.GetModelInfoRequest()).model
        self.gives_regions = queries and ";source=" in self.info.pooling  # a descriptor model (`descriptor_name`)
        self.gives_query_local = queries and bool(self.info.local_features)

    def prepare(self, data: bytes) -> bytes:
        if not data:
            raise BadImage("empty file")
        return data

    def embed(self, prepared: list[bytes]) -> list[Embedded | str]:
        local = bool(self.info.local_features)
        if not self._queries:
            return [result.error or Embedded(vectors.from_proto(result.vector), result.local_features)
                    for result in self._embed(prepared, local_features=local)]
        # A query's local features (mirrored=True) are not what a bundle stores: with local features the
        # images go twice, once as items and once as queries.
        queries = self._embed(prepared, local_features=local, mirrored=local, regions=True)
        items = self._embed(prepared, local_features=True) if local else queries
        return [query.error or item.error or Embedded(
                    vectors.from_proto(query.vector), item.local_features if local else b"",
                    (query.local_features, query.local_features_mirrored) if local else (), _regions(query))
                for query, item in zip(queries, items)]

    def _embed(self, images: list[bytes], **options) -> list[embedder_pb2.EmbedResult]:
        response = self._call(self._stub.Embed, embedder_pb2.EmbedRequest(images=images, **options))
        if response.model_fingerprint != self.info.fingerprint:
            raise RuntimeError(
                f"the embedder's model changed during the build ({self.info.fingerprint} -> "
                f"{response.model_fingerprint}); start the build again"
            )
        return list(response.results)

    def _call(self, method, request):
        """One call; retries are gRPC's (BUILD_RETRY). wait_for_ready: a replica starting up is waited for."""
        try:
            return method(request, timeout=self._timeout_s, wait_for_ready=True)
        except grpc.RpcError as error:
            raise RuntimeError(f"embedder service failed: {error.code().name}: {error.details()}") from None

    def close(self) -> None:
        self._channel.close()


def _regions(result: embedder_pb2.EmbedResult) -> np.ndarray | None:
    return np.stack([vectors.from_proto(region) for region in result.regions]) if result.regions else None
