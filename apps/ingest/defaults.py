"""How a bundle is indexed unless told otherwise: one source for `cbir index build`,
`cbir index build-from-features`, `cbir eval` and the benchmarks (light: no heavy imports)."""

METRIC = "angular"
INDEX_TYPE = "annoy"  # or "hnsw", "hnsw-sq8", "ivfpq" (faiss; cbir.bundle.faiss_index)
TREES = 30  # Annoy's
PCA_DIMENSION = 0  # no PCA
PCA_WHITEN = False
