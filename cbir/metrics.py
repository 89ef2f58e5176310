"""Prometheus metrics shared by every service.

Each process exposes them on its own HTTP port (`/metrics`). Names follow Prometheus
conventions (`_seconds`, `_total`); the `grpc_*` labels follow go-grpc-prometheus so that
existing dashboards and alert rules read them. Service-specific metrics (batch sizes, items in
the index, ...) live next to the service code.
"""

import contextlib
import time

import prometheus_client

# Latency buckets from 0.5 ms to 60 s: ANN queries are sub-millisecond, VGG-16 on a CPU is seconds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

RPC_STARTED = prometheus_client.Counter(
    "cbir_grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_service", "grpc_method"],
)
RPC_HANDLED = prometheus_client.Counter(
    "cbir_grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
RPC_SECONDS = prometheus_client.Histogram(
    "cbir_grpc_server_handling_seconds",
    "Time from receiving an RPC to answering it.",
    ["grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)
RPC_IN_FLIGHT = prometheus_client.Gauge(
    "cbir_grpc_server_in_flight_requests",
    "RPCs being handled right now.",
    ["grpc_service", "grpc_method"],
)
STAGE_SECONDS = prometheus_client.Histogram(
    "cbir_stage_seconds",
    "Time spent in one stage of request handling (decode, preprocess, model, ann_query, id_lookup, ...).",
    ["service", "stage"],
    buckets=LATENCY_BUCKETS,
)


class Stopwatch:
    """What `stage` yields: `seconds` holds the block's duration once it has ended."""

    seconds: float = 0.0


@contextlib.contextmanager
def stage(service: str, name: str):
    """Time a block into `cbir_stage_seconds{service, stage}`; `with stage(...) as watch:` then
    `watch.seconds` gives the same duration to callers that report it too."""
    watch = Stopwatch()
    start = time.perf_counter()
    try:
        yield watch
    finally:
        watch.seconds = time.perf_counter() - start
        STAGE_SECONDS.labels(service, name).observe(watch.seconds)


def start_metrics_server(port: int, host: str) -> tuple[object, int]:
    """Serve /metrics over HTTP; returns (server, bound port). Port 0 picks a free port."""
    server, _thread = prometheus_client.start_http_server(port, addr=host)
    return server, server.server_port
