"""The scaffolding every cbir gRPC server shares, and their one lifecycle.

`ServiceServer` is the shape of every service: `start()` listens (health NOT_SERVING) ->
`load()` loads the model or bundle and turns SERVING -> `stop()`; `run()` does all of it until
SIGTERM/SIGINT and is what `python -m services.<name>`, `cbir serve` and the demo run; tests and
benchmarks call `start_serving()`. `GrpcService` underneath is the gRPC server itself: health,
reflection, a metrics port, and interceptors that time every RPC and turn domain errors into
gRPC statuses in one place.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cbir import metrics
from cbir.channels import read_pem
from cbir.errors import CbirError, SetupError, WeightsError
from cbir.logs import setup_logging

log = logging.getLogger(__name__)


def _split_method(full_method: str) -> tuple[str, str]:
    # "/cbir.v1.Indexer/QueryVector" -> ("cbir.v1.Indexer", "QueryVector")
    _, service, method = full_method.split("/", 2)
    return service, method


def _wrap(handler: grpc.RpcMethodHandler, service: str, wrap_unary: Callable, wrap_stream: Callable
          ) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour wrapped: unary RPCs, and the server-streaming ones of cbir's own services
    (FindDuplicates). grpc.health.v1 Watch, a stream as long as its watcher, passes through untouched."""
    if handler is None:
        return handler
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=wrap_unary(handler.unary_unary))
    if handler.unary_stream is not None and service.startswith("cbir."):
        return handler._replace(unary_stream=wrap_stream(handler.unary_stream))
    return handler


@contextlib.contextmanager
def _observed(service: str, method: str, context) -> Iterator[None]:
    """Counts and times one RPC (a stream: until its last message) by its final status code."""
    metrics.RPC_STARTED.labels(service, method).inc()
    in_flight = metrics.RPC_IN_FLIGHT.labels(service, method)
    in_flight.inc()
    start = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        yield
    except GeneratorExit:  # a stream left unread: its caller went away
        code = grpc.StatusCode.CANCELLED
        raise
    except BaseException:
        code = context.code() or grpc.StatusCode.UNKNOWN
        raise
    finally:
        if code is grpc.StatusCode.OK and context.code() is not None:
            code = context.code()
        in_flight.dec()
        metrics.RPC_SECONDS.labels(service, method).observe(time.perf_counter() - start)
        metrics.RPC_HANDLED.labels(service, method, code.name).inc()


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC, by method and final status code."""

    def intercept_service(self, continuation, handler_call_details):
        service, method = _split_method(handler_call_details.method)

        def wrap(behavior):
            def observed(request, context):
                with _observed(service, method, context):
                    return behavior(request, context)

            return observed

        def wrap_stream(behavior):
            def observed_stream(request, context):
                with _observed(service, method, context):
                    yield from behavior(request, context)

            return observed_stream

        return _wrap(continuation(handler_call_details), service, wrap, wrap_stream)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Domain errors -> their status code and message; anything else -> INTERNAL, traceback logged."""

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method

        def abort(error: Exception, context) -> None:
            """Called in the `except` block of `error`: abort the RPC with the status it maps to."""
            if isinstance(error, CbirError):
                context.abort(error.code, str(error))
            if context.code() is not None:  # the handler already aborted with a status
                raise error
            log.exception("unexpected error in %s", method)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")

        def wrap(behavior):
            def guarded(request, context):
                try:
                    return behavior(request, context)
                except Exception as error:  # noqa: BLE001 - every error becomes a status; abort logs the unexpected
                    abort(error, context)

            return guarded

        def wrap_stream(behavior):
            def guarded_stream(request, context):
                try:
                    yield from behavior(request, context)
                except Exception as error:  # noqa: BLE001 - as in `guarded`
                    abort(error, context)

            return guarded_stream

        return _wrap(continuation(handler_call_details), _split_method(method)[0], wrap, wrap_stream)


def server_credentials(cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> grpc.ServerCredentials:
    """TLS credentials of a server from PEM files; with `client_ca`, clients must present a
    certificate signed by one of its CAs (mutual TLS)."""
    pair = (read_pem(key, "TLS private key"), read_pem(cert, "TLS certificate"))
    if client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=read_pem(client_ca, "client CA file"), require_client_auth=True
    )


