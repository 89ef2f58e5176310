"""The gateway: cbir's public gRPC API.

It embeds a query image with the embedder, asks the indexer for its nearest items, and maps
every upstream failure to a status code a caller can act on. Modules, one job each:

- `settings`: `GatewaySettings`, read once from `CBIR_GATEWAY_*` variables.
- `upstreams`: the channels to the embedder and indexer (round_robin over every replica),
  calls with deadlines, and the one place where upstream errors become domain errors.
- `status`: `GetStatus`: health, model and index of each upstream, and whether they fit.
- `servicer`: `GatewayServicer`, the `cbir.v1.Gateway` RPCs.
- `server`: `start(settings)` and `serve(settings)`; `python -m services.gateway` runs `serve`.
"""
