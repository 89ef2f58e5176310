"""Search by URL, safe against SSRF, and the downloader under it (`cbir.download`).

A local HTTP server (http.server on 127.0.0.1:0) plays the image host: good images, redirects
(to itself or to private addresses), huge and trickling bodies, HTML, errors. Loopback is refused
by default, so the tests that must reach it allow exactly 127.0.0.1/32 by configuration; the
table of attacks runs against the gateway's default policy and proves that nothing is connected
to. The gateway is the real one in front of the session's real embedder (VGG-16, random weights)
and indexer.
"""

from __future__ import annotations

import http.server
import io
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from PIL import Image

from cbir.client import GatewayClient
from cbir.download import (
    Downloader,
    FetchLimits,
    FetchTimeout,
    HttpStatus,
    NetworkError,
    TooLarge,
    UrlPolicy,
    UrlRefused,
    WrongContentType,
    parse_url,
)
from services.gateway.server import GatewayServer
from services.gateway.settings import GatewaySettings

DEMO = Path(__file__).resolve().parents[1] / "demo" / "photos"
StatusCode = grpc.StatusCode


def png(rgb=(200, 30, 30), size=32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


class QuietHTTPServer(http.server.ThreadingHTTPServer):
    """The tests cut connections on purpose (size limits, timeouts): a reset peer is no news."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class ImageServer:
    """http.server in a thread on 127.0.0.1:0 with misbehaving routes; counts hits per path and
    records how many requests per path prefix were in progress at once."""

    def __init__(self):
        self.hits: Counter[str] = Counter()
        self.in_flight = 0
        self.held = 0  # /hold requests being held now, and the most at once
        self.max_held = 0
        self.lock = threading.Lock()
        self.release = threading.Event()  # ends /hold and /stall early at teardown
        self.flaky_failures = 2
        self.files: dict[str, bytes] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with server.lock:
                    server.hits[self.path] += 1
                    server.in_flight += 1
                try:
                    server.route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_port
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    @staticmethod
    def send(handler, status: int, body: bytes = b"", content_type: str = "image/png", headers=None, length=True):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        if length:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if body:
            handler.wfile.write(body)

    def route(self, h) -> None:
        path = h.path.split("?", 1)[0]
        if path.startswith("/img/"):
            name = path[len("/img/"):]
            data = self.files.get(name)
            self.send(h, 200, data) if data is not None else self.send(h, 404, b"no", "text/plain")
        elif path == "/redirect-local":
            self.send(h, 302, headers={"Location": "/img/red.png"})
        elif path.startswith("/redirect-to/"):
            self.send(h, 302, headers={"Location": h.path[len("/redirect-to/"):]})
        elif path == "/redirect-loop":
            self.send(h, 302, headers={"Location": "/redirect-loop"})
        elif path == "/huge-declared":
            self.send(h, 200, headers={"Content-Length": str(10**9)}, length=False)
        elif path == "/huge-streamed":  # no Content-Length: the size shows only as bytes arrive
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Connection", "close")
            h.end_headers()
            for _ in range(64):
                h.wfile.write(b"\0" * 65536)
        elif path == "/trickle":  # a valid header, then one byte every 100 ms
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Length", "100000")
            h.end_headers()
            for _ in range(1000):
                if self.release.wait(0.1):
                    return
                h.wfile.write(b"x")
                h.wfile.flush()
        elif path == "/stall":  # never answers
            self.release.wait(30)
        elif path == "/html":
            self.send(h, 200, b"<html>not an image</html>", "text/html")
        elif path == "/gzip":
            self.send(h, 200, b"\x1f\x8b" + b"\0" * 20, "image/png", {"Content-Encoding": "gzip"})
        elif path == "/flaky.png":  # 503 twice, then the image
            if self.hits[h.path] <= self.flaky_failures:
                self.send(h, 503, b"busy", "text/plain", {"Retry-After": "0"})
            else:
                self.send(h, 200, self.files["red.png"])
        elif path.startswith("/status/"):
            self.send(h, int(path.rsplit("/", 1)[1]), b"nope", "text/plain")
        elif path.startswith("/hold/"):  # held until released: shows how many run at once
            # Counted while held, before the answer is written: a client that has its answer can no longer be
            # counted (in_flight, which ends when the handler thread does, can still count a finished request).
            with self.lock:
                self.held += 1
                self.max_held = max(self.max_held, self.held)
            self.release.wait(float(h.path.rsplit("=", 1)[1]) if "=" in h.path else 0.3)
            with self.lock:
                self.held -= 1
            self.send(h, 200, self.files["red.png"])
        else:
            self.send(h, 404, b"no", "text/plain")

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image_server():
    server = ImageServer()
    server.files["red.png"] = png((220, 20, 20))
    server.files["photo.jpg"] = (DEMO / "skimage-coffee.jpg").read_bytes()
    server.files["notes.png"] = b"this is text pretending to be a PNG"
    yield server
    server.close()


LOCAL_ONLY = UrlPolicy.build(allow_networks=["127.0.0.1/32"])


def downloader(policy=LOCAL_ONLY, **limits) -> Downloader:
    defaults = dict(timeout_s=5.0, connect_timeout_s=2.0, retries=0)
    return Downloader(policy, FetchLimits(**{**defaults, **limits}))


# --- the downloader -------------------------------------------------------------------------------


def test_a_good_image_is_fetched_with_its_content_type_and_redirects_followed(image_server):
    d = downloader()
    fetched = d.fetch(image_server.url("/img/red.png"))
    assert fetched.data == image_server.files["red.png"] and fetched.content_type == "image/png"
    fetched = d.fetch(image_server.url("/redirect-local"))
    assert fetched.data == image_server.files["red.png"] and fetched.url.endswith("/img/red.png")


@pytest.mark.parametrize(
    "path, error, words",
    [
        ("/huge-declared", TooLarge, "1000000000 bytes, over the 100000-byte limit"),
        ("/huge-streamed", TooLarge, "over the 100000-byte limit"),
        ("/html", WrongContentType, "text/html, not an image"),
        ("/gzip", WrongContentType, "gzip-encoded"),
        ("/status/404", HttpStatus, "HTTP 404"),
        ("/status/403", HttpStatus, "HTTP 403"),
        ("/redirect-loop", UrlRefused, "redirects more than 2 times"),
        ("/redirect-to/http://10.1.2.3/x.png", UrlRefused, "10.1.2.3, a private address"),
        ("/redirect-to/http://169.254.169.254/latest/meta-data", UrlRefused, "link-local"),
        ("/redirect-to/http://127.0.0.2/x", UrlRefused, "127.0.0.2, a loopback address"),
        ("/redirect-to/file:///etc/passwd", UrlRefused, "only http and https"),
        ("/redirect-to/gopher://127.0.0.1:25/x", UrlRefused, "only http and https"),
    ],
)
def test_bad_answers_and_redirects_are_refused_with_the_reason(image_server, path, error, words):
    """Size limits (declared and streamed), content type and encoding, HTTP errors, redirect loops and
    redirects to private, link-local or other loopback addresses or to other schemes: each refused,
    permanent (not retried), saying why."""
    with pytest.raises(error) as caught:
        downloader(max_bytes=100_000, max_redirects=2).fetch(image_server.url(path))
    assert words in str(caught.value)
    assert not caught.value.transient
    assert image_server.hits[path] == (3 if path == "/redirect-loop" else 1)  # the loop: first URL + 2 redirects


@pytest.mark.parametrize("path", ["/trickle", "/stall"])
def test_a_slow_body_or_a_silent_server_is_cut_off_at_the_time_limit(image_server, path):
    """One byte every 100 ms (each read is quick, the whole is not) and a server that never answers both end
    in FetchTimeout at the total limit (1 s), not at the socket's per-read timeout or never."""
    d = downloader(timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(FetchTimeout):
        d.fetch(image_server.url(path))
    assert time.monotonic() - started < 10  # a generous bound: the point is that it ends


def test_transient_failures_are_retried_with_backoff_and_permanent_ones_are_not(image_server):
    """503 twice then 200: three attempts, backing off as told (Retry-After: 0) between them; a 404 is tried
    once; with too few retries the failure says how many attempts were made."""
    waits: list[float] = []
    d = Downloader(LOCAL_ONLY, FetchLimits(retries=3, backoff_s=0.5), sleep=waits.append)
    fetched = d.fetch(image_server.url("/flaky.png"))
    assert fetched.data == image_server.files["red.png"] and fetched.attempts == 3
    assert waits == [0.0, 0.0]  # Retry-After: 0 wins over the backoff
    with pytest.raises(HttpStatus):
        d.fetch(image_server.url("/status/404"))
    assert image_server.hits["/status/404"] == 1

    image_server.hits.clear()
    stubborn = Downloader(LOCAL_ONLY, FetchLimits(retries=1, backoff_s=0.01), sleep=waits.append)
    with pytest.raises(HttpStatus, match=r"HTTP 503 .*after 2 attempts") as caught:
        stubborn.fetch(image_server.url("/flaky.png"))
    assert caught.value.transient


def test_backoff_doubles_with_jitter_between_connection_failures():
    """Nothing listens: each attempt fails to connect (transient); waits grow 0.1, 0.2, 0.4 (±20 %)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    waits: list[float] = []
    d = Downloader(LOCAL_ONLY, FetchLimits(retries=3, backoff_s=0.1, connect_timeout_s=1), sleep=waits.append)
    with pytest.raises(NetworkError, match="Connection refused"):
        d.fetch(f"http://127.0.0.1:{port}/x.png")
    assert len(waits) == 3
    for wait, nominal in zip(waits, [0.1, 0.2, 0.4]):
        assert 0.8 * nominal <= wait <= 1.2 * nominal


def test_at_most_per_host_downloads_run_at_once(image_server):
    """8 threads fetch slow images from one host with per_host=2: the server never sees more than 2 at once."""
    d = downloader(per_host=2)
    threads = [threading.Thread(target=d.fetch, args=(image_server.url(f"/hold/{i}?t=0.2"),)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sum(image_server.hits[f"/hold/{i}?t=0.2"] for i in range(8)) == 8
    assert image_server.max_held == 2


def test_a_name_is_resolved_once_and_the_checked_address_is_the_one_connected_to(image_server):
    """DNS rebinding: the first answer for `images.test` is 127.0.0.1 (allowed here), later answers would be
    10.0.0.1. The download looks the name up once, connects to 127.0.0.1, and sends Host: images.test."""
    answers = iter([["127.0.0.1"], ["10.0.0.1"], ["10.0.0.1"]])
    lookups = []

    def resolve(host, port):
        lookups.append(host)
        return next(answers)

    d = Downloader(LOCAL_ONLY, FetchLimits(retries=0), resolve=resolve)
    fetched = d.fetch(f"http://images.test:{image_server.port}/img/red.png")
    assert fetched.data == image_server.files["red.png"]
    assert lookups == ["images.test"] and d.connections == [("127.0.0.1", image_server.port)]


@pytest.mark.parametrize("answer, words", [
    (["10.0.0.7"], "private"), (["127.0.0.1"], "loopback"), (["169.254.169.254"], "link-local"),
    (["93.184.216.34", "192.168.1.1"], "private"), (["::1"], "loopback"), (["fe80::1%eth0"], "link-local"),
    (["::ffff:10.0.0.1"], "private"), (["2002:a00:1::"], "private"), (["100.64.0.1"], "not a public"),
    (["0.0.0.0"], "unspecified"), (["224.0.0.1"], "multicast"), (["fd00::1"], "private"),
])
def test_a_name_resolving_to_any_non_public_address_is_refused_before_connecting(answer, words):
    """Under the default policy a host name that resolves (even partly) to loopback, private, link-local,
    CGNAT, unspecified, multicast, IPv4-mapped or 6to4-wrapped private addresses is refused, and no
    connection is opened."""
    d = Downloader(UrlPolicy(), FetchLimits(retries=0), resolve=lambda host, port: answer)
    with pytest.raises(UrlRefused, match=words):
        d.fetch("http://innocent-looking.example/cat.jpg")
    assert d.connections == []


@pytest.mark.parametrize("url, words", [
    ("ftp://example.com/a.jpg", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
    ("gopher://example.com:70/", "only http and https"),
    ("data:image/png;base64,iVBORw0KGgo=", "only http and https"),
    ("javascript:alert(1)", "only http and https"),
    ("//example.com/a.jpg", "only http and https"),
    ("http://user:secret@example.com/a.jpg", "user name or password"),
    ("http://example.com@127.0.0.1/", "user name or password"),
    ("http://exa mple.com/", "spaces, control characters"),
    ("http://example.com\\@127.0.0.1/", "backslashes"),
    ("http:///nohost", "no host"),
    ("http://example.com:99999/", "cannot be parsed"),
    ("http://" + "a" * 3000 + ".com/", "more than 2048"),
    ("", "empty"),
])
def test_urls_of_the_wrong_form_are_refused_before_any_lookup(url, words):
    with pytest.raises(UrlRefused, match=words):
        parse_url(url)


# --- SearchByUrl at the gateway -------------------------------------------------------------------


@pytest.fixture
def url_gateway(stack):
    """A gateway in front of the session's real embedder and indexer, with URL settings per test."""
    started = []

    def start(**settings) -> GatewayClient:
        defaults = dict(port=0, metrics_port=None, embedder_target=stack.embedder, indexer_target=stack.indexer,
                        url_timeout_s=2.0, url_retries=0)
        gateway = GatewayServer(GatewaySettings(**{**defaults, **settings}))
        gateway.start_serving()
        client = GatewayClient(f"127.0.0.1:{gateway.port}", timeout_s=30)
        started.append((gateway, client))
        return client

    yield start
    for gateway, client in started:
        client.close()
        gateway.stop(0)


@pytest.mark.slow
def test_search_by_url_finds_the_image_like_search_by_image(url_gateway, image_server):
    """With 127.0.0.1/32 allowed by configuration, a photo served over HTTP is found as itself: same hits as
    SearchByImage with its bytes; the response tells the size, type and download time."""
    client = url_gateway(url_allow_networks=["127.0.0.1/32"])
    by_url = client.search_url(image_server.url("/img/photo.jpg"), k=5)
    by_bytes = client.search_image(image_server.files["photo.jpg"], k=5)
    assert [h.item_id for h in by_url.hits] == [h.item_id for h in by_bytes.hits]
    assert by_url.hits[0].item_id == "skimage-coffee.jpg"
    assert (by_url.image_bytes, by_url.content_type) == (len(image_server.files["photo.jpg"]), "image/png")
    assert by_url.timings.fetch_ms > 0 and by_url.timings.total_ms >= by_url.timings.fetch_ms


ATTACKS = [
    # (url path or URL, code, words in the message) against the default policy: nothing non-public
    ("LOCAL/img/photo.jpg", StatusCode.INVALID_ARGUMENT, "127.0.0.1, a loopback address"),
    ("http://localhost:PORT/img/photo.jpg", StatusCode.INVALID_ARGUMENT, "localhost resolves to"),
    ("http://127.1:PORT/img/photo.jpg", StatusCode.INVALID_ARGUMENT, "loopback"),
    ("http://2130706433:PORT/img/photo.jpg", StatusCode.INVALID_ARGUMENT, "loopback"),
    ("http://0x7f.0.0.1:PORT/img/photo.jpg", StatusCode.INVALID_ARGUMENT, "loopback"),
    ("http://[::1]:PORT/img/photo.jpg", StatusCode.INVALID_ARGUMENT, "loopback"),
    ("http://[::ffff:127.0.0.1]:PORT/img/photo.jpg", StatusCode.INVALID_ARGUMENT, "loopback"),
    ("http://0.0.0.0:PORT/img/photo.jpg", StatusCode.INVALID_ARGUMENT, "unspecified"),
    ("http://10.0.0.1/img.png", StatusCode.INVALID_ARGUMENT, "private"),
    ("http://192.168.0.1/img.png", StatusCode.INVALID_ARGUMENT, "private"),
    ("http://172.16.5.4/img.png", StatusCode.INVALID_ARGUMENT, "private"),
    ("http://169.254.169.254/latest/meta-data/", StatusCode.INVALID_ARGUMENT, "link-local"),
    ("http://[fe80::1]/img.png", StatusCode.INVALID_ARGUMENT, "link-local"),
    ("file:///etc/passwd", StatusCode.INVALID_ARGUMENT, "only http and https"),
    ("ftp://example.com/cat.jpg", StatusCode.INVALID_ARGUMENT, "only http and https"),
    ("gopher://127.0.0.1:6379/_INFO", StatusCode.INVALID_ARGUMENT, "only http and https"),
    ("http://user:pw@example.com/cat.jpg", StatusCode.INVALID_ARGUMENT, "user name or password"),
    ("not a url", StatusCode.INVALID_ARGUMENT, "spaces"),
    ("", StatusCode.INVALID_ARGUMENT, "url is empty"),
]


@pytest.mark.slow
@pytest.mark.parametrize("url, code, words", ATTACKS)
def test_search_by_url_refuses_what_the_default_policy_forbids(url_gateway, image_server, url, code, words):
    """The gateway's defaults: loopback in every spelling, private, link-local (cloud metadata), other schemes,
    credentials in URLs: INVALID_ARGUMENT saying why, and the local server never sees a request."""
    client = url_gateway()
    url = url.replace("LOCAL", f"http://127.0.0.1:{image_server.port}").replace("PORT", str(image_server.port))
    with pytest.raises(grpc.RpcError) as caught:
        client.search_url(url, k=3)
    assert caught.value.code() is code
    assert words in caught.value.details()
    assert sum(image_server.hits.values()) == 0


@pytest.mark.slow
@pytest.mark.parametrize("path, code, words", [
    ("/redirect-to/http://10.0.0.1/secret", StatusCode.INVALID_ARGUMENT, "10.0.0.1, a private address"),
    ("/redirect-to/http://169.254.169.254/latest/meta-data/", StatusCode.INVALID_ARGUMENT, "link-local"),
    ("/redirect-to/http://127.0.0.2:PORT/img/photo.jpg", StatusCode.INVALID_ARGUMENT, "127.0.0.2, a loopback"),
    ("/huge-declared", StatusCode.INVALID_ARGUMENT, "over the 1048576-byte limit"),
    ("/huge-streamed", StatusCode.INVALID_ARGUMENT, "over the 1048576-byte limit"),
    ("/trickle", StatusCode.DEADLINE_EXCEEDED, "took longer than 2 s"),
    ("/stall", StatusCode.DEADLINE_EXCEEDED, "took longer than 2 s"),
    ("/html", StatusCode.INVALID_ARGUMENT, "text/html, not an image"),
    ("/img/notes.png", StatusCode.INVALID_ARGUMENT, "not an image Pillow can read"),
    ("/status/404", StatusCode.INVALID_ARGUMENT, "HTTP 404"),
    ("/status/502", StatusCode.UNAVAILABLE, "HTTP 502"),
])
def test_url_attacks_from_an_allowed_host_are_refused(url_gateway, image_server, path, code, words):
    """With only 127.0.0.1 allowed: a redirect to a private, link-local or another loopback name, a huge body
    (declared or streamed), a trickling or silent server, HTML, bytes that are not an image and HTTP
    errors each end with a clear status; nothing reaches the indexer with a bad image."""
    client = url_gateway(url_allow_networks=["127.0.0.1/32"], url_max_bytes=1024 * 1024)
    with pytest.raises(grpc.RpcError) as caught:
        client.search_url(image_server.url(path.replace("PORT", str(image_server.port))), k=3)
    assert caught.value.code() is code, caught.value.details()
    assert words in caught.value.details()


@pytest.mark.slow
def test_url_allow_private_admits_loopback_and_the_environment_sets_it(url_gateway, image_server, monkeypatch):
    """CBIR_GATEWAY_URL_ALLOW_PRIVATE=true (read from the environment) admits loopback as well."""
    monkeypatch.setenv("CBIR_GATEWAY_URL_ALLOW_PRIVATE", "true")
    assert GatewaySettings().url_allow_private is True
    client = url_gateway(url_allow_private=GatewaySettings().url_allow_private)
    assert client.search_url(image_server.url("/img/photo.jpg"), k=1).hits[0].item_id == "skimage-coffee.jpg"


@pytest.mark.slow
def test_more_downloads_at_once_than_allowed_get_resource_exhausted(url_gateway, image_server):
    """url_max_concurrent=2: while two downloads are held, a third search by URL is refused at once with
    RESOURCE_EXHAUSTED (no queue); once they end, downloads are accepted again."""
    client = url_gateway(url_allow_networks=["127.0.0.1/32"], url_max_concurrent=2, url_per_host=4)
    results: list[object] = []

    def held(i):
        try:
            results.append(client.search_url(image_server.url(f"/hold/{i}?t=3"), k=1))
        except grpc.RpcError as error:
            results.append(error.code())

    threads = [threading.Thread(target=held, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for _ in range(500):
        if image_server.in_flight == 2:
            break
        time.sleep(0.01)
    assert image_server.in_flight == 2
    with pytest.raises(grpc.RpcError) as caught:
        client.search_url(image_server.url("/img/red.png"), k=1)
    assert caught.value.code() is StatusCode.RESOURCE_EXHAUSTED
    image_server.release.set()
    for thread in threads:
        thread.join(30)
    assert len(results) == 2
    assert client.search_url(image_server.url("/img/red.png"), k=1).hits


@pytest.mark.slow
def test_the_ui_url_box_searches_through_the_gateway_and_shows_its_refusals(url_gateway, image_server):
    """The page's "URL of an image" box (ui.handlers.search_url) over the real gateway: an allowed URL shows
    the results; a refused one shows the gateway's reason; a non-http text is refused by the page itself."""
    from ui.handlers import SearchHandlers
    from ui.media import MediaPolicy

    client = url_gateway(url_allow_networks=["127.0.0.1/32"])
    handlers = SearchHandlers(client, MediaPolicy([]), max_upload_bytes=1 << 20,
                              gateway_target="gw", timeout_s=30)
    view = handlers.search_url(image_server.url("/img/photo.jpg"), k=3)
    assert view.ok and view.item_ids[0] == "skimage-coffee.jpg" and len(view.item_ids) == 3
    refused = handlers.search_url("http://169.254.169.254/latest/meta-data/", k=3)
    assert not refused.ok and "link-local" in refused.message and refused.gallery is None
    assert "Only http" in handlers.search_url("file:///etc/passwd").message
    assert "Paste the http(s) URL" in handlers.search_url("  ").message
