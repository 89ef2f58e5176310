"""Gateway settings, read once from `CBIR_GATEWAY_*` environment variables (or keyword arguments)."""

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from cbir.settings import ServerSettings


class GatewaySettings(ServerSettings):
    """Where the upstreams are, how long to wait for them, and the limits on k.

    Targets are gRPC target strings: `host:port`, or `dns:///embedder:50051` to reach every
    replica behind a name (calls are spread over them with gRPC's round_robin).
    """

    model_config = SettingsConfigDict(env_prefix="CBIR_GATEWAY_", extra="forbid", validate_default=True)

    port: int = Field(50050, ge=0, le=65535, description="gRPC port")
    metrics_port: int | None = Field(9100, ge=0, le=65535, description="Prometheus /metrics port; unset = none")
    embedder_target: str = Field("127.0.0.1:50051", min_length=1, description="gRPC target of the embedder(s)")
    indexer_target: str = Field("127.0.0.1:50052", min_length=1, description="gRPC target of the indexer(s)")
    default_k: int = Field(20, ge=1, description="hits returned when a request asks for k = 0")
    max_k: int = Field(1000, ge=1, description="the most hits one request may ask for")
    embed_timeout_s: float = Field(30.0, gt=0, description="deadline of one Embed call (VGG-16 on a busy CPU)")
    index_timeout_s: float = Field(5.0, gt=0, description="deadline of one indexer query")
    status_timeout_s: float = Field(2.0, gt=0, description="deadline of each upstream check in GetStatus")

    @model_validator(mode="after")
    def _k_limits(self):
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must not exceed max_k ({self.max_k})")
        return self
