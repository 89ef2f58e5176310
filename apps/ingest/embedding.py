"""Where the build's vectors come from: VGG-16 in this process, or the embedder service.

Both do the same two steps: `prepare` (runs in worker threads, in parallel: decode for the local
model, nothing for the service, which decodes itself) and `embed` (one batch).
"""

from __future__ import annotations

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


class LocalEmbedding:
    """VGG-16 in this process (the embedder service's own code)."""

    parallel_batches = 1  # one model; decoding overlaps with it in the prepare threads

    def __init__(self, embedder):
        self._embedder = embedder
        self.info: common_pb2.ModelInfo = embedder.info

    def prepare(self, data: bytes) -> np.ndarray:
        return self._embedder.decode(data)

    def embed(self, prepared: list[np.ndarray]) -> list[np.ndarray | str]:
        return list(self._embedder.embed_pixels(prepared if self._embedder.keep_aspect else np.stack(prepared)))


class RemoteEmbedding:
    """The embedder service; several batches in flight reach every replica (round_robin)."""

    def __init__(self, target: str, *, parallel_batches: int = 4, timeout_s: float = 120.0,
                 tls: ClientTls | None = None):
        self.parallel_batches = parallel_batches
        self._timeout_s = timeout_s
        self._channel = open_channel(target, tls=tls, max_message_bytes=256 * 1024 * 1024, retry=BUILD_RETRY)
        self._stub = embedder_pb2_grpc.EmbedderStub(self._channel)
        self.info = self._call(self._stub.GetModelInfo, embedder_pb2.GetModelInfoRequest()).model

    def prepare(self, data: bytes) -> bytes:
        if not data:
            raise BadImage("empty file")
        return data

    def embed(self, prepared: list[bytes]) -> list[np.ndarray | str]:
        response = self._call(self._stub.Embed, embedder_pb2.EmbedRequest(images=prepared))
        if response.model_fingerprint != self.info.fingerprint:
            raise RuntimeError(
                f"the embedder's model changed during the build ({self.info.fingerprint} -> "
                f"{response.model_fingerprint}); start the build again"
            )
        return [result.error or vectors.from_proto(result.vector) for result in response.results]

    def _call(self, method, request):
        """One call; retries are gRPC's (BUILD_RETRY). wait_for_ready: a replica starting up is waited for."""
        try:
            return method(request, timeout=self._timeout_s, wait_for_ready=True)
        except grpc.RpcError as error:
            raise RuntimeError(f"embedder service failed: {error.code().name}: {error.details()}") from None

    def close(self) -> None:
        self._channel.close()
