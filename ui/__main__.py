"""`python -m ui`: run the web UI with settings from `CBIR_UI_*` environment variables."""

from ui.server import serve
from ui.settings import UiSettings

__all__ = ["serve"]


def main() -> None:
    serve(UiSettings())


if __name__ == "__main__":
    main()
