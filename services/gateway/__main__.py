"""`python -m services.gateway`: run the gateway with settings from CBIR_GATEWAY_* variables."""

import sys

from pydantic import ValidationError

from services.gateway.server import serve
from services.gateway.settings import GatewaySettings

__all__ = ["main", "serve"]


def main() -> int:
    try:
        settings = GatewaySettings()
    except ValidationError as error:
        print(f"gateway: bad settings (CBIR_GATEWAY_* variables):\n{error}", file=sys.stderr)
        return 2
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
