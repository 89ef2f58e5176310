"""The cbir web UI: a Gradio app that talks to the gateway only, through `cbir.client.GatewayClient`.

- `ui.settings`  `UiSettings` (env prefix `CBIR_UI_`).
- `ui.media`     which hit URLs the gallery may show, and how (the local-file safety rules).
- `ui.handlers`  what the buttons do, as plain functions over a client: tests call them directly.
- `ui.metrics`   the UI's own Prometheus metrics.
- `ui.app`       the Gradio Blocks page, built from settings + a client.
- `ui.server`    FastAPI app (Gradio at `/`, Prometheus at `/metrics`) and uvicorn serving.
- `python -m ui` runs it (`ui.__main__.serve(settings)`).

Nothing here imports Gradio at package import time: `import ui` is instant.
"""
