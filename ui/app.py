"""The Gradio page: query image, k, Search, a gallery of hits (click one to search by it), status.

`build_app(settings, client)` returns the `gr.Blocks`; `ui.server` mounts it. The page's
behaviour lives in `ui.handlers`; this module only lays out components and wires events.
"""

from __future__ import annotations

import dataclasses

from typing import Any

import gradio as gr

from ui.duplicates import DuplicatesHandlers
from ui.duplicates_tab import duplicates_tab
from ui.handlers import UNKNOWN_LIMITS, KLimits, SearchHandlers, SearchView
from ui.media import MediaPolicy
from ui.settings import UiSettings

TITLE = "cbir — image search"

# Passed to gr.mount_gradio_app (Gradio 6 takes css at launch/mount time, not in gr.Blocks()).
CSS = """
#timings { font-size: 0.8em; opacity: 0.75; }
#timings p { margin: 0; }
#message p { margin: 0.2em 0; }
#results .caption-label { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; max-width: calc(100% - 8px);
                          font-size: 0.75em; line-height: 1.2; padding: 1px 5px; }
#results .grid-wrap { height: auto !important; max-height: none !important; overflow-y: visible; }
#query-info p { margin: 0; overflow-wrap: anywhere; }
#status ul { padding-left: 1em; margin: 0; }
.dup-group { border-top: 1px solid var(--border-color-primary); padding-top: 0.5em; }
.dup-group p, .dup-group ul { margin: 0.1em 0; }
.dup-group .grid-wrap { height: auto !important; min-height: 0 !important; max-height: none !important; }
.dup-group .caption-label { font-size: 0.75em; padding: 1px 5px; }
#dup-message p { margin: 0.2em 0; }
"""


