"""What the Duplicates tab does, as plain functions over a gateway client (no Gradio: `ui.duplicates_tab`
lays it out and wires it; tests call these with a real or a fake client).

"Find duplicates" calls the gateway's FindDuplicates once: while the indexer searches every image the
view says how far it is, then the groups arrive (largest first) and the page shows them
GROUPS_PER_PAGE at a time, each group's images side by side with their ids, and its pairs with their
score and match class. Previous/next page through the groups the page keeps; nothing is searched
again. Handlers never raise: every failure becomes a message a person can act on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from ui import metrics
from ui.handlers import describe_rpc_error, md
from ui.media import MediaPolicy, placeholder_image

log = logging.getLogger(__name__)

GROUPS_PER_PAGE = 10
MAX_GROUPS = 1000  # the most groups one search brings to the page (the largest ones)
CLASSES = {  # what the page offers: value -> (label, what the groups are called)
    "copy": ("Copies: crops, edits, overlays and the same image", "copies"),
    "near-duplicate": ("The same image only: resized, recompressed or mirrored", "same images"),
}
_MATCH_WORDS = {"same_image": "same image", "copy": "copy", "similar": "similar"}


@dataclass(frozen=True)
class FoundGroups:
    """What one search found, kept by the page: the groups (DuplicateGroup messages, largest first)."""

    groups: list
    total: int  # groups found: more than len(groups) when MAX_GROUPS cut them
    searched: int  # images searched
    match_class: str


@dataclass(frozen=True)
class GroupShown:
    title: str  # Markdown
    gallery: list[tuple[Any, str]]  # (image, item id) side by side
    pairs: str  # Markdown: one line per pair


@dataclass
class DuplicatesView:
    """What the tab shows. `groups` None: leave the groups (and the page's `found`) as they are."""

    message: str
    groups: list[GroupShown] | None = None
    page: int = 0
    pages: int = 0
    found: FoundGroups | None = None

    @property
    def pager(self) -> str:
        return f"Page {self.page + 1} of {self.pages}" if self.pages > 1 else ""


class DuplicatesHandlers:
    """The tab's actions over one gateway client (`cbir.client.GatewayClient` or a double)."""

    def __init__(self, client: Any, policy: MediaPolicy, *, gateway_target: str, timeout_s: float):
        self.client = client
        self.policy = policy
        self.gateway_target = gateway_target
        self.timeout_s = timeout_s

    def find(self, match_class: str | None) -> Iterator[DuplicatesView]:
        """Search the whole collection: a view per progress report, then the first page (or why there is none)."""
        match_class = match_class or "copy"
        if match_class not in CLASSES:
            yield self._finish("bad_input", DuplicatesView(f"⚠️ Pick one of: {', '.join(CLASSES)}."))
            return
        groups, summary = [], None
        try:
            events = self.client.find_duplicates_events(match_class, limit=MAX_GROUPS, timeout_s=self.timeout_s)
            for event in events:
                kind = event.WhichOneof("event")
                if kind == "progress":
                    yield DuplicatesView(_progress(event.progress))
                elif kind == "group":
                    groups.append(event.group)
                elif kind == "summary":
                    summary = event.summary
        except grpc.RpcError as error:
            message = describe_rpc_error(error, kind="duplicates", target=self.gateway_target, timeout_s=self.timeout_s)
            code = error.code() if callable(getattr(error, "code", None)) else None
            yield self._finish(code.name if code else "UNKNOWN", DuplicatesView(f"⚠️ **Search failed.** {message}"))
            return
        except Exception:  # the page must keep working
            log.exception("finding duplicates failed")
            yield self._finish("error", DuplicatesView(
                "⚠️ **Search failed.** An unexpected error happened in the UI (details in its log)."))
            return
        if summary is None:
            yield self._finish("error", DuplicatesView(
                "⚠️ **Search failed.** The gateway ended the search without its summary; try again."))
            return
        found = FoundGroups(groups, int(summary.groups), int(summary.items_searched), match_class)
        yield self._finish("ok", self.page(found, 0))

    def page(self, found: FoundGroups | None, number: Any) -> DuplicatesView:
        """Page `number` (0-based; out of range: the nearest page) of what a search found."""
        if found is None:
            return DuplicatesView("Press **Find duplicates** to search the whole collection.", groups=[])
        words = CLASSES[found.match_class][1]
        if found.searched == 0:
            return DuplicatesView("**The collection is empty**: there are no images to compare.", groups=[],
                                  found=found)
        if not found.groups:
            return DuplicatesView(f"**No {words} found** among the {found.searched:,} images.", groups=[], found=found)
        pages = -(-len(found.groups) // GROUPS_PER_PAGE)
        number = min(max(int(number or 0), 0), pages - 1)
        first = number * GROUPS_PER_PAGE
        shown = [self._group(g) for g in found.groups[first:first + GROUPS_PER_PAGE]]
        images = sum(len(g.items) for g in found.groups)
        message = (f"**{found.total:,} group{'s' if found.total != 1 else ''} of {words}** among the "
                   f"{found.searched:,} images, largest first")
        if found.total > len(found.groups):
            message += f"; the {len(found.groups):,} largest are shown ({images:,} images)"
        else:
            message += f" ({images:,} images in groups)"
        message += f". Groups {first + 1}–{first + len(shown)}."
        return DuplicatesView(message, shown, number, pages, found)

    def _group(self, group: Any) -> GroupShown:
        gallery = []
        for item in group.items:
            media = self.policy.resolve(item.url)
            if not media.available:
                log.info("not showing the image of %s (%r): %s", item.item_id, item.url, media.reason)
            gallery.append((media.source if media.available else placeholder_image(), item.item_id))
        title = f"**Group {group.number}** · {len(group.items)} images"
        pairs = "\n".join(
            f"- {md(p.item_a)} ~ {md(p.item_b)}: score {p.score:.3f}"
            + (f" · {_MATCH_WORDS[p.match]}" if p.match in _MATCH_WORDS else "")
            + (f" · {p.inliers} inliers" if p.inliers else "")
            for p in group.pairs)
        return GroupShown(title, gallery, pairs)

    @staticmethod
    def _finish(outcome: str, view: DuplicatesView) -> DuplicatesView:
        metrics.SEARCHES.labels("duplicates", outcome).inc()
        return view


def _progress(progress: Any) -> str:
    total = progress.items_total
    if not total:
        return "Searching the collection…"
    return (f"Searching every image for its copies… **{progress.items_searched:,} of {total:,}** images searched "
            f"({progress.items_searched / total:.0%}), {progress.pairs_found:,} pairs found so far.")
