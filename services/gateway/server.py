"""The gateway process: settings -> gRPC server with health, reflection, metrics -> SERVING.

The gateway has nothing to load, so it reports SERVING as soon as it listens; whether its
upstreams are up is what `GetStatus` shows.
"""

from __future__ import annotations

import logging

from cbir.grpc_server import ServiceServer
from cbir.v1 import gateway_pb2_grpc
from services.gateway.servicer import SERVICE_NAME, GatewayServicer
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class GatewayServer(ServiceServer):
    """Serves `cbir.v1.Gateway` over one channel to each upstream."""

    name = "gateway"

    def __init__(self, settings: GatewaySettings, servicer: GatewayServicer | None = None):
        super().__init__(settings)
        self.servicer = servicer or GatewayServicer.from_settings(settings)
        self.service.add(gateway_pb2_grpc.add_GatewayServicer_to_server, self.servicer, SERVICE_NAME)

    def _load(self) -> None:
        self.service.set_serving(True)
        settings = self.settings
        log.info(
            "gateway: embedder at %s, indexer at %s (k default %d, max %d; timeouts embed %gs, index %gs)",
            settings.embedder_target, settings.indexer_target, settings.default_k, settings.max_k,
            settings.embed_timeout_s, settings.index_timeout_s,
        )
        log.info(
            "gateway: request budget %gs; SearchByUrl fetches %s (max %d bytes, %gs); upstreams over %s",
            settings.request_timeout_s,
            "any address" if settings.url_allow_private else "public addresses"
            + (f" and {', '.join(settings.url_allow_networks)}" if settings.url_allow_networks else ""),
            settings.url_max_bytes, settings.url_timeout_s,
            "TLS" if self.servicer.embedder.tls is not None else "plaintext",
        )

    def _close(self) -> None:
        self.servicer.close()


def serve(settings: GatewaySettings | None = None) -> int:
    """Run the gateway until SIGTERM/SIGINT. `settings` default: read from CBIR_GATEWAY_* variables."""
    return GatewayServer(settings or GatewaySettings()).run()
