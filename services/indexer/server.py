"""The indexer process: settings -> gRPC server (NOT_SERVING) -> bundle loaded -> SERVING."""

from __future__ import annotations

import logging

from cbir.grpc_server import GrpcService
from cbir.logs import setup_logging
from cbir.v1 import indexer_pb2_grpc

from . import metrics as indexer_metrics
from .index import IndexHolder, SearchIndex
from .loader import BundleLoader
from .servicer import SERVICE_NAME, IndexerServicer
from .settings import IndexerSettings

log = logging.getLogger(__name__)


class IndexerServer:
    """A GrpcService serving `cbir.v1.Indexer` over the bundle at `settings.bundle`.

    `start()` returns as soon as the port is bound; the bundle loads in the background and health
    turns SERVING when it is loaded, checked and warmed up. Until then every RPC answers UNAVAILABLE
    with the reason. Then the loader follows the bundle root's `current` pointer and deletion list.
    """

    def __init__(self, settings: IndexerSettings):
        self.settings = settings
        self.holder = IndexHolder(f"index bundle {settings.bundle} is still being opened; retry shortly")
        self.service = GrpcService("indexer", **settings.grpc_service_kwargs())
        self.loader = BundleLoader(settings, self.holder, on_ready=self._on_ready)
        self.service.add(
            indexer_pb2_grpc.add_IndexerServicer_to_server, IndexerServicer(self.holder, self.loader), SERVICE_NAME
        )

    def _on_ready(self, index: SearchIndex) -> None:
        self.service.set_serving(True)

    @property
    def port(self) -> int | None:
        return self.service.port

    def start(self) -> int:
        indexer_metrics.clear_bundle()
        port = self.service.start()
        self.loader.start()
        return port

    def stop(self, grace: float | None = None) -> None:
        """Stop answering (gracefully), stop the loader, unmap the bundle."""
        self.service.stop(grace)
        self.loader.stop()
        index = self.holder.swap(None, reason="the indexer is shutting down")
        if index is not None:
            index.close()
        indexer_metrics.clear_bundle()

    def wait(self) -> None:
        """Block until SIGTERM/SIGINT, then stop gracefully."""
        try:
            self.service.wait()
        finally:
            self.stop()


def serve(settings: IndexerSettings) -> None:
    """Run the indexer until SIGTERM/SIGINT (what `python -m services.indexer` and the CLI call)."""
    setup_logging(settings.log_level)
    server = IndexerServer(settings)
    server.start()
    server.wait()
