"""Start the gateway: settings -> logging -> gRPC server with health, reflection, metrics -> SERVING.

The gateway has nothing to load, so it reports SERVING as soon as it listens; whether its
upstreams are up is what `GetStatus` shows.
"""

from __future__ import annotations

import logging

from cbir.grpc_server import GrpcService
from cbir.logs import setup_logging
from cbir.v1 import gateway_pb2_grpc
from services.gateway.servicer import SERVICE_NAME, GatewayServicer
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class RunningGateway:
    """A started gateway: its gRPC service (`.port`, `.metrics_port`) and its servicer."""

    def __init__(self, service: GrpcService, servicer: GatewayServicer):
        self.service = service
        self.servicer = servicer

    @property
    def port(self) -> int:
        return self.service.port

    @property
    def metrics_port(self) -> int | None:
        return self.service.metrics_port

    def wait(self) -> None:
        """Block until SIGTERM/SIGINT, then stop gracefully (main thread only)."""
        try:
            self.service.wait()
        finally:
            self.servicer.close()

    def stop(self, grace: float | None = None) -> None:
        self.service.stop(grace)
        self.servicer.close()


def start(settings: GatewaySettings) -> RunningGateway:
    """Listen on `settings.host:settings.port` (0 = any free port) and report SERVING."""
    servicer = GatewayServicer.from_settings(settings)
    service = GrpcService("gateway", **settings.grpc_service_kwargs())
    service.add(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, SERVICE_NAME)
    try:
        service.start()
    except BaseException:
        servicer.close()
        raise
    service.set_serving(True)
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
        "TLS" if servicer.embedder.tls is not None else "plaintext",
    )
    return RunningGateway(service, servicer)


def serve(settings: GatewaySettings | None = None) -> None:
    """Run the gateway until SIGTERM/SIGINT. `settings` default: read from CBIR_GATEWAY_* variables."""
    settings = settings or GatewaySettings()
    setup_logging(settings.log_level)
    start(settings).wait()
