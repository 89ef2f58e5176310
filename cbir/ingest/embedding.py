"""Where the build's vectors come from: VGG-16 in this process, or the embedder service.

Both do the same two steps: `prepare` (runs in worker threads, in parallel: decode for the local
model, nothing for the service, which decodes itself) and `embed` (one batch).
"""

from __future__ import annotations

import time

import grpc
import numpy as np

from cbir import vectors
from cbir.errors import BadImage
from cbir.client import ClientTls, open_channel
from cbir.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc


class LocalEmbedding:
    """VGG-16 in this process (the embedder service's own code)."""

    parallel_batches = 1  # one model; decoding overlaps with it in the prepare threads

    def __init__(self, embedder, *, max_pixels: int):
        self._embedder = embedder
        self._max_pixels = max_pixels
        self.info: common_pb2.ModelInfo = embedder.info

    def prepare(self, data: bytes) -> np.ndarray:
        from services.embedder.images import load_image

        return load_image(data, max_pixels=self._max_pixels)

    def embed(self, prepared: list[np.ndarray]) -> list[np.ndarray | str]:
        return list(self._embedder.embed_pixels(np.stack(prepared)))


class RemoteEmbedding:
    """The embedder service; several batches in flight reach every replica (round_robin)."""

    def __init__(self, target: str, *, parallel_batches: int = 4, timeout_s: float = 120.0, retries: int = 3,
                 tls: ClientTls | None = None):
        self.parallel_batches = parallel_batches
        self._timeout_s = timeout_s
        self._retries = retries
        self._channel = open_channel(
            target,
            tls=tls,
            options=[
                ("grpc.service_config", '{"loadBalancingConfig": [{"round_robin": {}}]}'),
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ],
        )
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
        """Retry whole-call failures that are worth retrying (a replica restarting)."""
        for attempt in range(self._retries + 1):
            try:
                return method(request, timeout=self._timeout_s, wait_for_ready=True)
            except grpc.RpcError as error:
                retriable = error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
                if not retriable or attempt == self._retries:
                    raise RuntimeError(f"embedder service failed: {error.code().name}: {error.details()}") from None
                time.sleep(0.5 * 2**attempt)

    def close(self) -> None:
        self._channel.close()
