"""`GatewayClient`: the Python client of the cbir gateway (used by the CLI and the UI).

    with GatewayClient("127.0.0.1:50050") as client:
        response = client.search_image(open("cat.jpg", "rb").read(), k=10)
        for hit in response.hits:
            print(hit.score, hit.url)

Every method returns the `cbir.v1.gateway_pb2` response and raises `grpc.RpcError` (with
`.code()` and `.details()`) as gRPC does. A `dns:///name:port` target spreads calls over every
gateway replica the name resolves to.

TLS: give `tls_ca` (the CA that signed the gateway's certificate; `tls=True` alone trusts the
system's CAs), and for mutual TLS `tls_cert` + `tls_key` (PEM files).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import grpc

from cbir.v1 import gateway_pb2, gateway_pb2_grpc

# Room for a 16 MiB image plus the request around it, and for a long list of hits with metadata.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def read_pem(path: str | Path, what: str) -> bytes:
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


def open_channel(target: str, *, options: Sequence[tuple[str, object]] = (), tls: ClientTls | None = None) -> grpc.Channel:
    """A channel to `target`: plaintext when `tls` is None, else TLS (mutual TLS with a client certificate)."""
    options = list(options)
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(target, tls.credentials(), options=options)


class GatewayClient:
    """A channel to the gateway at `target`; every call waits at most `timeout_s` seconds."""

    def __init__(
        self,
        target: str,
        timeout_s: float = 60.0,
        *,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_server_name: str | None = None,
    ):
        self.target = target
        self.timeout_s = timeout_s
        self.tls = ClientTls.from_settings(tls, tls_ca, tls_cert, tls_key, tls_server_name)
        self._channel = open_channel(
            target,
            options=[
                ("grpc.service_config", _SERVICE_CONFIG),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
            tls=self.tls,
        )
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def search_image(self, image: bytes, k: int = 0, search_k: int = 0) -> gateway_pb2.SearchByImageResponse:
        """The k items most similar to an encoded image (k=0: the gateway's default)."""
        request = gateway_pb2.SearchByImageRequest(image=image, k=k, search_k=search_k)
        return self._stub.SearchByImage(request, timeout=self.timeout_s)

    def search_id(
        self, item_id: str, k: int = 0, search_k: int = 0, exclude_self: bool = False
    ) -> gateway_pb2.SearchByIdResponse:
        """The k items most similar to an indexed item, optionally leaving the item itself out."""
        request = gateway_pb2.SearchByIdRequest(item_id=item_id, k=k, search_k=search_k, exclude_self=exclude_self)
        return self._stub.SearchById(request, timeout=self.timeout_s)

    def search_url(self, url: str, k: int = 0, search_k: int = 0) -> gateway_pb2.SearchByUrlResponse:
        """The k items most similar to the image at an http(s) URL, which the gateway downloads."""
        request = gateway_pb2.SearchByUrlRequest(url=url, k=k, search_k=search_k)
        return self._stub.SearchByUrl(request, timeout=self.timeout_s)

    def status(self) -> gateway_pb2.GetStatusResponse:
        """The upstreams' health, the embedder's model, the indexer's bundle and whether they fit."""
        return self._stub.GetStatus(gateway_pb2.GetStatusRequest(), timeout=self.timeout_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GatewayClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GatewayClient({self.target!r}, timeout_s={self.timeout_s}{', tls' if self.tls else ''})"
