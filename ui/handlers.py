"""What the page's controls do, as plain functions over a gateway client.

No Gradio here: each handler takes plain values (a file path, a k, a list of item ids) and returns
a `SearchView` (gallery items, captions, a status line, timings, what was searched by) or Markdown
text. `ui.app` wires them to components; tests call them with a fake client. Handlers never raise:
every failure becomes a message a person can act on, and the metrics count it.

k has one owner, the gateway: its GetStatus says the default and the most one search may ask for
(`KLimits`), read when the page loads and when the status is refreshed. The page sends k = 0 for
"the gateway's default", refuses a k above the gateway's maximum itself (in a sentence, keeping the
previous results), and, while the gateway's limits are unknown, leaves the judgement to the gateway.

The filter box takes metadata conditions in the CLI's syntax (`cbir.filters`: `country=fr; year>=2010`,
separated by ';' or new lines): a malformed one is refused here in a sentence, a field the items lack
by the indexer, whose reason the page shows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from cbir import filters
from ui import metrics
from ui.media import MediaPolicy, placeholder_image

log = logging.getLogger(__name__)

_MARKDOWN_SPECIALS = "\\`*_[]<>|~#"
_MAX_DETAIL = 300


@dataclass(frozen=True)
class KLimits:
    """The gateway's k: `default_k` (what k = 0 asks for) and `max_k`. `from_gateway` False: the
    gateway has not said (down, or an older gateway); the slider then shows these stand-ins, and
    the gateway alone judges the k a user picks."""

    default_k: int = 10
    max_k: int = 100
    from_gateway: bool = False

    @classmethod
    def of(cls, status: Any) -> KLimits:
        """The limits in a `GetStatusResponse` (0 = not given: the stand-ins)."""
        default_k, max_k = int(getattr(status, "default_k", 0) or 0), int(getattr(status, "max_k", 0) or 0)
        if default_k < 1 or max_k < default_k:
            return UNKNOWN_LIMITS
        return cls(default_k, max_k, True)

    def describe(self) -> str:
        if not self.from_gateway:
            return "The gateway's default and maximum are not known yet (status unavailable)."
        return f"Default {self.default_k}, at most {self.max_k} (the gateway's limits)."


UNKNOWN_LIMITS = KLimits()


@dataclass(frozen=True)
class QueryShown:
    """What the query panel shows after a search: `text` says what the results are similar to;
    with `replace_image`, the query box shows `image` (a local image, or None: empty) instead of
    what it held (the upload)."""

    text: str
    image: str | None = None
    replace_image: bool = False


class Gateway(Protocol):
    """The part of `cbir.client.GatewayClient` the UI uses."""

    def search_image(self, image: bytes, k: int = 0, search_k: int = 0, filter: Any = None) -> Any: ...

    def search_id(self, item_id: str, k: int = 0, search_k: int = 0, exclude_self: bool = False,
                  filter: Any = None) -> Any: ...

    def search_url(self, url: str, k: int = 0, search_k: int = 0, filter: Any = None) -> Any: ...

    def status(self) -> Any: ...


@dataclass
class SearchView:
    """What one search shows. `gallery`/`item_ids` None = leave the previous results on the page."""

    message: str
    gallery: list[tuple[Any, str]] | None = None
    item_ids: list[str] | None = None
    timings: str = ""
    ok: bool = False
    unavailable: list[str] = field(default_factory=list)  # item ids whose image cannot be shown
    query: QueryShown | None = None  # None: leave the query panel as it is


def md(text: object) -> str:
    """`text` with Markdown's special characters escaped (item ids, server messages)."""
    return "".join("\\" + c if c in _MARKDOWN_SPECIALS else c for c in str(text))


# The match class before the hit's id; a copy reads "copy of <id>" (the query is a copy of that image).
_MATCH_BADGES = {"same_image": "same image · ", "copy": "copy of ", "similar": "similar · "}


