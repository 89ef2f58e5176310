"""Fast tests of the web UI without a browser: settings, the media safety rules, the handlers'
gallery items / captions / messages, and what the UI's HTTP server serves and refuses."""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
from PIL import Image

from cbir import filters
from cbir.v1 import common_pb2, gateway_pb2
from ui.handlers import UNKNOWN_LIMITS, KLimits, SearchHandlers, caption, format_status
from ui.media import MediaPolicy
from ui.settings import UiSettings


# ----------------------------------------------------------------------------------- fixtures
def _jpeg(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), color).save(path, "JPEG")
    return path


@pytest.fixture
def media(tmp_path):
    """A media root with two images, plus files and symlinks that must stay out of reach."""
    root = tmp_path / "collection"
    inside = _jpeg(root / "a" / "cat one.jpg")
    _jpeg(root / "b.jpg", (0, 90, 200))
    outside = _jpeg(tmp_path / "private" / "secret.jpg")
    (root / "escape.jpg").symlink_to(outside)  # a file symlink leaving the root
    (root / "escape-dir").symlink_to(outside.parent, target_is_directory=True)  # a folder symlink leaving it
    (root / "alias.jpg").symlink_to(inside)  # a symlink that stays inside
    return dict(root=root, inside=inside, outside=outside, policy=MediaPolicy([root]))


class RpcError(grpc.RpcError):
    """What a failed gRPC call raises: an RpcError with code() and details()."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class FakeGateway:
    """Answers like the gateway: from canned responses, or by raising a given error."""

    def __init__(self, hits=(), error: Exception | None = None, default_k=20, max_k=50):
        self.hits, self.error, self.calls = list(hits), error, []
        self.filters = []  # the filter of each search, as sent
        self.default_k, self.max_k = default_k, max_k

    def _answer(self, response_type, call):
        self.calls.append(call)
        if self.error is not None:
            raise self.error
        return response_type(hits=self.hits, bundle_version="v7",
                             timings=gateway_pb2.Timings(embed_ms=812.4, index_ms=1.25, total_ms=815.0))

    def search_image(self, image, k=0, search_k=0, filter=None):
        self.filters.append(filter)
        return self._answer(gateway_pb2.SearchByImageResponse, ("image", len(image), k))

    def search_id(self, item_id, k=0, search_k=0, exclude_self=False, filter=None):
        self.filters.append(filter)
        return self._answer(gateway_pb2.SearchByIdResponse, ("id", item_id, k))

    def status(self):
        if self.error is not None:
            raise self.error
        return gateway_pb2.GetStatusResponse(
            upstreams=[gateway_pb2.UpstreamStatus(name="embedder", target="dns:///embedder:50051", state="SERVING"),
                       gateway_pb2.UpstreamStatus(name="indexer", target="indexer:50052", state="UNREACHABLE",
                                                  detail="connection refused")],
            model=common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=512, weights_source="keras-cache",
                                       fingerprint="0123456789abcdef0123", pooling="gem(p=3)"),
            index=common_pb2.IndexInfo(item_count=12345, dimension=512, input_dimension=512, metric="angular",
                                       trees=30, bundle_version="20250101-000000"),
            compatible=True, default_k=self.default_k, max_k=self.max_k,
        )


def _handlers(client, policy, **kwargs) -> SearchHandlers:
    options = dict(max_upload_bytes=1 << 20, gateway_target="gw:50050", timeout_s=60.0)
    options.update(kwargs)
    return SearchHandlers(client, policy, **options)


def _hit(item_id, url, score, distance=0.1):
    return common_pb2.Hit(item_id=item_id, url=url, score=score, distance=distance)


# ----------------------------------------------------------------------------------- settings
def test_settings_defaults_and_environment(monkeypatch, tmp_path):
    """Defaults run the local demo; CBIR_UI_* variables override them, media roots given as a
    path list or JSON, resolved to absolute paths. k is the gateway's: the UI has no k settings."""
    settings = UiSettings()
    assert (settings.host, settings.port, settings.gateway_target) == ("127.0.0.1", 7860, "127.0.0.1:50050")
    assert (settings.media_roots, settings.request_timeout_s) == ([], 60.0)
    assert not {"default_k", "max_k"} & set(UiSettings.model_fields)

    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("CBIR_UI_MEDIA_ROOTS", f"{a}{os.pathsep}{b}")
    monkeypatch.setenv("CBIR_UI_PORT", "8000")
    settings = UiSettings()
    assert settings.media_roots == [a.resolve(), b.resolve()] and settings.port == 8000
    monkeypatch.setenv("CBIR_UI_MEDIA_ROOTS", f'["{a}"]')
    assert UiSettings().media_roots == [a.resolve()]
    assert UiSettings(media_roots=(a, b)).media_roots == [a.resolve(), b.resolve()]  # what the CLI passes
    with pytest.raises(ValueError):
        UiSettings(max_k=10)  # unknown settings are refused


