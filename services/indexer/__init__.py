"""The indexer service: serves one index bundle (`cbir.bundle`) over gRPC (`cbir.v1.Indexer`).

- `settings.IndexerSettings`: configuration (env prefix `CBIR_INDEXER_`);
- `index.SearchIndex`: queries over one opened bundle, no network (tests call it directly);
  `index.IndexHolder`: the one reference to the served index, swapped on (re)load;
- `loader.BundleLoader`: opens the bundle, and keeps retrying while it is missing or broken;
- `servicer.IndexerServicer`: the gRPC methods, thin over `SearchIndex`;
- `server.IndexerServer` / `server.serve(settings)`: wires it all into a `cbir.grpc_server.GrpcService`;
- `python -m services.indexer` runs it.
"""
