"""Typed settings read once from the environment, one prefix per service.

Each service subclasses `ServerSettings` with its own prefix (e.g. `CBIR_INDEXER_`) and its own
fields; the CLI passes flags as keyword arguments, which win over the environment. Nothing else
reads `os.environ`.
"""

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    """What every gRPC server needs. Defaults run the local demo on loopback."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: int = Field(0, ge=0, le=65535, description="gRPC port")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port; unset = none")
    max_workers: int = Field(16, ge=1, description="gRPC handler threads")
    max_concurrent_rpcs: int | None = Field(
        64, ge=1, description="RPCs handled or queued at once; beyond it RESOURCE_EXHAUSTED"
    )
    max_message_mb: float = Field(16.0, gt=0, description="largest gRPC message accepted, MiB")
    grace_seconds: float = Field(5.0, ge=0, description="time given to RPCs in flight on shutdown")
    max_connection_age_s: float | None = Field(
        None, gt=0, description="close each client connection after this long (gracefully): clients "
        "reconnect and resolve dns:/// targets again, so replicas added later get traffic; unset = never"
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    tls_cert: Path | None = Field(
        None, description="PEM certificate (chain) of this server; set with tls_key: serve TLS only"
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA certificates; set = mutual TLS: clients must present a certificate signed by one"
    )

    @model_validator(mode="after")
    def _tls_files(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both (TLS) or neither (plaintext)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key: the server must serve TLS")
        return self

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)

    def grpc_service_kwargs(self) -> dict:
        """Keyword arguments for `cbir.grpc_server.GrpcService`."""
        return dict(
            host=self.host,
            port=self.port,
            metrics_port=self.metrics_port,
            max_workers=self.max_workers,
            max_concurrent_rpcs=self.max_concurrent_rpcs,
            max_message_bytes=self.max_message_bytes,
            grace_seconds=self.grace_seconds,
            max_connection_age_s=self.max_connection_age_s,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            tls_client_ca=self.tls_client_ca,
        )