def caption(rank: int, hit: Any) -> str:
    """The caption on one result tile: `#rank · 0.973 · copy of item_id`, rank, score and match class
    (when the hit has one) first: the page shows one line and ellipsizes what does not fit (a long
    id), with the whole caption in the tile's tooltip."""
    badge = _MATCH_BADGES.get(getattr(hit, "match", ""), "")
    return f"#{rank} · {hit.score:.3f} · {badge}{hit.item_id}"


def _short(details: str | None) -> str:
    details = " ".join((details or "").split())
    return details if len(details) <= _MAX_DETAIL else details[: _MAX_DETAIL - 1] + "…"


def describe_rpc_error(error: grpc.RpcError, *, kind: str, target: str, timeout_s: float) -> str:
    """A sentence for a person about a failed gateway call (`kind` is 'image', 'id' or 'status')."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = md(_short(error.details() if callable(getattr(error, "details", None)) else str(error)))
    if code is grpc.StatusCode.UNAVAILABLE:
        return (f"The search service is not reachable right now (gateway {md(target)}): {details}. "
                "Check that the gateway is running, then try again.")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return (f"The gateway did not answer within {timeout_s:g} s and the request was abandoned. "
                "It may be busy or still loading; try again.")
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        if details.startswith("filter"):  # cbir.filters.FilterError, e.g. a field the items lack
            return f"The filter was refused: {details}."
        if kind == "image":
            return f"This image could not be used: {details}. Try a JPEG or PNG photo."
        return f"The request was refused: {details}."
    if code is grpc.StatusCode.NOT_FOUND:
        return (f"Not found: {details}. The index may have changed since these results were shown; "
                "search again.")
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return f"The search service is not ready: {details}."
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"The search service is busy ({details}). Try again in a moment."
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return f"The service at {md(target)} does not answer this request: is it a cbir gateway?"
    name = code.name if code is not None else "UNKNOWN"
    return f"The search failed ({name}): {details or 'no details given'}."


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def format_timings(response: Any, round_trip_s: float) -> str:
    """The small print under the results: where the time of the search went."""
    t = response.timings
    parts = []
    if t.embed_ms:
        parts.append(f"embed {_ms(t.embed_ms)}")
    parts.append(f"index {_ms(t.index_ms)}")
    parts.append(f"gateway total {_ms(t.total_ms)}")
    parts.append(f"round trip {_ms(round_trip_s * 1000)}")
    if response.bundle_version:
        parts.append(f"bundle {md(response.bundle_version)}")
    return " · ".join(parts)


def format_status(response: Any) -> str:
    """The status panel's Markdown for a `GetStatusResponse`."""
    lines = []
    if response.HasField("index"):
        index = response.index
        dims = f"{index.dimension}-d"
        if index.pca_dimension:
            dims = f"{index.input_dimension}-d → PCA {index.pca_dimension}-d" + (" (whitened)" if index.pca_whiten else "")
        lines.append(
            f"**Index:** {index.item_count:,} images · bundle {md(index.bundle_version or '?')} · "
            f"{md(index.metric)} · {dims} · {index.trees} trees"
            + (f" · built {md(index.created_at)}" if index.created_at else "")
        )
    else:
        lines.append("**Index:** not reachable")
    if response.HasField("model"):
        model = response.model
        name = " ".join(p for p in (model.name, model.feature, model.pooling) if p)
        lines.append(
            f"**Model:** {md(name)} · {model.dimension}-d · weights {md(model.weights_source or '?')}"
            + (f" · fingerprint {md(model.fingerprint[:12])}" if model.fingerprint else "")
        )
    else:
        lines.append("**Model:** embedder not reachable")
    if response.compatible:
        lines.append("**Compatible:** yes, the index was built with the embedder's model")
    else:
        lines.append(f"**Compatible:** no{' — ' + md(_short(response.detail)) if response.detail else ''}")
    limits = KLimits.of(response)
    if limits.from_gateway:
        lines.append(f"**Results per search:** {limits.default_k} by default, at most {limits.max_k}")
    for upstream in response.upstreams:
        detail = f" — {md(_short(upstream.detail))}" if upstream.detail else ""
        lines.append(f"**{md(upstream.name.capitalize())}:** {md(upstream.state)} at {md(upstream.target)}{detail}")
    return "\n".join(f"- {line}" for line in lines)


