"""`python -m services.indexer`: serve the index bundle named by `CBIR_INDEXER_BUNDLE`."""

from .server import serve
from .settings import IndexerSettings

__all__ = ["serve", "main"]


def main() -> None:
    serve(IndexerSettings())


if __name__ == "__main__":
    main()
