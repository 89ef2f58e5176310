"""The Duplicates tab's components and events (its behaviour is `ui.duplicates`).

GROUPS_PER_PAGE group slots are laid out once, hidden; each page fills and shows as many as it has.
What a search found stays in the page (a `gr.State`), so paging never searches again. Its CSS
(`.dup-group`, `#dup-message`) is in `ui.app.CSS`.
"""

from __future__ import annotations

import gradio as gr

from ui.duplicates import CLASSES, GROUPS_PER_PAGE, DuplicatesHandlers, DuplicatesView


def duplicates_tab(handlers: DuplicatesHandlers) -> None:
    """Lays the tab out inside the current `gr.Tab` and wires its events."""
    found = gr.State(None)
    page = gr.State(0)
    match_class = gr.Radio([(label, value) for value, (label, _) in CLASSES.items()], value="copy",
                           label="Find", elem_id="dup-class")
    find = gr.Button("Find duplicates", variant="primary", elem_id="dup-find")
    message = gr.Markdown("Find the groups of copies in the whole collection: every image is compared with its "
                          "nearest images.", elem_id="dup-message")
    with gr.Row():
        previous = gr.Button("← Previous page", size="sm", interactive=False, elem_id="dup-previous")
        pager = gr.Markdown("", elem_id="dup-pager")
        following = gr.Button("Next page →", size="sm", interactive=False, elem_id="dup-next")
    slots = []
    for number in range(GROUPS_PER_PAGE):
        with gr.Column(visible=False, elem_id=f"dup-group-{number}", elem_classes="dup-group") as column:
            title = gr.Markdown()
            # fit_columns=False: thumbnails of one size, a pair as small as a group of six
            gallery = gr.Gallery(columns=6, fit_columns=False, allow_preview=False, interactive=False,
                                 object_fit="contain", height="auto", show_label=False, buttons=[])
            pairs = gr.Markdown()
        slots.append((column, title, gallery, pairs))

    outputs = [message, pager, previous, following, found, page] + [c for slot in slots for c in slot]

    def show(view: DuplicatesView) -> list:
        if view.groups is None:  # progress or a failure: the groups on the page stay
            return [view.message] + [gr.skip()] * (len(outputs) - 1)
        updates = [view.message, view.pager, gr.Button(interactive=view.page > 0),
                   gr.Button(interactive=view.page + 1 < view.pages), view.found, view.page]
        for number, (column, title, gallery, pairs) in enumerate(slots):
            if number < len(view.groups):
                group = view.groups[number]
                updates += [gr.Column(visible=True), group.title, gr.Gallery(value=group.gallery), group.pairs]
            else:
                updates += [gr.Column(visible=False), "", gr.Gallery(value=None), ""]
        return updates

    def on_find(chosen):
        for view in handlers.find(chosen):
            yield show(view)

    def on_previous(kept, number):
        return show(handlers.page(kept, number - 1))

    def on_next(kept, number):
        return show(handlers.page(kept, number + 1))

    find.click(on_find, [match_class], outputs)
    previous.click(on_previous, [found, page], outputs)
    following.click(on_next, [found, page], outputs)
