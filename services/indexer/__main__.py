"""`python -m services.indexer`: serve the index bundle named by `CBIR_INDEXER_BUNDLE`."""

import sys

from .server import serve
from .settings import IndexerSettings

__all__ = ["serve", "main"]


def main() -> int:
    return serve(IndexerSettings())


if __name__ == "__main__":
    sys.exit(main())
