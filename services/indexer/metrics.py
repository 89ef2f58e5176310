"""Indexer-specific Prometheus metrics (the per-RPC and per-stage ones are in `cbir.metrics`)."""

import prometheus_client

ITEMS = prometheus_client.Gauge(
    "cbir_indexer_items",
    "Items in the index bundle being served (0 while none is loaded).",
)
BUNDLE_INFO = prometheus_client.Info(
    "cbir_indexer_bundle",
    "The index bundle being served.",
)
BUNDLE_LOADED = prometheus_client.Gauge(
    "cbir_indexer_bundle_loaded",
    "1 while a bundle is loaded and queries are answered, else 0.",
)
DELETED_ITEMS = prometheus_client.Gauge(
    "cbir_indexer_deleted_items",
    "Items of the served bundle hidden by the deletion list.",
)
RELOADS = prometheus_client.Counter(
    "cbir_indexer_reloads_total",
    "Attempts to serve another bundle version, by trigger (start, pointer, rpc) and result (ok, refused, unchanged).",
    ["trigger", "result"],
)
WARM_UP_SECONDS = prometheus_client.Gauge(
    "cbir_indexer_warm_up_seconds",
    "Time the last warm-up took (page cache + warm-up queries), before the version was served.",
)
BUNDLE_LOAD_SECONDS = prometheus_client.Gauge(
    "cbir_indexer_bundle_load_seconds",
    "Time the last successful bundle load took (checks, checksums, mmap).",
)


def set_bundle(bundle, served: int | None = None, deleted: int = 0) -> None:
    manifest = bundle.manifest
    ITEMS.set(manifest.item_count if served is None else served)
    DELETED_ITEMS.set(deleted)
    BUNDLE_LOADED.set(1)
    BUNDLE_INFO.info(
        {
            "version": manifest.version,
            "model_fingerprint": manifest.model_fingerprint,
            "metric": manifest.metric,
            "dimension": str(manifest.index_dimension),
            "input_dimension": str(manifest.input_dimension),
            "pca_dimension": str(manifest.pca.dimension if manifest.pca else 0),
            "path": str(bundle.path),
        }
    )


def clear_bundle() -> None:
    ITEMS.set(0)
    BUNDLE_LOADED.set(0)
