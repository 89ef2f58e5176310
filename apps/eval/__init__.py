"""`cbir eval`: retrieval quality measured through the real pipeline (embedder -> index bundle -> indexer).

- `edits`: seeded, deterministic image edits (the copy-detection queries);
- `protocols`: the collections and queries of the two protocols (labelled groups, copy detection),
  embedding with a vector cache, real bundles searched with the indexer's `SearchIndex`;
- `metrics`: average precision, recall@k, the UKBench N-S score, ANN recall against exact search;
- `report`: tables (Markdown) and the JSON report;
- `compare`: the feature x pooling x PCA x metric x trees x search-effort comparison behind the
  shipped defaults (each image embedded once per model, vectors reused for every index variant);
- `run`: one protocol, one model, one index -> the JSON report; `cli`: the `cbir eval` commands.
"""
