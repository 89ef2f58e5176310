"""Is a cbir service healthy? The check behind `cbir health`, the containers' HEALTHCHECKs, the
demo, the tests and the benchmarks (`wait_until_serving`).

A gRPC target (`127.0.0.1:50051`, `dns:///embedder:50051`) is asked through the standard gRPC
health protocol (`grpc.health.v1.Health/Check`), so "healthy" means what the service itself says:
SERVING only once its model or bundle is loaded. An `http://` or `https://` URL (the web UI) is
healthy when it answers 200. Not a port probe: a service that listens but has nothing to serve
yet is reported unhealthy, with its status.
"""

from __future__ import annotations

import contextlib
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

from cbir.channels import ClientTls, open_channel


@dataclass(frozen=True)
class HealthResult:
    healthy: bool
    status: str  # SERVING, NOT_SERVING, SERVICE_UNKNOWN, UNREACHABLE, HTTP 200, ...
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


def check(target: str, *, service: str = "", timeout_s: float = 3.0, tls: ClientTls | None = None) -> HealthResult:
    """Check `target` once: gRPC health for a gRPC target (over TLS when `tls` is given), GET for an
    http(s) URL."""
    if target.startswith(("http://", "https://")):
        return _check_http(target, timeout_s)
    return _check_grpc(target, service, timeout_s, tls)


class NotServing(TimeoutError):
    """A service did not report SERVING in time (or its process ended first)."""


def wait_until_serving(target: str, *, timeout_s: float = 60.0, tls: ClientTls | None = None, service: str = "",
                       still_starting: Callable[[], bool] = lambda: True, interval_s: float = 0.1) -> float:
    """Poll `target` until it reports SERVING; the seconds it took. NotServing, with the last status,
    after `timeout_s`, or as soon as `still_starting()` turns False (e.g. the server's process ended)."""
    start = time.monotonic()
    result = HealthResult(False, "UNREACHABLE", target)
    is_url = target.startswith(("http://", "https://"))
    with contextlib.nullcontext() if is_url else open_channel(target, tls=tls) as channel:  # one channel for every poll
        while time.monotonic() - start < timeout_s:
            per_check_s = min(2.0, timeout_s)
            result = _check_http(target, per_check_s) if is_url else _ask(channel, target, service, per_check_s)
            if result.healthy:
                return time.monotonic() - start
            if not still_starting():
                raise NotServing(f"{target} stopped before it was SERVING (last status {result})")
            time.sleep(interval_s)
    raise NotServing(f"{target} was not SERVING after {timeout_s:g} s (last status {result})")


def _check_grpc(target: str, service: str, timeout_s: float, tls: ClientTls | None) -> HealthResult:
    with open_channel(target, tls=tls) as channel:
        return _ask(channel, target, service, timeout_s)


def _ask(channel, target: str, service: str, timeout_s: float) -> HealthResult:
    """One grpc.health.v1 Check over `channel`."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=timeout_s)
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
