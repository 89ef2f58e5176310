"""The Gradio page: query image, k, Search, a gallery of hits (click one to search by it), status.

`build_app(settings, client)` returns the `gr.Blocks`; `ui.server` mounts it. The page's
behaviour lives in `ui.handlers`; this module only lays out components and wires events.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from ui.handlers import SearchHandlers, SearchView
from ui.media import MediaPolicy
from ui.settings import UiSettings

TITLE = "cbir — image search"

# Passed to gr.mount_gradio_app (Gradio 6 takes css at launch/mount time, not in gr.Blocks()).
CSS = """
#timings { font-size: 0.8em; opacity: 0.75; }
#timings p { margin: 0; }
#message p { margin: 0.2em 0; }
#results .caption-label { white-space: normal; overflow-wrap: anywhere; text-overflow: clip; max-width: 95%; }
#status ul { padding-left: 1em; margin: 0; }
"""


class QueryImage(gr.Image):
    """`gr.Image` that hands the handler the uploaded file's path without opening it.

    Plain `gr.Image` opens every upload with Pillow before the handler runs, and a file Pillow
    cannot read becomes a Gradio preprocessing error ("Error", traceback in the log) instead of a
    message. Here the bytes go to the gateway, whose embedder validates images and answers
    INVALID_ARGUMENT with a reason, which the page shows. Gradio has already checked that the
    path is one of its own uploads. `is_template` makes the browser render it as an Image.
    """

    is_template = True

    def preprocess(self, payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        return super().preprocess(payload)


def build_app(settings: UiSettings, client: Any) -> gr.Blocks:
    """The page for `settings`, searching through `client` (a `cbir.client.GatewayClient` or a
    double with the same methods)."""
    handlers = SearchHandlers(
        client,
        MediaPolicy(settings.media_roots),
        default_k=settings.default_k,
        max_k=settings.max_k,
        max_upload_bytes=settings.max_upload_bytes,
        gateway_target=settings.gateway_target,
        timeout_s=settings.request_timeout_s,
    )

    def show(view: SearchView):
        if view.gallery is None:  # failed: leave the previous results where they are
            return gr.skip(), gr.skip(), view.message, view.timings
        # selected_index=None: no result stays highlighted from the click that led here
        return gr.Gallery(value=view.gallery, selected_index=None), view.item_ids, view.message, view.timings

    def on_search(image_path, k, item_ids):
        return show(handlers.search_image(image_path, k, previous=item_ids))

    def on_url(url, k, item_ids):
        return show(handlers.search_url(url, k, previous=item_ids))

    def on_select(item_ids, k, evt: gr.SelectData):
        return show(handlers.select_hit(item_ids, evt.index, k))

    # delete_cache: uploaded query images (and placeholder tiles) older than a day are removed hourly.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as blocks:
        gr.Markdown(f"## {TITLE}\nUpload or paste a photo to find the most similar images of the collection. "
                    "Click a result to search by it.")
        item_ids = gr.State([])
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                query = QueryImage(label="Query image", type="filepath", sources=["upload", "clipboard"],
                                   height=280, elem_id="query")
                k = gr.Slider(1, settings.max_k, value=settings.default_k, step=1,
                              label="Number of results (k)", elem_id="k")
                search = gr.Button("Search", variant="primary", elem_id="search")
                url = gr.Textbox(label="…or the URL of an image", placeholder="https://…", max_lines=1,
                                 elem_id="url")
                url_search = gr.Button("Search URL", elem_id="search-url")
                with gr.Accordion("Index status", open=True):
                    status = gr.Markdown("Checking the gateway…", elem_id="status")
                    refresh = gr.Button("Refresh status", size="sm", elem_id="refresh-status")
            with gr.Column(scale=3):
                message = gr.Markdown("Upload or paste an image to start.", elem_id="message")
                gallery = gr.Gallery(label="Results", columns=4, allow_preview=False, interactive=False,
                                     object_fit="cover", buttons=["fullscreen"], elem_id="results")
                timings = gr.Markdown("", elem_id="timings")

        outputs = [gallery, item_ids, message, timings]
        search.click(on_search, [query, k, item_ids], outputs)
        query.upload(on_search, [query, k, item_ids], outputs)
        gallery.select(on_select, [item_ids, k], outputs)
        url_search.click(on_url, [url, k, item_ids], outputs)
        url.submit(on_url, [url, k, item_ids], outputs)
        refresh.click(handlers.status, None, status)
        blocks.load(handlers.status, None, status)

    blocks.queue(default_concurrency_limit=settings.concurrency)
    return blocks
