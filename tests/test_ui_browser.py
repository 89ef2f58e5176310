"""The web UI in a real browser: Debian's Chromium driven by Playwright, against a real gRPC
gateway double that answers from the demo photos, through the real `GatewayClient`.

Needs /usr/bin/chromium (`apt-get install chromium`); without it these tests fail, they do not skip.
"""

from __future__ import annotations

import io
import os
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from PIL import Image

from cbir.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore:::gradio.queueing"),  # Gradio's own pandas deprecation warnings
]

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "demo" / "photos"
CHROMIUM = os.environ.get("CBIR_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = Path("/tmp/cbir-ui.png")
WAIT_MS = 30_000  # every browser wait is bounded by this


# ----------------------------------------------------------------------------------- gateway double
class GatewayDouble(gateway_pb2_grpc.GatewayServicer):
    """A `cbir.v1.Gateway` answering from a few demo photos.

    SearchByImage: 5 demo photos (file:// URIs) with falling scores, then one hit whose file lies
    outside the UI's media roots (the UI must show a placeholder, never that file).
    SearchById: the item itself first, then 4 other demo photos: a different list.
    """

    OUTSIDE = ROOT / "pyproject.toml"  # a real file, not under demo/photos

    def __init__(self, photos: list[Path]):
        self.photos = photos
        self.ids = {p.stem: p for p in photos}
        self.requests: list[tuple] = []
        self._lock = threading.Lock()

    def _record(self, *request) -> None:
        with self._lock:
            self.requests.append(request)

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r[0] == kind)

    @staticmethod
    def _hits(photos, scores):
        return [common_pb2.Hit(item_id=p.stem, url=p.as_uri(), score=s, distance=1 - s) for p, s in zip(photos, scores)]

    def image_hits(self):
        hits = self._hits(self.photos[:5], [0.973, 0.912, 0.871, 0.802, 0.755])
        hits.append(common_pb2.Hit(item_id="outside-1", url=self.OUTSIDE.as_uri(), score=0.5, distance=0.5))
        return hits

    def id_hits(self, item_id):
        others = [p for p in self.photos[5:] if p.stem != item_id][:4]
        return self._hits([self.ids[item_id], *others], [1.0, 0.88, 0.81, 0.66, 0.61])

    def SearchByImage(self, request, context):
        self._record("image", request.k, len(request.image))
        try:
            Image.open(io.BytesIO(request.image)).verify()
        except Exception:  # noqa: BLE001
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not an image")
        return gateway_pb2.SearchByImageResponse(
            hits=self.image_hits(), bundle_version="test-v1",
            timings=gateway_pb2.Timings(embed_ms=40.0, index_ms=0.5, total_ms=41.0))

    def SearchById(self, request, context):
        self._record("id", request.k, request.item_id)
        if request.item_id not in self.ids:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no item {request.item_id!r} in bundle test-v1")
        return gateway_pb2.SearchByIdResponse(
            hits=self.id_hits(request.item_id), bundle_version="test-v1",
            timings=gateway_pb2.Timings(index_ms=0.3, total_ms=0.4))

    def GetStatus(self, request, context):
        return gateway_pb2.GetStatusResponse(
            upstreams=[gateway_pb2.UpstreamStatus(name="embedder", target="127.0.0.1:1", state="SERVING"),
                       gateway_pb2.UpstreamStatus(name="indexer", target="127.0.0.1:2", state="SERVING")],
            model=common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=512, weights_source="random:0",
                                       fingerprint="f" * 64),
            index=common_pb2.IndexInfo(item_count=len(self.photos), dimension=512, input_dimension=512,
                                       metric="angular", trees=10, bundle_version="test-v1"),
            compatible=True)