class SearchHandlers:
    """The page's actions over one gateway client."""

    def __init__(self, client: Gateway, policy: MediaPolicy, *, max_upload_bytes: int, gateway_target: str,
                 timeout_s: float):
        self.client = client
        self.policy = policy
        self.limits = UNKNOWN_LIMITS  # the gateway's k limits as last read; pages keep their own copy
        self.max_upload_bytes = max_upload_bytes
        self.gateway_target = gateway_target
        self.timeout_s = timeout_s

    # ------------------------------------------------------------------ searches
    def search_image(self, image_path: str | None, k: Any = None, previous: list[str] | None = None,
                     limits: KLimits | None = None, filter_text: str | None = None) -> SearchView:
        """Search by the uploaded/pasted image at `image_path` (a file Gradio saved). `limits`: the
        gateway's k limits the page shows (default: as last read); `filter_text`: the filter box."""
        if not image_path:
            return self._finish("image", "no_input", SearchView("Upload or paste an image, then press **Search**."))
        try:
            data = Path(image_path).read_bytes()
        except OSError as error:
            log.warning("could not read the uploaded image %s: %s", image_path, error)
            return self._finish("image", "bad_input", SearchView("The uploaded image could not be read; upload it again."))
        if not data:
            return self._finish("image", "bad_input", SearchView("The uploaded file is empty."))
        if len(data) > self.max_upload_bytes:
            return self._finish("image", "bad_input", SearchView(
                f"The image is too large ({len(data) / 2**20:.1f} MiB; at most "
                f"{self.max_upload_bytes / 2**20:.0f} MiB)."))
        k_sent = self._k(k, limits, previous)
        if isinstance(k_sent, SearchView):
            return self._finish("image", "bad_input", k_sent)
        conditions = self._conditions(filter_text, previous)
        if isinstance(conditions, SearchView):
            return self._finish("image", "bad_input", conditions)
        wire = filters.to_proto(conditions) if conditions else None
        return self._call("image", lambda: self.client.search_image(data, k=k_sent, filter=wire),
                          "for the uploaded image" + _among(conditions), previous,
                          QueryShown("Results for **the uploaded image**."), filtered=bool(conditions))

    def search_url(self, url: str | None, k: Any = None, previous: list[str] | None = None,
                   limits: KLimits | None = None, filter_text: str | None = None) -> SearchView:
        """Search by the image at an http(s) URL, which the gateway downloads (under its SSRF rules)."""
        url = (url or "").strip()
        if not url:
            return self._finish("url", "no_input", SearchView("Paste the http(s) URL of an image, then press **Search URL**."))
        if not url.lower().startswith(("http://", "https://")):
            return self._finish("url", "bad_input", SearchView("Only http:// and https:// image URLs can be searched."))
        shown = url if len(url) <= 80 else url[:79] + "…"
        k_sent = self._k(k, limits, previous)
        if isinstance(k_sent, SearchView):
            return self._finish("url", "bad_input", k_sent)
        conditions = self._conditions(filter_text, previous)
        if isinstance(conditions, SearchView):
            return self._finish("url", "bad_input", conditions)
        wire = filters.to_proto(conditions) if conditions else None
        # the query box is emptied: the image at the URL is the gateway's to fetch, not the UI's
        query = QueryShown(f"Results for **the image at** {md(shown)}", None, replace_image=True)
        return self._call("url", lambda: self.client.search_url(url, k=k_sent, filter=wire),
                          f"for the image at {md(shown)}" + _among(conditions), previous, query,
                          filtered=bool(conditions))

    def search_id(self, item_id: str, k: Any = None, previous: list[str] | None = None, rank: int | None = None,
                  limits: KLimits | None = None, filter_text: str | None = None) -> SearchView:
        """Search by an indexed item (what clicking a result does). The query panel then shows that
        item: its image (when it is a local image the UI may show) and its full id."""
        if not item_id:
            return self._finish("id", "no_input", SearchView("No item to search by."))
        k_sent = self._k(k, limits, previous)
        if isinstance(k_sent, SearchView):
            return self._finish("id", "bad_input", k_sent)
        conditions = self._conditions(filter_text, previous)
        if isinstance(conditions, SearchView):
            return self._finish("id", "bad_input", conditions)
        wire = filters.to_proto(conditions) if conditions else None
        what = (f"similar to item {md(item_id)}" + (f" (result #{rank} of the previous search)" if rank else "")
                + _among(conditions))
        query = QueryShown(f"Results for **item** {md(item_id)}" + (f" (result #{rank} of the previous search)" if rank else "")
                           + ".", None, replace_image=True)
        return self._call("id", lambda: self.client.search_id(item_id, k=k_sent, filter=wire), what, previous, query,
                          query_id=item_id, filtered=bool(conditions))

    def select_hit(self, item_ids: list[str] | None, index: Any, k: Any = None,
                   limits: KLimits | None = None, filter_text: str | None = None) -> SearchView:
        """A click on result number `index` (0-based) of the gallery showing `item_ids`."""
        item_ids = list(item_ids or [])
        if not isinstance(index, int) or not 0 <= index < len(item_ids):
            return self._finish("id", "no_input", SearchView("That result is no longer on the page; search again."))
        return self.search_id(item_ids[index], k, previous=item_ids, rank=index + 1, limits=limits,
                              filter_text=filter_text)

    # ------------------------------------------------------------------ status
    def status(self) -> str:
        """The status panel: index size, bundle version, model, upstream states, k limits."""
        return self.status_and_limits()[0]

    def status_and_limits(self) -> tuple[str, KLimits | None]:
        """The status panel's text and the gateway's k limits (None: the gateway did not answer;
        the page keeps the limits it shows)."""
        try:
            response = self.client.status()
        except grpc.RpcError as error:
            metrics.STATUS_CHECKS.labels(_code_name(error)).inc()
            return "**Status unavailable.** " + describe_rpc_error(
                error, kind="status", target=self.gateway_target, timeout_s=self.timeout_s), None
        except Exception:  # noqa: BLE001 - the page must keep working
            log.exception("status check failed")
            metrics.STATUS_CHECKS.labels("error").inc()
            return "**Status unavailable:** an unexpected error happened in the UI (details in its log).", None
        metrics.STATUS_CHECKS.labels("ok").inc()
        limits = KLimits.of(response)
        self.limits = limits
        try:
            return format_status(response), limits
        except Exception:  # noqa: BLE001
            log.exception("could not format the status %r", response)
            return "**Status unavailable:** the gateway's answer could not be shown (details in the UI log).", limits

    # ------------------------------------------------------------------ helpers
    def _k(self, k: Any, limits: KLimits | None, previous: list[str] | None) -> int | SearchView:
        """The k to send: 0 (the gateway's default) for no k, 0, or the default the page shows;
        else k itself. A k the gateway would refuse is refused here, in a sentence."""
        limits = limits or self.limits
        if k is None or (isinstance(k, str) and not k.strip()):
            return 0
        try:
            value = float(k)
        except (TypeError, ValueError):
            return SearchView(self._refused(f"k must be a whole number, not {md(_short(str(k)))!s}.", limits, previous))
        if value != value or value in (float("inf"), float("-inf")) or value != int(value):
            return SearchView(self._refused(f"k must be a whole number, not {md(k)}.", limits, previous))
        value = int(value)
        if value < 0:
            return SearchView(self._refused(f"k must be at least 1 (got {value}).", limits, previous))
        if value == 0 or value == limits.default_k:
            return 0
        if limits.from_gateway and value > limits.max_k:
            return SearchView(self._refused(
                f"The gateway returns at most {limits.max_k} results per search; {value} is too many.",
                limits, previous))
        return value

    @staticmethod
    def _conditions(filter_text: str | None, previous: list[str] | None) -> filters.Filter | SearchView:
        """The filter box's conditions (() when it is empty); a refusal in a sentence when one is malformed."""
        try:
            return filters.parse_filter(filter_text or "")
        except filters.FilterError as error:
            note = " The results below are from the previous search." if previous else ""
            return SearchView(f"⚠️ **Not searched.** The filter cannot be used: {md(error)}. Write conditions "
                              f"like `country=fr; year>=2010; tag in a,b; taken<2020-01-31`.{note}")

    @staticmethod
    def _refused(reason: str, limits: KLimits, previous: list[str] | None) -> str:
        note = " The results below are from the previous search." if previous else ""
        hint = f" Pick a k from 1 to {limits.max_k}." if limits.from_gateway else ""
        return f"⚠️ **Not searched.** {reason}{hint}{note}"

    def _call(self, kind: str, call, what: str, previous: list[str] | None, query: QueryShown | None = None,
              query_id: str | None = None, filtered: bool = False) -> SearchView:
        start = time.perf_counter()
        try:
            response = call()
        except grpc.RpcError as error:
            metrics.SEARCH_SECONDS.labels(kind).observe(time.perf_counter() - start)
            message = describe_rpc_error(error, kind=kind, target=self.gateway_target, timeout_s=self.timeout_s)
            return self._finish(kind, _code_name(error), SearchView(self._failed(message, previous)))
        except Exception:  # noqa: BLE001 - the page must keep working
            metrics.SEARCH_SECONDS.labels(kind).observe(time.perf_counter() - start)
            log.exception("search (%s) failed", kind)
            return self._finish(kind, "error", SearchView(self._failed(
                "An unexpected error happened in the UI (details in its log).", previous)))
        elapsed = time.perf_counter() - start
        metrics.SEARCH_SECONDS.labels(kind).observe(elapsed)
        try:
            view = self._results(response, what, elapsed, query, query_id, filtered)
        except Exception:  # noqa: BLE001
            log.exception("could not show the results of a search (%s)", kind)
            return self._finish(kind, "error", SearchView(self._failed(
                "The gateway's answer could not be shown (details in the UI log).", previous)))
        return self._finish(kind, "ok", view)

    def _results(self, response: Any, what: str, elapsed: float, query: QueryShown | None = None,
                 query_id: str | None = None, filtered: bool = False) -> SearchView:
        gallery, ids, unavailable = [], [], []
        for rank, hit in enumerate(response.hits, start=1):
            media = self.policy.resolve(hit.url)
            text = caption(rank, hit)
            if media.available:
                gallery.append((media.source, text))
                local = media.source.startswith("/")
                if query is not None and hit.item_id == query_id and local and query.image is None:
                    # the searched item's own image; a local file only: the UI fetches no URLs
                    query = QueryShown(query.text, media.source, replace_image=True)
            else:
                log.info("not showing the image of %s (%r): %s", hit.item_id, hit.url, media.reason)
                unavailable.append(hit.item_id)
                gallery.append((placeholder_image(), text))  # the tile itself says "image not available"
            ids.append(hit.item_id)
        count = len(ids)
        if count:
            message = f"**{count} result{'s' if count != 1 else ''}** {what}, best first. Click one to search by it."
        else:
            why = "no indexed item meets the filter" if filtered else "the index is empty"
            message = f"**No results** {what}: {why}."
        if unavailable:
            message += (f" {len(unavailable)} image{'s' if len(unavailable) != 1 else ''} cannot be shown "
                        "(not under the UI's media roots, or not a usable URL).")
        return SearchView(message, gallery, ids, format_timings(response, elapsed), ok=True, unavailable=unavailable,
                          query=query)

    @staticmethod
    def _failed(message: str, previous: list[str] | None) -> str:
        note = " The results below are from the previous search." if previous else ""
        return f"⚠️ **Search failed.** {message}{note}"

    @staticmethod
    def _finish(kind: str, outcome: str, view: SearchView) -> SearchView:
        metrics.SEARCHES.labels(kind, outcome).inc()
        return view


def _among(conditions: filters.Filter) -> str:
    """What a search's message adds for its filter ("" without one)."""
    return f" among items with {md(filters.describe(conditions))}" if conditions else ""


def _code_name(error: grpc.RpcError) -> str:
    code = error.code() if callable(getattr(error, "code", None)) else None
    return code.name if code is not None else "UNKNOWN"
