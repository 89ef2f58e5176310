"""The UI's own Prometheus metrics, served at `/metrics` on the UI's port (see `ui.server`)."""

import prometheus_client

from cbir.metrics import LATENCY_BUCKETS

SEARCHES = prometheus_client.Counter(
    "cbir_ui_searches_total",
    "Searches started from the web UI, by kind (image, id) and outcome "
    "(ok, no_input, bad_input, or the gRPC status code name of the gateway's answer, or error).",
    ["kind", "outcome"],
)
SEARCH_SECONDS = prometheus_client.Histogram(
    "cbir_ui_search_seconds",
    "Time of one search from the UI: the gateway call as the UI saw it, whatever the outcome.",
    ["kind"],
    buckets=LATENCY_BUCKETS,
)
STATUS_CHECKS = prometheus_client.Counter(
    "cbir_ui_status_checks_total",
    "GetStatus calls made by the UI's status panel, by outcome.",
    ["outcome"],
)