# ----------------------------------------------------------------------------------- media
def test_media_inside_root_is_shown_as_its_real_path(media):
    """A file:// URI of a file inside a media root (percent-encoded, or through a symlink that
    stays inside) resolves to the file's real path, which the gallery then shows."""
    policy, inside = media["policy"], media["inside"]
    assert policy.resolve(inside.as_uri()).source == str(inside.resolve())
    assert policy.resolve("file://localhost" + urllib.parse.quote(str(inside))).source == str(inside.resolve())
    assert policy.resolve((media["root"] / "alias.jpg").as_uri()).source == str(inside.resolve())


@pytest.mark.parametrize("make_url, reason", [
    (lambda m: (m["root"] / "a" / ".." / ".." / "private" / "secret.jpg").as_posix(), "not a URL"),
    (lambda m: "file://" + str(m["root"]) + "/a/../../private/secret.jpg", "'..'"),
    (lambda m: "file://" + str(m["root"]) + "/%2e%2e/private/secret.jpg", "'..'"),
    (lambda m: m["outside"].as_uri(), "outside the media roots"),
    (lambda m: "file:///etc/passwd", "outside the media roots"),
    (lambda m: (m["root"] / "escape.jpg").as_uri(), "outside the media roots"),
    (lambda m: (m["root"] / "escape-dir" / "secret.jpg").as_uri(), "outside the media roots"),
    (lambda m: (m["root"] / "missing.jpg").as_uri(), "file not found"),
    (lambda m: m["root"].as_uri(), "file not found"),  # the root folder itself is not an image
    (lambda m: "file://otherhost" + str(m["inside"]), "another host"),
    (lambda m: "file://" + str(m["inside"]) + "%00.jpg", "NUL"),
    (lambda m: "ftp://example.org/a.jpg", "scheme 'ftp'"),
    (lambda m: "javascript:alert(1)", "scheme 'javascript'"),
    (lambda m: "data:image/png;base64,AAAA", "scheme 'data'"),
    (lambda m: "https:///no-host.jpg", "without a host"),
    (lambda m: "https://example.org/logo.svg", "SVG"),
    (lambda m: "", "no URL"),
])
def test_media_refuses_everything_else(media, make_url, reason):
    """`..`, absolute paths outside the roots, symlink escapes, other hosts, NUL bytes, other
    schemes and bare paths are all refused with a reason, never an exception."""
    result = media["policy"].resolve(make_url(media))
    assert result.source is None and not result.available
    assert reason in result.reason


def test_media_http_urls_go_to_the_browser_unchanged_and_no_roots_means_no_local_files(media):
    """http(s) URLs are passed through as they are; with no media roots, no local file is shown."""
    policy = media["policy"]
    url = "https://images.example.org/a/b.jpg?size=large"
    assert policy.resolve(url).source == url
    assert policy.resolve("HTTP://example.org/x.png").source == "HTTP://example.org/x.png"
    assert MediaPolicy([]).resolve(media["inside"].as_uri()).reason == "no media roots configured"
    assert MediaPolicy([media["root"] / "not-there"]).roots == ()


