"""Is a cbir service healthy? The check behind `cbir health` and the containers' HEALTHCHECKs.

A gRPC target (`127.0.0.1:50051`, `dns:///embedder:50051`) is asked through the standard gRPC
health protocol (`grpc.health.v1.Health/Check`), so "healthy" means what the service itself says:
SERVING only once its model or bundle is loaded. An `http://` or `https://` URL (the web UI) is
healthy when it answers 200. Not a port probe: a service that listens but has nothing to serve
yet is reported unhealthy, with its status.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass(frozen=True)
class HealthResult:
    healthy: bool
    status: str  # SERVING, NOT_SERVING, SERVICE_UNKNOWN, UNREACHABLE, HTTP 200, ...
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


def check(target: str, *, service: str = "", timeout_s: float = 3.0) -> HealthResult:
    """Check `target` once: gRPC health for a gRPC target, GET for an http(s) URL."""
    if target.startswith(("http://", "https://")):
        return _check_http(target, timeout_s)
    return _check_grpc(target, service, timeout_s)


def _check_grpc(target: str, service: str, timeout_s: float) -> HealthResult:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as error:
            code = error.code()
            if code is grpc.StatusCode.NOT_FOUND:
                return HealthResult(False, "SERVICE_UNKNOWN", f"{target} does not know service {service!r}")
            return HealthResult(False, "UNREACHABLE", f"{target}: {code.name if code else 'error'}: {error.details()}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return HealthResult(response.status == health_pb2.HealthCheckResponse.SERVING, status, target)


def _check_http(url: str, timeout_s: float) -> HealthResult:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (http(s) only, checked above)
            return HealthResult(response.status == 200, f"HTTP {response.status}", url)
    except urllib.error.HTTPError as error:
        return HealthResult(False, f"HTTP {error.code}", url)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return HealthResult(False, "UNREACHABLE", f"{url}: {reason}")
