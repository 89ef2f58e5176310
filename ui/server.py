"""Serving the UI: one FastAPI app on one port with the Gradio page at `/` and Prometheus at `/metrics`.

Local images are served by Gradio itself, from the media roots only:
- `allowed_paths=media_roots` lets Gradio's `/gradio_api/file=...` route serve files inside them
  (Gradio resolves symlinks before checking, and refuses everything else with 403);
- `gr.set_static_paths(media_roots)` makes Gradio link those files in place instead of copying
  each shown image into its cache folder.
Which hit URLs turn into such paths at all is decided by `ui.media.MediaPolicy` over the same roots.
`NoRemoteFetch` closes the one thing that route does besides files: fetching URLs for callers.
"""

from __future__ import annotations

import os
import re
import threading
from urllib.parse import unquote

import uvicorn

from ui.settings import UiSettings

def create_app(settings: UiSettings, client):
    """The ASGI app: Gradio page at `/`, `/metrics` for Prometheus. `client` talks to the gateway."""
    # No telemetry or version checks from this process, whichever Blocks Gradio creates itself.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr
    import prometheus_client
    from fastapi import FastAPI, Response

    from ui.app import CSS, HEAD, build_app
    from ui.media import MediaPolicy

    roots = [str(root) for root in MediaPolicy(settings.media_roots).roots]  # existing folders, real paths
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    # A route, not app.mount("/metrics", make_asgi_app()): a mount matches "/metrics/..." only, and
    # "/metrics" would fall through to Gradio's catch-all mount at "/". Registered before that mount.
    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    app.add_middleware(NoRemoteFetch)
    blocks = build_app(settings, client)
    if roots:
        gr.set_static_paths(roots)
    return gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        server_name=settings.host,
        server_port=settings.port,
        allowed_paths=roots,
        max_file_size=settings.max_upload_bytes,
        footer_links=["api", "gradio"],
        run_history=False,  # do not keep users' query images in their browser
        ssr_mode=False,  # no Node server
        mcp_server=False,
        enable_monitoring=False,
        pwa=False,
        show_error=False,  # handlers report errors themselves; never show Python exception text
        css=CSS,
        head=HEAD,
    )


class NoRemoteFetch:
    """Refuses `/gradio_api/file=<URL>`: Gradio would fetch any public http(s) URL through that
    route on the caller's behalf (a proxy), which this UI never needs: the gallery's http(s)
    images are loaded by the user's browser directly. Local files are not affected."""

    _URL_FETCH = re.compile(r"/file=\s*[A-Za-z][A-Za-z0-9+.-]*:")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self._URL_FETCH.search(unquote(scope.get("path", ""))):
            from starlette.responses import PlainTextResponse

            response = PlainTextResponse("The cbir UI does not fetch URLs for its clients.", status_code=403)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class UiServer:
    """uvicorn serving `create_app(settings, client)`: `run()` in the foreground, or
    `start()`/`stop()` in a background thread (tests). `url` is known once started."""

    def __init__(self, settings: UiSettings, client):
        self.settings = settings
        self.app = create_app(settings, client)
        config = uvicorn.Config(self.app, host=settings.host, port=settings.port,
                                log_level=settings.log_level.lower(), lifespan="on", access_log=False)
        self._server = _Server(config, on_started=self._started)
        self._thread: threading.Thread | None = None
        self.url: str | None = None

    def _started(self, host: str, port: int) -> None:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        if ":" in shown:
            shown = f"[{shown}]"
        self.url = f"http://{shown}:{port}/"
        print(f"cbir UI running on {self.url} (gateway {self.settings.gateway_target}; metrics at {self.url}metrics)",
              flush=True)

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (uvicorn handles both and shuts down gracefully)."""
        self._server.run()

    def start(self, timeout_s: float = 60.0) -> str:
        """Serve in a background thread; returns the URL once it accepts connections."""
        self._thread = threading.Thread(target=self._server.run, name="cbir-ui", daemon=True)
        self._thread.start()
        if not self._server.started_event.wait(timeout_s) or self.url is None:
            self.stop()
            raise RuntimeError(f"the UI did not start within {timeout_s:g} s")
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_started):
        super().__init__(config)
        self.started_event = threading.Event()
        self._on_started = on_started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self._on_started(self.config.host or host, port)
            self.started_event.set()


def serve(settings: UiSettings) -> None:
    """Run the UI in the foreground until SIGINT/SIGTERM (what `python -m ui` and `cbir serve ui` call)."""
    from cbir.client import GatewayClient
    from cbir.logs import setup_logging

    setup_logging(settings.log_level)
    client = GatewayClient(
        settings.gateway_target, timeout_s=settings.request_timeout_s, tls=settings.gateway_tls,
        tls_ca=settings.gateway_tls_ca, tls_cert=settings.gateway_tls_cert, tls_key=settings.gateway_tls_key,
    )
    try:
        UiServer(settings, client).run()
    finally:
        client.close()


__all__ = ["UiServer", "create_app", "serve"]
