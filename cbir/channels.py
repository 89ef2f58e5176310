"""One way to reach a cbir service: channel options, retry policy and TLS credentials in one place.

Every client (the gateway's upstreams, `GatewayClient`, the index build's remote embedding, the
health check) opens its channel with `open_channel`, which:

- spreads calls over every address the target resolves to with gRPC's own `round_robin`
  (`dns:///embedder:50051` reaches every replica a compose/Kubernetes name resolves to);
- retries the methods named in `retry` with gRPC's own retry policy (backoff, within the call's
  deadline, throttled while most calls fail) — never by hand;
- reconnects to a replica that comes back within seconds, not gRPC's default two minutes;
- sends keepalive pings on busy connections, so a peer that vanished is noticed;
- uses TLS (mutual TLS with a client certificate) when `tls` is given.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping, Sequence

import grpc

# Room for a 16 MiB image plus the request around it, and for a long list of hits with metadata.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def read_pem(path: str | Path, what: str) -> bytes:
    """The bytes of a PEM file; OSError in plain words when it is missing or not PEM."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as error:
        raise OSError(f"cannot read the {what} {path}: {error.strerror or error}") from None
    if b"-----BEGIN" not in data:
        raise OSError(f"the {what} {path} is not a PEM file (no -----BEGIN line)")
    return data


@dataclasses.dataclass(frozen=True)
class ClientTls:
    """How a client reaches a TLS server: the CAs it trusts (None = the system's), its own certificate
    and key for mutual TLS, and the name to expect in the server's certificate (default: the target's host)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate and its key go together: give both or neither")

    @classmethod
    def from_settings(
        cls, enabled: bool, ca=None, cert=None, key=None, server_name: str | None = None
    ) -> "ClientTls | None":
        """None (plaintext) unless `enabled` or any file is given."""
        if not (enabled or ca or cert or key):
            return None
        return cls(
            Path(ca) if ca else None, Path(cert) if cert else None, Path(key) if key else None, server_name or None
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca, "CA file") if self.ca else None,
            private_key=read_pem(self.key, "TLS client key") if self.key else None,
            certificate_chain=read_pem(self.cert, "TLS client certificate") if self.cert else None,
        )


@dataclasses.dataclass(frozen=True)
class Retry:
    """gRPC's retry policy for some methods: `methods` maps a full service name ("cbir.v1.Embedder")
    to the methods that may be sent twice without harm (they only read or compute)."""

    methods: Mapping[str, Sequence[str]]
    codes: tuple[str, ...] = ("UNAVAILABLE",)
    max_attempts: int = 3  # gRPC caps this at 5
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 0.5


def service_config(retry: Retry | None = None) -> str:
    """round_robin over every resolved address, plus the retry policy of `retry` with retry
    throttling (retries stop while more than half of the recent calls fail: a dead upstream is not
    hammered)."""
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    names = [{"service": service, "method": method}
             for service, methods in (retry.methods.items() if retry else ()) for method in methods]
    if names:
        config["methodConfig"] = [{
            "name": names,
            "retryPolicy": {
                "maxAttempts": retry.max_attempts,
                "initialBackoff": f"{retry.initial_backoff_s:g}s",
                "maxBackoff": f"{retry.max_backoff_s:g}s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": list(retry.codes),
            },
        }]
        config["retryThrottling"] = {"maxTokens": 10, "tokenRatio": 0.1}
    return json.dumps(config)


def channel_options(*, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    retry: Retry | None = None) -> list[tuple[str, object]]:
    return [
        ("grpc.service_config", service_config(retry)),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # gRPC backs off reconnecting to a replica that is down, by default up to 120 s: a replica
        # that comes back (a restart, a rolling update) would sit unused for minutes.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # Pings only while calls are in flight, no more often than the servers allow (GrpcService).
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


def open_channel(target: str, *, tls: ClientTls | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 retry: Retry | None = None) -> grpc.Channel:
    """A channel to `target` with the options above: plaintext when `tls` is None, else TLS."""
    options = channel_options(max_message_bytes=max_message_bytes, retry=retry)
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(target, tls.credentials(), options=options)