# ----------------------------------------------------------------------------------- handlers
def test_search_results_become_gallery_items_with_captions(media, tmp_path):
    """A gateway answer becomes (image, '#rank · 0.973 · item_id') pairs in rank order: local
    files as real paths, http URLs as they are, and a placeholder for what cannot be shown."""
    hits = [_hit("cat-1", media["inside"].as_uri(), 0.9734),
            _hit("web-2", "https://example.org/dog.jpg", 0.5),
            _hit("gone-3", media["outside"].as_uri(), 0.25)]
    client = FakeGateway(hits)
    query = _jpeg(tmp_path / "query.jpg")
    view = _handlers(client, media["policy"]).search_image(str(query), k=3.0)

    assert view.ok and view.item_ids == ["cat-1", "web-2", "gone-3"]
    assert [text for _, text in view.gallery] == [
        "#1 · 0.973 · cat-1", "#2 · 0.500 · web-2", "#3 · 0.250 · gone-3"]
    assert view.gallery[0][0] == str(media["inside"].resolve())
    assert view.gallery[1][0] == "https://example.org/dog.jpg"
    assert isinstance(view.gallery[2][0], Image.Image)  # the placeholder tile
    assert view.unavailable == ["gone-3"]
    assert "**3 results**" in view.message and "1 image cannot be shown" in view.message
    assert re.fullmatch(r"embed 812 ms · index 1\.2 ms · gateway total 815 ms · round trip [\d.]+ ms · bundle v7",
                        view.timings), view.timings
    assert client.calls == [("image", query.stat().st_size, 3)]
    assert view.query.text == "Results for **the uploaded image**." and not view.query.replace_image


def test_gallery_items_are_accepted_by_gradio_gallery(media):
    """What the handlers return is a value Gradio's Gallery postprocesses: paths and URLs kept,
    captions attached (the page would otherwise fail to show results)."""
    import gradio as gr

    view = _handlers(FakeGateway([_hit("cat-1", media["inside"].as_uri(), 0.9),
                                  _hit("web-2", "https://example.org/dog.jpg", 0.5),
                                  _hit("gone-3", "ftp://x/y.jpg", 0.1)]), media["policy"]).search_id("cat-1")
    data = gr.Gallery().postprocess(view.gallery).model_dump()
    assert [item["caption"] for item in data] == [text for _, text in view.gallery]
    assert data[0]["image"]["path"] == str(media["inside"].resolve())
    assert data[1]["image"]["url"] == "https://example.org/dog.jpg"
    assert data[2]["image"]["path"]  # the placeholder, saved by Gradio


def test_k_limits_are_the_gateways_and_clicking_a_result_searches_by_its_id(media):
    """The gateway owns k: its status gives the default and the maximum. The page sends k = 0
    for the default (no k, 0, or the default it shows), k itself up to the maximum, and refuses
    more in a sentence that keeps the previous results, without asking the gateway. A click on
    result i searches by the id shown there; a stale click gives a message, not an error."""
    client = FakeGateway([_hit("x", "https://example.org/x.jpg", 1.0)], default_k=20, max_k=50)
    handlers = _handlers(client, media["policy"])
    text, limits = handlers.status_and_limits()
    assert limits == KLimits(20, 50, True) and handlers.limits == limits
    assert "**Results per search:** 20 by default, at most 50" in text
    for k in (None, "", 0, 20, 20.0, 50, 7):
        handlers.search_id("a", k=k)
    assert [call[2] for call in client.calls] == [0, 0, 0, 0, 0, 50, 7]
    client.calls.clear()
    for k in (51, 5000, -3, 2.5, "many"):
        view = handlers.search_id("a", k=k, previous=["old"])
        assert not view.ok and view.gallery is None and view.item_ids is None and view.query is None, k
        assert view.message.startswith("⚠️ **Not searched.**"), view.message
        assert view.message.endswith("The results below are from the previous search."), view.message
    assert "at most 50 results per search; 5000 is too many. Pick a k from 1 to 50." in \
        handlers.search_image(__file__, 5000).message
    assert client.calls == []

    view = handlers.select_hit(["p", "q", "r"], 1, 7)
    assert client.calls == [("id", "q", 7)]
    assert "similar to item q (result #2 of the previous search)" in view.message
    assert view.query.text == "Results for **item** q (result #2 of the previous search)."
    assert view.query.replace_image and view.query.image is None  # q is not among the hits: its id only
    stale = handlers.select_hit(["p"], 4, 7)
    assert stale.gallery is None and "no longer on the page" in stale.message
    assert len(client.calls) == 1


