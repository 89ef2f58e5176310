"""UI settings, read once from `CBIR_UI_*` environment variables (or keyword arguments)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class UiSettings(BaseSettings):
    """Where the UI listens, which gateway it asks, and which local images it may show.

    `media_roots` lists the folders of the collection's local images (hits whose URL is a
    `file://` URI). Only files whose real path lies inside one of them are ever shown or served.
    In the environment, give it as a JSON list (`["/data/a", "/data/b"]`) or as paths separated by
    commas or by `os.pathsep` (`/data/a:/data/b`).
    """

    model_config = SettingsConfigDict(env_prefix="CBIR_UI_", extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: int = Field(7860, ge=0, le=65535, description="HTTP port of the page and of /metrics; 0 = any free port")
    gateway_target: str = Field("127.0.0.1:50050", min_length=1, description="gRPC target of the gateway")
    media_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="folders whose images may be shown (the collection's local images)"
    )
    request_timeout_s: float = Field(60.0, gt=0, description="deadline of one call to the gateway")
    duplicates_timeout_s: float = Field(
        600.0, gt=0, description="deadline of a search for duplicates (a pass over the whole collection)")
    max_upload_mb: float = Field(16.0, gt=0, description="largest image a user may upload, MiB")
    concurrency: int = Field(8, ge=1, description="searches the UI runs at once (more wait in Gradio's queue)")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    gateway_tls: bool = Field(False, description="reach the gateway over TLS (implied by gateway_tls_ca)")
    gateway_tls_ca: Path | None = Field(None, description="PEM CA file the gateway's certificate is checked against")
    gateway_tls_cert: Path | None = Field(None, description="client certificate for mutual TLS with the gateway")
    gateway_tls_key: Path | None = Field(None, description="key of gateway_tls_cert")

    @field_validator("media_roots", mode="before")
    @classmethod
    def _split_roots(cls, value):
        if isinstance(value, (str, Path)):
            text = str(value).strip()
            if not text:
                return []
            if text.startswith("["):
                return json.loads(text)
            separator = "," if "," in text else os.pathsep
            return [part.strip() for part in text.split(separator) if part.strip()]
        return value

    @field_validator("media_roots")
    @classmethod
    def _absolute_roots(cls, roots: list[Path]) -> list[Path]:
        # Resolved once here: symlinked roots are compared by their real location later on.
        return [Path(root).expanduser().resolve() for root in roots]

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
