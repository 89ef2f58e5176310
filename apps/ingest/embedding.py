"""Where the build's vectors come from: VGG-16 in this process, or the embedder service.

Both do the same two steps: `prepare` (runs in worker threads, in parallel: decode and local
features for the local model, nothing for the service, which does both itself) and `embed` (one
batch), which gives each image an `Embedded` (its vector, and its local features when the model
has them: `info.local_features`) or the reason it was refused.
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
    local_mirrored: bytes = b""  # of the mirror image, when the embedding was made with mirrored=True


class LocalEmbedding:
    """VGG-16 in this process (the embedder service's own code)."""

    parallel_batches = 1  # one model; decoding overlaps with it in the prepare threads

    def __init__(self, embedder, mirrored: bool = False):
        """`mirrored`: also the local features of each image's mirror (what a query sends; the evaluation)."""
        self._embedder = embedder
        self._mirrored = mirrored
        self.info: common_pb2.ModelInfo = embedder.info

    def prepare(self, data: bytes) -> tuple[np.ndarray, list[bytes]]:
        pixels = self._embedder.decode(data)
        return pixels, self._embedder.local_features(pixels, mirrored=self._mirrored)

    def embed(self, prepared: list[tuple[np.ndarray, list[bytes]]]) -> list[Embedded | str]:
        pixels = [p for p, _ in prepared]
        vectors = self._embedder.embed_pixels(pixels if self._embedder.keep_aspect else np.stack(pixels))
        return [Embedded(vector, *local) for vector, (_, local) in zip(vectors, prepared)]


class RemoteEmbedding:
    """The embedder service; several batches in flight reach every replica (round_robin)."""

    def __init__(self, target: str, *, parallel_batches: int = 4, timeout_s: float = 300.0,
                 tls: ClientTls | None = None, mirrored: bool = False):
        self.parallel_batches = parallel_batches
        self._mirrored = mirrored
        self._timeout_s = timeout_s
        self._channel = open_channel(target, tls=tls, max_message_bytes=256 * 1024 * 1024, retry=BUILD_RETRY)
        self._stub = embedder_pb2_grpc.EmbedderStub(self._channel)
        self.info = self._call(self._stub.GetModelInfo, embedder_pb2.GetModelInfoRequest()).model

    def prepare(self, data: bytes) -> bytes:
        if not data:
            raise BadImage("empty file")
        return data

    def embed(self, prepared: list[bytes]) -> list[Embedded | str]:
        local = bool(self.info.local_features)
        request = embedder_pb2.EmbedRequest(images=prepared, local_features=local, mirrored=local and self._mirrored)
        response = self._call(self._stub.Embed, request)
        if response.model_fingerprint != self.info.fingerprint:
            raise RuntimeError(
                f"the embedder's model changed during the build ({self.info.fingerprint} -> "
                f"{response.model_fingerprint}); start the build again"
            )
        return [result.error or Embedded(vectors.from_proto(result.vector), result.local_features,
                                         result.local_features_mirrored) for result in response.results]

    def _call(self, method, request):
        """One call; retries are gRPC's (BUILD_RETRY). wait_for_ready: a replica starting up is waited for."""
        try:
            return method(request, timeout=self._timeout_s, wait_for_ready=True)
        except grpc.RpcError as error:
            raise RuntimeError(f"embedder service failed: {error.code().name}: {error.details()}") from None

    def close(self) -> None:
        self._channel.close()