def test_without_the_gateways_limits_the_gateway_judges_k(media):
    """Before any status (or with an older gateway that does not send limits), the page shows
    stand-in limits, sends their default as k = 0 and any other k as it is: the gateway refuses
    what it does not allow, and the refusal is shown."""
    client = FakeGateway([_hit("x", "https://example.org/x.jpg", 1.0)], default_k=0, max_k=0)
    handlers = _handlers(client, media["policy"])
    assert handlers.status_and_limits()[1] == UNKNOWN_LIMITS and not UNKNOWN_LIMITS.from_gateway
    handlers.search_id("a", k=UNKNOWN_LIMITS.default_k)
    handlers.search_id("a", k=5000)
    assert [call[2] for call in client.calls] == [0, 5000]
    down = _handlers(FakeGateway(error=RpcError(grpc.StatusCode.UNAVAILABLE, "down")), media["policy"])
    assert down.status_and_limits()[1] is None and down.limits == UNKNOWN_LIMITS
    refused = _handlers(FakeGateway(error=RpcError(grpc.StatusCode.INVALID_ARGUMENT, "ask for at most 1000")),
                        media["policy"]).search_id("a", k=5000, previous=["old"])
    assert "The request was refused: ask for at most 1000." in refused.message and refused.gallery is None


def test_the_filter_box_filters_every_kind_of_search(media, tmp_path):
    """The filter box's conditions (the CLI's syntax, ';'-separated) go with image searches and clicks; the
    message says what the results were filtered on, and why there are none when nothing matches."""
    client = FakeGateway([_hit("x", "https://example.org/x.jpg", 1.0)])
    handlers = _handlers(client, media["policy"])
    view = handlers.search_image(str(_jpeg(tmp_path / "q.jpg")), filter_text="country=fr; year>=2010")
    assert view.ok and "for the uploaded image among items with country=fr; year\\>=2010, best first" in view.message
    handlers.select_hit(["p", "q"], 1, filter_text=" tag in a,b ")
    handlers.search_id("p", filter_text="  ")
    assert client.filters == [filters.to_proto(filters.parse_filter("country=fr; year>=2010")),
                              filters.to_proto(filters.parse_filter("tag in a,b")), None]
    empty = _handlers(FakeGateway([]), media["policy"]).search_id("p", filter_text="country=xx")
    assert "**No results** similar to item p among items with country=xx: no indexed item meets the filter." \
        == empty.message


def test_a_malformed_filter_is_refused_in_a_sentence_without_searching(media, tmp_path):
    client = FakeGateway([_hit("x", "https://example.org/x.jpg", 1.0)])
    view = _handlers(client, media["policy"]).search_image(str(_jpeg(tmp_path / "q.jpg")), previous=["old"],
                                                           filter_text="country=fr; year>=soon")
    assert not view.ok and view.gallery is None and client.calls == []
    assert view.message.startswith("⚠️ **Not searched.** The filter cannot be used: filter on 'year': 'soon' is "
                                   "neither a number nor an ISO 8601 date")
    assert view.message.endswith("The results below are from the previous search.")


def test_search_by_id_shows_the_searched_item_in_the_query_panel(media):
    """After a click (search by id) the query panel shows the clicked item: its own image when
    the answer has it as a local image the UI may show, and its full id."""
    hits = [_hit("cat one", media["inside"].as_uri(), 1.0), _hit("web-2", "https://example.org/dog.jpg", 0.5)]
    handlers = _handlers(FakeGateway(hits), media["policy"])
    view = handlers.select_hit(["x", "cat one"], 1, None)
    assert view.query.replace_image and view.query.image == str(media["inside"].resolve())
    assert view.query.text == "Results for **item** cat one (result #2 of the previous search)."
    view = handlers.search_id("web-2")  # an http image: the UI does not fetch it, the id is shown
    assert view.query.replace_image and view.query.image is None and "web-2" in view.query.text


@pytest.mark.parametrize("code, details, kind, expected", [
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", "image",
     "The search service is not reachable right now (gateway gw:50050): failed to connect to all addresses."),
    (grpc.StatusCode.INVALID_ARGUMENT, "not an image: cannot identify image file", "image",
     "This image could not be used: not an image: cannot identify image file."),
    (grpc.StatusCode.NOT_FOUND, "no item 'zz' in bundle v7", "id", "Not found: no item 'zz' in bundle v7."),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", "image", "did not answer within 60 s"),
    (grpc.StatusCode.FAILED_PRECONDITION, "model fingerprint differs", "image", "not ready: model fingerprint differs"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests", "id", "busy (too many requests)"),
    (grpc.StatusCode.INTERNAL, "internal error", "id", "The search failed (INTERNAL): internal error."),
    (grpc.StatusCode.INVALID_ARGUMENT, "filter field 'colour' is not a metadata field of the items of bundle v7; "
     "its fields are: country, year", "image", "The filter was refused: filter field 'colour' is not a metadata field"),
])
def test_gateway_errors_become_readable_messages(media, tmp_path, code, details, kind, expected):
    """Each gRPC failure becomes a sentence saying what happened; the previous results stay (the
    gallery is left unchanged) and the message says they are from the previous search."""
    handlers = _handlers(FakeGateway(error=RpcError(code, details)), media["policy"])
    if kind == "image":
        view = handlers.search_image(str(_jpeg(tmp_path / "q.jpg")), 5, previous=["old"])
    else:
        view = handlers.search_id("zz", 5, previous=["old"])
    assert not view.ok and view.gallery is None and view.item_ids is None
    assert view.message.startswith("⚠️ **Search failed.**") and expected in view.message
    assert view.message.endswith("The results below are from the previous search.")


