"""How a bundle is indexed unless told otherwise: one source for `cbir index build`,
`cbir index build-from-features`, `cbir eval` and the benchmarks (light: no heavy imports)."""

METRIC = "angular"
TREES = 30
PCA_DIMENSION = 0  # no PCA
PCA_WHITEN = False
