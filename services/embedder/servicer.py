"""The gRPC face of the embedder: `cbir.v1.Embedder` (Embed, GetModelInfo).

Transport only: it decodes each image (a bad one fails only its own result), hands the pixels to
the dynamic batcher and packs the vectors. Errors are raised as `cbir.errors` exceptions; the
server's interceptor turns them into statuses. Until `attach()` gives it a loaded model, every
call answers UNAVAILABLE.
"""

from __future__ import annotations

import logging

import numpy as np
import prometheus_client

from cbir.errors import BadImage, InvalidRequest, NotReady
from cbir.vectors import to_proto
from cbir.v1 import embedder_pb2, embedder_pb2_grpc
from services.embedder.batcher import Batcher
from services.embedder.embedder import Embedder

log = logging.getLogger(__name__)

MODEL_INFO = prometheus_client.Info("cbir_embedder_model", "The model this embedder serves (its cbir.v1.ModelInfo).")
_INFO_FIELDS = ("name", "feature", "dimension", "weights_source", "weights_fingerprint",
                "preprocessing", "pooling", "fingerprint", "local_features")


class EmbedderServicer(embedder_pb2_grpc.EmbedderServicer):
    def __init__(self, *, max_images_per_request: int = 256, batch_timeout_ms: float = 5.0):
        self._max_images = max_images_per_request
        self._batch_timeout_s = batch_timeout_ms / 1000.0
        self._embedder: Embedder | None = None
        self._batcher: Batcher | None = None

    @classmethod
    def from_settings(cls, settings) -> EmbedderServicer:
        return cls(max_images_per_request=settings.max_images_per_request, batch_timeout_ms=settings.batch_timeout_ms)

    def attach(self, embedder: Embedder) -> None:
        """Start answering with this loaded (and warmed-up) embedder."""
        # A descriptor model's batches always make region vectors too (a few poolings of maps it has anyway):
        # requests that ask for them and requests that do not share one model call.
        run = (lambda pixels: embedder.embed_pixels(pixels, regions=True)) if embedder.has_regions \
            else embedder.embed_pixels
        self._batcher = Batcher(run, max_batch=embedder.max_batch, timeout_s=self._batch_timeout_s)
        self._embedder = embedder
        MODEL_INFO.info({name: str(getattr(embedder.info, name)) for name in _INFO_FIELDS})

    def close(self) -> None:
        """Finish the batches in flight and stop the batcher (after the gRPC server has stopped)."""
        if self._batcher is not None:
            self._batcher.close()

    def _ready(self) -> tuple[Embedder, Batcher]:
        embedder, batcher = self._embedder, self._batcher
        if embedder is None or batcher is None:
            raise NotReady("the embedder is still loading its model; retry shortly")
        return embedder, batcher

    def Embed(self, request: embedder_pb2.EmbedRequest, context) -> embedder_pb2.EmbedResponse:
        embedder, batcher = self._ready()
        count = len(request.images)
        if count == 0:
            raise InvalidRequest("EmbedRequest has no images: send at least one")
        if count > self._max_images:
            raise InvalidRequest(
                f"EmbedRequest has {count} images, more than the limit of {self._max_images}; split it"
            )
        results = [embedder_pb2.EmbedResult() for _ in range(count)]
        good: list[int] = []
        pixels: list[np.ndarray] = []
        vectors = []
        local = request.local_features and embedder.has_local_features
        with batcher.arriving() as arrival:  # a batch being gathered waits for this request's images
            for index, data in enumerate(request.images):
                try:
                    pixels.append(embedder.decode(data))
                    good.append(index)
                except BadImage as error:
                    results[index].error = str(error)
                    log.debug("image %d of %d refused: %s", index, count, error)
                    continue
                if local:
                    found = embedder.local_features(pixels[-1], query=request.mirrored)
                    results[index].local_features = found[0]
                    if request.mirrored:
                        results[index].local_features_mirrored = found[1]
            if pixels:
                vectors = batcher.embed(pixels if embedder.keep_aspect else np.stack(pixels), arrival=arrival)
        for index, rows in zip(good, vectors):
            results[index].vector.CopyFrom(to_proto(rows[0] if rows.ndim == 2 else rows))
            if request.regions and rows.ndim == 2:
                results[index].regions.extend(to_proto(row) for row in rows[1:])
        return embedder_pb2.EmbedResponse(results=results, model_fingerprint=embedder.info.fingerprint)

    def GetModelInfo(self, request, context) -> embedder_pb2.GetModelInfoResponse:
        embedder, _ = self._ready()
        return embedder_pb2.GetModelInfoResponse(model=embedder.info)