def test_bad_input_and_unexpected_errors_do_not_raise(media, tmp_path):
    """No image, an empty or oversized file, and a bug in the client all become messages."""
    client = FakeGateway(error=ZeroDivisionError("boom"))
    handlers = _handlers(client, media["policy"], max_upload_bytes=100)
    assert "Upload or paste an image" in handlers.search_image(None).message
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert "empty" in handlers.search_image(str(tmp_path / "empty.jpg")).message
    assert "too large" in handlers.search_image(str(_jpeg(tmp_path / "big.jpg"))).message
    assert "could not be read" in handlers.search_image(str(tmp_path / "missing.jpg")).message
    assert client.calls == []
    handlers.max_upload_bytes = 1 << 20
    view = handlers.search_image(str(_jpeg(tmp_path / "ok.jpg")))
    assert "unexpected error" in view.message and "boom" not in view.message and "Traceback" not in view.message


def test_a_real_unreachable_gateway_gives_a_readable_message(media, tmp_path):
    """Through the real GatewayClient, a gateway that is not listening is reported as not
    reachable (UNAVAILABLE), for searches and for the status panel."""
    import socket

    from cbir.client import GatewayClient

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with GatewayClient(f"127.0.0.1:{port}", timeout_s=10) as client:
        handlers = _handlers(client, media["policy"], gateway_target=f"127.0.0.1:{port}")
        view = handlers.search_image(str(_jpeg(tmp_path / "q.jpg")))
        status = handlers.status()
    assert f"not reachable right now (gateway 127.0.0.1:{port})" in view.message
    assert status.startswith("**Status unavailable.** The search service is not reachable")


def test_status_panel_shows_index_model_and_upstreams(media):
    """The status panel lists item count, bundle version, model and each upstream's state."""
    text = _handlers(FakeGateway(), media["policy"]).status()
    assert "- **Index:** 12,345 images · bundle 20250101-000000 · angular · 512-d · 30 trees" in text
    assert "**Model:** vgg16 gem gem(p=3) · 512-d · weights keras-cache · fingerprint 0123456789ab" in text
    assert "**Compatible:** yes" in text
    assert "- **Embedder:** SERVING at dns:///embedder:50051\n" in text
    assert text.endswith("- **Indexer:** UNREACHABLE at indexer:50052 — connection refused")
    empty = format_status(gateway_pb2.GetStatusResponse(detail="indexer unreachable"))
    assert "**Index:** not reachable" in empty and "**Compatible:** no — indexer unreachable" in empty


def test_caption_format():
    """Captions read '#rank · score · item_id', score with three decimals: rank and score first,
    so a long id is what the page's one-line ellipsis cuts (the tooltip has the whole caption)."""
    assert caption(3, _hit("img_42", "", 0.97349)) == "#3 · 0.973 · img_42"


def test_caption_shows_the_match_class():
    """A hit the indexer classed (same image / copy / similar) says so right after its score; a copy reads
    "copy of" its id."""
    from cbir.v1 import common_pb2

    copy = common_pb2.Hit(item_id="img_7", score=0.41, inliers=57, match="copy")
    same = common_pb2.Hit(item_id="img_8", score=0.99, match="same_image")
    similar = common_pb2.Hit(item_id="img_9", score=0.86, match="similar")
    assert caption(1, copy) == "#1 · 0.410 · copy of img_7"
    assert caption(2, same) == "#2 · 0.990 · same image · img_8"
    assert caption(3, similar) == "#3 · 0.860 · similar · img_9"


