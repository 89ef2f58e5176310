"""The embedder's start-up sequence, shared by `python -m services.embedder`, the CLI and the tests.

settings -> logging -> gRPC server started (health NOT_SERVING) -> weights + model -> warm-up ->
health SERVING -> wait for SIGTERM/SIGINT -> graceful stop.
"""

from __future__ import annotations

import logging

from cbir.errors import WeightsError
from cbir.grpc_server import GrpcService
from cbir.logs import setup_logging
from cbir.v1 import embedder_pb2_grpc
from services.embedder.embedder import Embedder
from services.embedder.servicer import EmbedderServicer
from services.embedder.settings import EmbedderSettings

log = logging.getLogger(__name__)

SERVICE_NAME = "cbir.v1.Embedder"


class EmbedderServer:
    """A `GrpcService` with the embedder servicer; `start()` then `load()`, `stop()` at the end."""

    def __init__(self, settings: EmbedderSettings):
        self.settings = settings
        self.service = GrpcService("embedder", **settings.grpc_service_kwargs())
        self.servicer = EmbedderServicer.from_settings(settings)
        self.service.add(embedder_pb2_grpc.add_EmbedderServicer_to_server, self.servicer, SERVICE_NAME)
        self.embedder: Embedder | None = None

    @property
    def port(self) -> int | None:
        return self.service.port

    def start(self) -> int:
        """Listen (health NOT_SERVING, RPCs answer UNAVAILABLE) and return the gRPC port."""
        return self.service.start()

    def load(self, embedder: Embedder | None = None) -> Embedder:
        """Build the model from the settings (or take a built one), warm it up, then go SERVING."""
        embedder = embedder or Embedder.from_settings(self.settings)
        embedder.warm_up()
        self.servicer.attach(embedder)
        self.embedder = embedder
        self.service.set_serving(True)
        log.info("embedder serving %s on port %s", embedder.info.fingerprint, self.port)
        return embedder

    def stop(self, grace: float | None = None) -> None:
        self.service.stop(grace)
        self.servicer.close()


def serve(settings: EmbedderSettings) -> int:
    """Run the embedder until SIGTERM/SIGINT. Returns the process exit status (non-zero: no model)."""
    setup_logging(settings.log_level)
    server = EmbedderServer(settings)
    try:
        server.start()
    except OSError as error:
        log.error("cannot start the embedder: %s", error)
        return 1
    try:
        server.load()
    except WeightsError as error:
        log.error("cannot start the embedder: %s", error)
        server.stop(0)
        return 2
    except Exception:
        log.exception("cannot start the embedder: loading the model failed")
        server.stop(0)
        return 1
    try:
        server.service.wait()
    finally:
        server.servicer.close()
    return 0