# Each tile's whole caption (rank, score, the full item id) as its tooltip: the tile shows one line,
# ellipsized (CSS above). Gradio renders the captions itself, so titles are set as tiles appear.
HEAD = """<script>
new MutationObserver(() => {
  for (const label of document.querySelectorAll('#results .caption-label')) {
    const tile = label.closest('button') || label;
    if (tile.title !== label.textContent) { tile.title = label.textContent; label.title = label.textContent; }
  }
}).observe(document.documentElement, {subtree: true, childList: true, characterData: true});
</script>"""


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
        max_upload_bytes=settings.max_upload_bytes,
        gateway_target=settings.gateway_target,
        timeout_s=settings.request_timeout_s,
    )
    duplicates = DuplicatesHandlers(client, MediaPolicy(settings.media_roots), gateway_target=settings.gateway_target,
                                    timeout_s=settings.duplicates_timeout_s)

    def show(view: SearchView):
        if view.gallery is None:  # failed or refused: leave the previous results (and query) where they are
            return gr.skip(), gr.skip(), view.message, view.timings, gr.skip(), gr.skip()
        query_image, query_info = gr.skip(), gr.skip()
        if view.query is not None:
            query_info = view.query.text
            if view.query.replace_image:
                query_image = view.query.image
        # selected_index=None: no result stays highlighted from the click that led here
        return (gr.Gallery(value=view.gallery, selected_index=None), view.item_ids, view.message, view.timings,
                query_image, query_info)

    # The limits the page shows live in the page (a hidden JSON component), not in server-side
    # State: they change in the same browser update as the k box, so a search sent while the
    # status answer is arriving never pairs the old k with the new limits.
    def on_search(image_path, k, item_ids, shown, filter_text):
        return show(handlers.search_image(image_path, k, previous=item_ids, limits=KLimits(**shown),
                                          filter_text=filter_text))

    def on_url(url, k, item_ids, shown, filter_text):
        return show(handlers.search_url(url, k, previous=item_ids, limits=KLimits(**shown), filter_text=filter_text))

    def on_select(item_ids, k, shown, filter_text, evt: gr.SelectData):
        return show(handlers.select_hit(item_ids, evt.index, k, limits=KLimits(**shown), filter_text=filter_text))

    def on_status(k_value, shown_value: dict):
        """The status panel, and the k box set to the gateway's limits. An untouched k (the default
        the page showed) becomes the gateway's default; a k the user picked stays."""
        shown = KLimits(**shown_value)
        text, limits = handlers.status_and_limits()
        if limits is None or (not limits.from_gateway and shown.from_gateway):
            return text, gr.skip(), gr.skip()  # no answer: keep what the page shows
        update = {"info": limits.describe()}
        if k_value is None or k_value == shown.default_k:
            update["value"] = limits.default_k
        return text, gr.Number(**update), dataclasses.asdict(limits)

    # delete_cache: uploaded query images (and placeholder tiles) older than a day are removed hourly.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as blocks:
        gr.Markdown(f"## {TITLE}\nUpload or paste a photo to find the most similar images of the collection. "
                    "Click a result to search by it.")
        item_ids = gr.State([])
        with gr.Tab("Search", id="search"):  # noqa: SIM117 - one block per level of the layout
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    query = QueryImage(label="Query image", type="filepath", sources=["upload", "clipboard"],
                                       height=280, elem_id="query")
                    query_info = gr.Markdown("", elem_id="query-info")
                    # k: its default and maximum are the gateway's, read from its status as the page loads.
                    # A number box without bounds of its own: a slider clamps a typed k to its maximum
                    # without a word, and Gradio's bounds check fails the search with "Error" pills;
                    # the handler refuses a k above the gateway's maximum in a sentence instead.
                    k = gr.Number(value=UNKNOWN_LIMITS.default_k, precision=0, step=1, label="Number of results (k)",
                                  info=UNKNOWN_LIMITS.describe(), elem_id="k")
                    limits = gr.JSON(dataclasses.asdict(UNKNOWN_LIMITS), visible=False)
                    # metadata conditions in the CLI's syntax (cbir.filters); a malformed one is refused in words
                    filter_box = gr.Textbox(label="Filter (metadata)", placeholder="country=fr; year>=2010", max_lines=3,
                                            info="field=value · field in a,b · field>=number · field<2020-01-31; "
                                                 "separate conditions with ;", elem_id="filter")
                    search = gr.Button("Search", variant="primary", elem_id="search")
                    url = gr.Textbox(label="…or the URL of an image", placeholder="https://…", max_lines=1,
                                     elem_id="url")
                    url_search = gr.Button("Search URL", elem_id="search-url")
                    with gr.Accordion("Index status", open=True):
                        status = gr.Markdown("Checking the gateway…", elem_id="status")
                        refresh = gr.Button("Refresh status", size="sm", elem_id="refresh-status")
                with gr.Column(scale=3):
                    message = gr.Markdown("Upload or paste an image to start.", elem_id="message")
                    # height="auto": the gallery grows with its rows (a fixed height cut the third one)
                    gallery = gr.Gallery(label="Results", columns=4, allow_preview=False, interactive=False,
                                         object_fit="cover", height="auto", buttons=["fullscreen"], elem_id="results")
                    timings = gr.Markdown("", elem_id="timings")
        with gr.Tab("Duplicates", id="duplicates"):
            duplicates_tab(duplicates)

        outputs = [gallery, item_ids, message, timings, query, query_info]
        search.click(on_search, [query, k, item_ids, limits, filter_box], outputs)
        query.upload(on_search, [query, k, item_ids, limits, filter_box], outputs)
        gallery.select(on_select, [item_ids, k, limits, filter_box], outputs)
        url_search.click(on_url, [url, k, item_ids, limits, filter_box], outputs)
        url.submit(on_url, [url, k, item_ids, limits, filter_box], outputs)
        refresh.click(on_status, [k, limits], [status, k, limits])
        blocks.load(on_status, [k, limits], [status, k, limits])

    blocks.queue(default_concurrency_limit=settings.concurrency)
    return blocks
