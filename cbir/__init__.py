"""cbir: content-based image retrieval.

This package holds what the services share (the generated API in `cbir.v1`, the gRPC server
scaffolding, errors, metrics, the index bundle format) and the offline tools (index build, CLI).
The services themselves live in `services/<name>/`, the web UI in `ui/`.
"""

__version__ = "0.1.0"
