"""The gateway's own metrics: its calls to the upstreams, as a client sees them.

The per-RPC server metrics come from `cbir.grpc_server.MetricsInterceptor`; the stages
(`cbir_stage_seconds{service="gateway", stage="embed"|"index"}`) from `cbir.metrics.stage`.
"""

import prometheus_client

from cbir.metrics import LATENCY_BUCKETS

UPSTREAM_SECONDS = prometheus_client.Histogram(
    "cbir_gateway_upstream_seconds",
    "Time of one call from the gateway to an upstream, from sending to the answer or the error.",
    ["upstream", "method"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_ERRORS = prometheus_client.Counter(
    "cbir_gateway_upstream_errors_total",
    "Calls from the gateway to an upstream that ended with a status other than OK.",
    ["upstream", "method", "grpc_code"],
)
BATCH_QUERIES = prometheus_client.Histogram(
    "cbir_gateway_batch_queries",
    "Queries per SearchBatch request.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_RESULTS = prometheus_client.Counter(
    "cbir_gateway_batch_results_total",
    "SearchBatch results by outcome: OK, or the status name of a failed query (INVALID_ARGUMENT, NOT_FOUND, ...).",
    ["result"],
)