# ----------------------------------------------------------------------------------- HTTP
def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_http_serves_media_roots_only_and_metrics(media):
    """Over HTTP, the UI's Gradio server serves files inside the media roots and refuses (403)
    files outside them, `..` paths, symlinks that escape, and URLs (no fetching on a caller's
    behalf); /metrics on the same port counts UI searches by outcome."""
    from ui.server import UiServer

    client = FakeGateway([_hit("cat-1", media["inside"].as_uri(), 0.9)])
    server = UiServer(UiSettings(port=0, media_roots=[media["root"]], log_level="WARNING"), client)
    url = server.start()
    try:
        file_url = url + "gradio_api/file="
        status, body = _get(file_url + urllib.parse.quote(str(media["inside"])))
        assert status == 200 and body == media["inside"].read_bytes()
        for refused in [str(media["outside"]), "/etc/passwd",
                        str(media["root"] / "a" / ".." / ".." / "private" / "secret.jpg"),
                        str(media["root"]) + "/%2e%2e/private/secret.jpg",
                        str(media["root"] / "escape.jpg"), str(media["root"] / "escape-dir" / "secret.jpg"),
                        str(Path(__file__).resolve())]:
            path = refused if "%2e" in refused else urllib.parse.quote(refused)
            assert _get(file_url + path)[0] == 403, refused

        status, page = _get(url)
        assert status == 200 and b"cbir" in page
        for remote in ["https://example.org/a.jpg", "http%3A//127.0.0.1:1/x", "HTTPS://example.org/"]:
            assert _get(file_url + remote) == (403, b"The cbir UI does not fetch URLs for its clients."), remote

        # a search through the page's handler, then its traces in /metrics
        from ui import metrics
        before = metrics.SEARCHES.labels("image", "no_input")._value.get()
        from ui.handlers import SearchHandlers
        SearchHandlers(client, media["policy"], max_upload_bytes=1, gateway_target="",
                       timeout_s=1).search_image(None)
        status, text = _get(url + "metrics")
        assert status == 200
        line = f'cbir_ui_searches_total{{kind="image",outcome="no_input"}} {before + 1.0}'
        assert line in text.decode()
        assert "# TYPE cbir_ui_search_seconds histogram" in text.decode()
    finally:
        server.stop()


def test_build_app_makes_the_page(media):
    """The Blocks page builds from settings and a client: query image and what was searched by,
    a k box (stand-in limits until the gateway's status arrives), search button, results
    gallery that grows with its rows, status panel."""
    from ui.app import build_app

    blocks = build_app(UiSettings(media_roots=[media["root"]]), FakeGateway())
    config = blocks.get_config_file()
    by_id = {c["props"].get("elem_id"): c for c in config["components"] if c["props"].get("elem_id")}
    assert {"query", "query-info", "k", "search", "results", "status", "message", "timings",
            "refresh-status"} <= set(by_id)
    assert by_id["k"]["props"]["value"] == UNKNOWN_LIMITS.default_k
    assert by_id["k"]["props"]["info"] == UNKNOWN_LIMITS.describe()
    assert by_id["results"]["props"]["allow_preview"] is False
    assert by_id["results"]["props"]["height"] == "auto"
    assert not config["analytics_enabled"]


def test_k_box_hands_over_any_number(media):
    """The k box has no bounds of its own (a slider clamps a typed k silently; Gradio's bounds
    check fails the search with 'Error' pills): any whole number reaches the handler, which
    refuses one above the gateway's maximum in a sentence."""
    from ui.app import build_app

    blocks = build_app(UiSettings(media_roots=[media["root"]]), FakeGateway())
    (k,) = [c for c in blocks.blocks.values() if getattr(c, "elem_id", None) == "k"]
    assert (k.minimum, k.maximum, k.precision) == (None, None, 0)
    assert k.preprocess(5000) == 5000 and k.preprocess(None) is None


def test_query_image_hands_over_the_upload_unopened(tmp_path):
    """The query image component gives the handler the uploaded file's path without opening it
    with Pillow (plain gr.Image fails before the handler on a non-image), and still renders as an
    Image in the browser."""
    import gradio as gr
    from gradio.data_classes import ImageData

    from ui.app import QueryImage

    garbage = tmp_path / "x.jpg"
    garbage.write_bytes(b"not an image")
    payload = ImageData(path=str(garbage), orig_name="x.jpg")
    assert QueryImage(type="filepath").preprocess(payload) == str(garbage)
    with pytest.raises(Exception):
        gr.Image(type="filepath").preprocess(payload)
    assert QueryImage().preprocess(None) is None
    assert QueryImage().get_block_name() == "image"