class GrpcService:
    """A gRPC server with health checking, reflection, interceptors and a metrics port.

    With `tls_cert` and `tls_key` (PEM files) it serves TLS only; with `tls_client_ca` as well,
    mutual TLS: a client without a certificate signed by one of those CAs cannot connect.
    `max_concurrent_rpcs` bounds the RPCs handled or queued at once: one more is refused at once
    with RESOURCE_EXHAUSTED (there is no unbounded queue).
    """

    def __init__(
        self,
        name: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        metrics_host: str | None = None,
        metrics_port: int | None = None,
        max_workers: int = 16,
        max_concurrent_rpcs: int | None = None,
        max_message_bytes: int = 16 * 1024 * 1024,
        grace_seconds: float = 5.0,
        max_connection_age_s: float | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_client_ca: str | Path | None = None,
    ):
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if tls_client_ca is not None and tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        self._tls = (tls_cert, tls_key, tls_client_ca) if tls_cert is not None else None
        self.name = name
        self._address = f"{host}:{port}"
        self._metrics_host = metrics_host or host
        self._metrics_port = metrics_port
        self._grace_seconds = grace_seconds
        self._service_names: list[str] = []
        self._stopped = threading.Event()
        self._metrics_server = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"{name}-rpc"),
            interceptors=[MetricsInterceptor(), ErrorInterceptor()],
            maximum_concurrent_rpcs=max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
                # Accept the keepalive pings of cbir's own clients (cbir.channels: every 60 s while
                # calls are in flight) instead of answering them with GOAWAY "too_many_pings".
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 30_000),
                # Clients of replicated services find new replicas only when they resolve the name
                # again, which gRPC does when a connection ends: ending each one after a while (a
                # GOAWAY; calls in flight finish first) spreads load onto replicas added later.
                *([("grpc.max_connection_age_ms", int(max_connection_age_s * 1000))] if max_connection_age_s else []),
            ],
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    def add(self, add_to_server: Callable, servicer, service_name: str) -> None:
        """Register a servicer, e.g. `add(indexer_pb2_grpc.add_IndexerServicer_to_server, s, "cbir.v1.Indexer")`."""
        add_to_server(servicer, self.server)
        self._service_names.append(service_name)

    def start(self) -> int:
        """Bind, start serving (health NOT_SERVING until `set_serving`), start /metrics. Returns the port."""
        reflection.enable_server_reflection(
            [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        if self._tls is None:
            self.port = self.server.add_insecure_port(self._address)
        else:
            self.port = self.server.add_secure_port(self._address, server_credentials(*self._tls))
        if self.port == 0:
            raise OSError(f"{self.name}: cannot listen on {self._address} (port in use?)")
        self.set_serving(False)
        self.server.start()
        if self._metrics_port is not None:
            self._metrics_server, self.metrics_port = metrics.start_metrics_server(
                self._metrics_port, self._metrics_host
            )
        log.info(
            "%s listening on %s (gRPC port %s, metrics port %s)%s",
            self.name, self._address, self.port, self.metrics_port,
            "" if self._tls is None else (" with mutual TLS" if self._tls[2] is not None else " with TLS"),
        )
        return self.port

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self._service_names]:
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, let those in flight finish for `grace` seconds, then stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(self._grace_seconds if grace is None else grace).wait()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        log.info("%s stopped", self.name)

    def wait(self) -> None:
        """Block until SIGTERM or SIGINT, then stop gracefully. Call from the main thread."""
        received = threading.Event()

        def on_signal(signum, _frame):
            log.info("%s: received %s, shutting down", self.name, signal.Signals(signum).name)
            received.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not received.wait(1.0) and not self._stopped.is_set():
            pass
        self.stop()


class ServiceServer:
    """One cbir service: a `GrpcService` plus what it serves. Subclasses register their servicers in
    `__init__` (after calling it) and implement `_load` (and `_close` for what they hold)."""

    name = "service"

    def __init__(self, settings):
        self.settings = settings
        self.service = GrpcService(self.name, **settings.grpc_service_kwargs())

    @property
    def port(self) -> int | None:
        return self.service.port

    @property
    def metrics_port(self) -> int | None:
        return self.service.metrics_port

    def start(self) -> int:
        """Listen (health NOT_SERVING: RPCs answer UNAVAILABLE with the reason) and return the gRPC port."""
        return self.service.start()

    def load(self) -> None:
        """Load what the service serves; health turns SERVING when it is ready (the indexer: in the background)."""
        self._load()

    def start_serving(self) -> int:
        """start() then load(): the port. What tests and benchmarks call."""
        port = self.start()
        try:
            self.load()
        except BaseException:
            self.stop(0)
            raise
        return port

    def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, let those in flight finish for `grace` seconds, then release what it holds."""
        self.service.stop(grace)
        self._close()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the process exit status (1: cannot listen or load, 2: no model weights)."""
        setup_logging(self.settings.log_level)
        try:
            self.start()
        except OSError as error:
            log.error("cannot start the %s: %s", self.name, error)
            self._close()
            return 1
        try:
            self.load()
        except WeightsError as error:
            log.error("cannot start the %s: %s", self.name, error)
            self.stop(0)
            return 2
        except SetupError as error:
            log.error("cannot start the %s: %s", self.name, error)
            self.stop(0)
            return 1
        except Exception:
            log.exception("cannot start the %s: loading failed", self.name)
            self.stop(0)
            return 1
        try:
            self.service.wait()
        finally:
            self._close()
        return 0

    def _load(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        """Release what the service holds (channels, model, mapped bundle); may be called twice."""
