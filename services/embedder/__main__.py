"""`python -m services.embedder`: serve cbir.v1.Embedder, configured by CBIR_EMBEDDER_* variables."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ INFO lines; before it is imported

from services.embedder.server import serve  # noqa: E402
from services.embedder.settings import EmbedderSettings  # noqa: E402


def main() -> int:
    return serve(EmbedderSettings())


if __name__ == "__main__":
    sys.exit(main())
