"""How a bundle is indexed unless told otherwise: one source for `cbir index build`,
`cbir index build-from-features`, `cbir eval` and the benchmarks (light: no heavy imports)."""

METRIC = "angular"
INDEX_TYPE = "auto"  # annoy below 1M items, ivfpq from there (cbir.bundle.ann.resolve_index_type); or a type
TREES = 30  # Annoy's
PCA_DIMENSION = 0  # no PCA
PCA_WHITEN = False
