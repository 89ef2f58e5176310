"""Gateway settings, read once from `CBIR_GATEWAY_*` environment variables (or keyword arguments)."""

import ipaddress
import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

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
    max_batch_queries: int = Field(
        64, ge=1, le=256, description="the most queries one SearchBatch may carry (its images go to the embedder in "
        "one Embed call: keep this at or below the embedder's max_images_per_request, 256 by default)"
    )
    batch_index_concurrency: int = Field(
        8, ge=1, description="index queries of one SearchBatch in flight at once (the indexer refuses calls beyond "
        "its max_concurrent_rpcs, so one batch must not take them all)"
    )
    batch_timeout_s: float = Field(
        180.0, gt=0, description="deadline budget of one SearchBatch (downloads, its Embed call, index queries), and "
        "the bound of that Embed call: it embeds every image of the batch, ~N times the work of one search"
    )
    duplicates_timeout_s: float = Field(
        3600.0, gt=0, description="deadline of one FindDuplicates (a pass over every item of the collection: "
        "~10 verified items/s per indexer core, ~170 unverified)"
    )
    verify: bool = Field(
        True, description="ask the embedder for each query's local features (and its mirror's) so that the indexer "
        "verifies its best candidates geometrically (copies found first; ~50 ms of the embedder per query); "
        "without effect when the model or the bundle has none"
    )
    embed_timeout_s: float = Field(30.0, gt=0, description="deadline of one Embed call (VGG-16 on a busy CPU)")
    index_timeout_s: float = Field(5.0, gt=0, description="deadline of one indexer query")
    status_timeout_s: float = Field(2.0, gt=0, description="deadline of each upstream check in GetStatus")
    request_timeout_s: float = Field(
        60.0, gt=0, description="deadline budget of one search: download, embed and index calls together"
    )
    # SearchByUrl: the gateway downloads a stranger's URL, so it is careful where it goes (SSRF).
    url_allow_private: bool = Field(
        False, description="let SearchByUrl fetch loopback, private and link-local addresses (never on a public gateway)"
    )
    url_allow_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="networks SearchByUrl may fetch although not public, e.g. 10.1.2.0/24 "
        "(JSON list or comma-separated)"
    )
    url_max_bytes: int = Field(16 * 1024 * 1024, ge=1, description="largest image SearchByUrl downloads")
    url_timeout_s: float = Field(10.0, gt=0, description="longest time one download may take, redirects included")
    url_connect_timeout_s: float = Field(3.0, gt=0, description="longest wait for the image server to answer")
    url_max_redirects: int = Field(3, ge=0, description="redirects followed (each target checked again)")
    url_content_types: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["image/"], description="accepted Content-Type prefixes (JSON list or comma-separated)"
    )
    url_retries: int = Field(1, ge=0, description="more attempts after a download failure that may pass (5xx, timeout)")
    url_max_concurrent: int = Field(
        8, ge=1, description="downloads at once; one more is refused with RESOURCE_EXHAUSTED"
    )
    url_per_host: int = Field(2, ge=1, description="downloads at once from one host")
    # TLS to the embedder and the indexer (both, with the same CA and client certificate).
    upstream_tls: bool = Field(False, description="reach the upstreams over TLS (implied by upstream_tls_ca)")
    upstream_tls_ca: Path | None = Field(None, description="PEM CA file the upstreams' certificates are checked against")
    upstream_tls_cert: Path | None = Field(None, description="client certificate for mutual TLS with the upstreams")
    upstream_tls_key: Path | None = Field(None, description="key of upstream_tls_cert")
    upstream_tls_server_name: str | None = Field(
        None, description="name expected in the upstreams' certificates (default: the targets' host names)"
    )

    @field_validator("url_allow_networks", "url_content_types", mode="before")
    @classmethod
    def _split_list(cls, value):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("url_allow_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as error:
                raise ValueError(f"url_allow_networks: {error}") from None
        return value

    @model_validator(mode="after")
    def _upstream_tls_pair(self):
        if (self.upstream_tls_cert is None) != (self.upstream_tls_key is None):
            raise ValueError("upstream_tls_cert and upstream_tls_key go together")
        return self

    @model_validator(mode="after")
    def _k_limits(self):
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must not exceed max_k ({self.max_k})")
        return self
