"""The indexer process: settings -> gRPC server (NOT_SERVING) -> bundle loaded -> SERVING."""

from __future__ import annotations

import logging

from cbir.bundle.faiss_index import set_query_threads
from cbir.grpc_server import ServiceServer
from cbir.v1 import indexer_pb2_grpc

from . import metrics as indexer_metrics
from .index import IndexHolder, SearchIndex
from .loader import BundleLoader
from .servicer import SERVICE_NAME, IndexerServicer
from .settings import IndexerSettings

log = logging.getLogger(__name__)


class IndexerServer(ServiceServer):
    """Serves `cbir.v1.Indexer` over the bundle at `settings.bundle`.

    `load()` returns at once: the bundle loads in the background and health turns SERVING when it
    is loaded, checked and warmed up. Until then every RPC answers UNAVAILABLE with the reason.
    Then the loader follows the bundle root's `current` pointer and deletion list.
    """

    name = "indexer"

    def __init__(self, settings: IndexerSettings):
        super().__init__(settings)
        self.holder = IndexHolder(f"index bundle {settings.bundle} is still being opened; retry shortly")
        self.loader = BundleLoader(settings, self.holder, on_ready=self._on_ready)
        self.service.add(
            indexer_pb2_grpc.add_IndexerServicer_to_server, IndexerServicer(
                self.holder, self.loader, duplicates_workers=settings.duplicates_workers), SERVICE_NAME
        )

    def _on_ready(self, index: SearchIndex) -> None:
        self.service.set_serving(True)

    def start(self) -> int:
        indexer_metrics.clear_bundle()
        return super().start()

    def _load(self) -> None:
        self.loader.start()

    def _close(self) -> None:
        """Stop the loader and unmap the bundle."""
        self.loader.stop()
        index = self.holder.swap(None, reason="the indexer is shutting down")
        if index is not None:
            index.close()
        indexer_metrics.clear_bundle()


def serve(settings: IndexerSettings) -> int:
    """Run the indexer until SIGTERM/SIGINT (what `python -m services.indexer` and the CLI call).

    A faiss query runs on the gRPC thread that asked it, alone: requests are concurrent through the
    server's threads, and an OpenMP team per query would only oversubscribe the cores.
    """
    set_query_threads(1)
    return IndexerServer(settings).run()
