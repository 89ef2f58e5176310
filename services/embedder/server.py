"""The embedder process: settings -> gRPC server (NOT_SERVING) -> weights + model -> warm-up -> SERVING."""

from __future__ import annotations

import logging

from cbir.grpc_server import ServiceServer
from cbir.v1 import embedder_pb2_grpc
from services.embedder.embedder import Embedder
from services.embedder.servicer import EmbedderServicer
from services.embedder.settings import EmbedderSettings

log = logging.getLogger(__name__)

SERVICE_NAME = "cbir.v1.Embedder"


class EmbedderServer(ServiceServer):
    """Serves `cbir.v1.Embedder`. `load()` builds the model from the settings (tests pass a built one)."""

    name = "embedder"

    def __init__(self, settings: EmbedderSettings):
        super().__init__(settings)
        self.servicer = EmbedderServicer.from_settings(settings)
        self.service.add(embedder_pb2_grpc.add_EmbedderServicer_to_server, self.servicer, SERVICE_NAME)
        self.embedder: Embedder | None = None

    def load(self, embedder: Embedder | None = None) -> Embedder:
        """Build the model (or take a built one), warm it up, then go SERVING."""
        embedder = embedder or Embedder.from_settings(self.settings)
        embedder.warm_up()
        self.servicer.attach(embedder)
        self.embedder = embedder
        self.service.set_serving(True)
        log.info("embedder serving %s on port %s", embedder.info.fingerprint, self.port)
        return embedder

    def _close(self) -> None:
        self.servicer.close()


def serve(settings: EmbedderSettings) -> int:
    """Run the embedder until SIGTERM/SIGINT. The process exit status: 0, 1 (cannot start), 2 (no weights)."""
    return EmbedderServer(settings).run()
