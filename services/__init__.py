"""The cbir gRPC services: embedder, indexer, gateway. Each runs with `python -m services.<name>`."""