@pytest.fixture
def gateway():
    """A running gateway double on 127.0.0.1:0: yields (double, target, server)."""
    photos = sorted(PHOTOS.glob("*.jpg"))[:10]
    assert len(photos) == 10, f"demo photos missing in {PHOTOS}"
    double = GatewayDouble(photos)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    gateway_pb2_grpc.add_GatewayServicer_to_server(double, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield double, f"127.0.0.1:{port}", server
    server.stop(None)


@pytest.fixture
def ui(gateway):
    """The UI (real GatewayClient, media root = demo/photos) on a free port; yields its URL."""
    from cbir.client import GatewayClient
    from ui.server import UiServer
    from ui.settings import UiSettings

    _, target, _ = gateway
    settings = UiSettings(port=0, gateway_target=target, media_roots=[PHOTOS], request_timeout_s=20,
                          log_level="WARNING")
    client = GatewayClient(target, timeout_s=settings.request_timeout_s)
    server = UiServer(settings, client)
    url = server.start()
    yield url
    server.stop()
    client.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's Chromium with `apt-get install chromium` "
                    "(the browser tests drive it through Playwright)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, ui):
    """A fresh page on the UI; records requests that leave the UI's origin."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000},
                                  permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.foreign_requests = []
    page.on("request", lambda r: None if r.url.startswith(ui) else page.foreign_requests.append(r.url))
    page.goto(ui)
    page.locator("#query input[type=file]").wait_for(state="attached")
    yield page
    context.close()


# ----------------------------------------------------------------------------------- page helpers
def captions(page) -> list[str]:
    return page.locator("#results .caption-label").all_inner_texts()


def expect_captions(page, expected: list[str]) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#results .caption-label")).to_have_text(expected, timeout=WAIT_MS)


def wait_images_loaded(page, count: int) -> list[dict]:
    """Waits until the gallery holds `count` images, all decoded (naturalWidth > 0); returns them."""
    page.wait_for_function(
        """(n) => { const imgs = [...document.querySelectorAll('#results img')];
                    return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }""",
        arg=count, timeout=WAIT_MS)
    return page.eval_on_selector_all("#results img", "imgs => imgs.map(i => ({src: i.src, w: i.naturalWidth}))")


def wait_requests(double, kind: str, count: int) -> None:
    deadline = time.monotonic() + WAIT_MS / 1000
    while double.count(kind) < count:
        assert time.monotonic() < deadline, f"the gateway double got {double.count(kind)} {kind} searches, not {count}"
        time.sleep(0.05)


def page_text(page) -> str:
    return page.locator("body").inner_text()


def expected_image_captions(double) -> list[str]:
    hits = double.image_hits()
    return [f"#{r} · {h.item_id} · score {h.score:.3f}" + (" · image not available" if h.item_id == "outside-1" else "")
            for r, h in enumerate(hits, start=1)]


# ----------------------------------------------------------------------------------- tests
def test_search_shows_hit_images_and_clicking_a_hit_searches_by_it(gateway, page):
    """In Chromium: the status panel shows the index; uploading a demo photo searches and the
    gallery shows the hits' real images (decoded, naturalWidth > 0) with '#rank · id · score'
    captions, a placeholder for the hit outside the media roots, and the timings; Search sends
    the k set on the page; clicking a hit shows the gateway's SearchById answer for that item;
    no request leaves the UI's origin. Screenshot: /tmp/cbir-ui.png."""
    double, _, _ = gateway
    from playwright.sync_api import expect

    expect(page.locator("#status")).to_contain_text("10 images · bundle test-v1", timeout=WAIT_MS)
    expect(page.locator("#status")).to_contain_text("Indexer: SERVING at 127.0.0.1:2")

    # upload -> search by image (the upload itself triggers it)
    page.locator("#query input[type=file]").set_input_files(str(PHOTOS / "opencv-fruits.jpg"))
    expect_captions(page, expected_image_captions(double))
    images = wait_images_loaded(page, 6)
    assert all("/gradio_api/file=" + str(PHOTOS) in i["src"] for i in images[:5]), images
    assert not any(str(GatewayDouble.OUTSIDE) in i["src"] for i in images), images  # placeholder, not the file
    assert double.requests[0] == ("image", 12, (PHOTOS / "opencv-fruits.jpg").stat().st_size)
    expect(page.locator("#message")).to_contain_text("6 results for the uploaded image")
    expect(page.locator("#timings")).to_contain_text("embed 40 ms · index 0.5 ms")

    # the Search button, with k changed on the page
    k_input = page.locator("#k input[type=number]")
    k_input.fill("7")
    k_input.press("Enter")
    page.locator("#search").click()
    wait_requests(double, "image", 2)
    assert double.requests[-1][:2] == ("image", 7)
    expect_captions(page, expected_image_captions(double))

    # click hit #2 -> search by its id; the gallery changes to that answer
    clicked = double.image_hits()[1].item_id
    page.locator("#results button.thumbnail-item").nth(1).click()
    expected = [f"#{r} · {h.item_id} · score {h.score:.3f}" for r, h in enumerate(double.id_hits(clicked), start=1)]
    expect_captions(page, expected)
    wait_images_loaded(page, 5)
    assert double.requests[-1] == ("id", 7, clicked)
    classes = page.eval_on_selector_all("#results button.thumbnail-item", "bs => bs.map(b => b.className)")
    assert not any("selected" in c.split() for c in classes), classes  # no stale highlight from the click
    expect(page.locator("#message")).to_contain_text(f"similar to item {clicked} (result #2 of the previous search)")

    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert page.foreign_requests == []
    assert "Traceback" not in page_text(page)


def test_errors_are_readable_messages_and_the_page_keeps_working(gateway, page, tmp_path):
    """In Chromium: a file that is not an image gets the gateway's INVALID_ARGUMENT as a sentence;
    after a good search the gateway stops, and Search then shows a readable 'not reachable'
    message (no traceback, no Gradio error toast) and keeps the previous results; the status
    panel says the status is unavailable after a refresh."""
    double, target, server = gateway
    from playwright.sync_api import expect

    garbage = tmp_path / "not-an-image.jpg"
    garbage.write_bytes(b"this is not a JPEG" * 100)
    page.locator("#query input[type=file]").set_input_files(str(garbage))
    expect(page.locator("#message")).to_contain_text("This image could not be used: not an image.")
    assert double.requests == [("image", 12, garbage.stat().st_size)]

    page.locator("#query button[aria-label='Remove Image']").click()
    page.locator("#query input[type=file]").set_input_files(str(PHOTOS / "opencv-fruits.jpg"))
    expect_captions(page, expected_image_captions(double))

    server.stop(None)  # the gateway goes away
    page.locator("#search").click()
    message = page.locator("#message")
    expect(message).to_contain_text("Search failed.", timeout=WAIT_MS)
    expect(message).to_contain_text(f"not reachable right now (gateway {target})")
    expect(message).to_contain_text("results below are from the previous search")
    assert captions(page) == expected_image_captions(double)

    page.locator("#refresh-status").click()
    expect(page.locator("#status")).to_contain_text("Status unavailable.")
    page.screenshot(path=str(SCREENSHOT.with_name("cbir-ui-error.png")), full_page=True)

    text = page_text(page)
    assert "Traceback" not in text and 'File "' not in text
    assert page.locator(".toast-body.error").count() == 0


def test_pasting_an_image_searches(gateway, page):
    """In Chromium: an image put on the clipboard and pasted into the query box (the 'Paste from
    clipboard' source) is searched at once, and the gallery shows the hits."""
    import base64

    double, _, _ = gateway
    photo = PHOTOS / "opencv-baboon.jpg"
    page.evaluate(
        """async (b64) => {
            const img = new Image(); img.src = 'data:image/jpeg;base64,' + b64; await img.decode();
            const canvas = document.createElement('canvas');
            canvas.width = img.width; canvas.height = img.height;
            canvas.getContext('2d').drawImage(img, 0, 0);
            const blob = await new Promise(resolve => canvas.toBlob(resolve, 'image/png'));
            await navigator.clipboard.write([new ClipboardItem({'image/png': blob})]);
        }""",
        base64.b64encode(photo.read_bytes()).decode())
    page.locator("#query button[aria-label='Paste from clipboard']").click()
    page.locator("#query").click()  # a click on the paste area reads the clipboard
    expect_captions(page, expected_image_captions(double))
    wait_images_loaded(page, 6)
    kind, k, size = double.requests[0]
    assert (kind, k) == ("image", 12) and size > 0  # the pasted PNG (a canvas copy of the photo)
