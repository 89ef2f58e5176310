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

from cbir.v1 import common_pb2, duplicates_pb2, gateway_pb2, gateway_pb2_grpc

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

    SearchByImage: 9 demo photos (file:// URIs) with falling scores, then one hit with a long id
    whose file lies outside the UI's media roots (the UI must show a placeholder, never that file):
    10 tiles, three rows.
    SearchById: the item itself first, then 4 other demo photos: a different list.
    GetStatus: default k 12, at most 20.
    FindDuplicates: two progress reports, then two groups (photos 0-2, photos 3-4) and the summary.
    """

    OUTSIDE = ROOT / "pyproject.toml"  # a real file, not under demo/photos
    OUTSIDE_ID = "archive/2019/holidays/a-rather-long-folder-name/outside-1.jpg"
    DEFAULT_K, MAX_K = 12, 20

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
        hits = self._hits(self.photos[:9], [0.973, 0.912, 0.871, 0.802, 0.755, 0.74, 0.73, 0.72, 0.71])
        hits.append(common_pb2.Hit(item_id=self.OUTSIDE_ID, url=self.OUTSIDE.as_uri(), score=0.5, distance=0.5))
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

    def duplicate_groups(self):
        def item(photo):
            return common_pb2.Item(item_id=photo.stem, url=photo.as_uri())

        def pair(a, b, score, match, inliers=0):
            return duplicates_pb2.DuplicatePair(item_a=a.stem, item_b=b.stem, score=score, match=match, inliers=inliers)

        p = self.photos
        return [duplicates_pb2.DuplicateGroup(number=1, items=[item(x) for x in p[:3]],
                                              pairs=[pair(p[0], p[1], 0.991, "same_image"),
                                                     pair(p[1], p[2], 0.612, "copy", 48)]),
                duplicates_pb2.DuplicateGroup(number=2, items=[item(x) for x in p[3:5]],
                                              pairs=[pair(p[3], p[4], 0.955, "copy")])]

    def FindDuplicates(self, request, context):
        self._record("duplicates", request.match_class)
        total = len(self.photos)
        for searched in (0, total):
            yield duplicates_pb2.FindDuplicatesResponse(
                progress=duplicates_pb2.DuplicateProgress(items_searched=searched, items_total=total))
        groups = self.duplicate_groups()
        for group in groups:
            yield duplicates_pb2.FindDuplicatesResponse(group=group)
        yield duplicates_pb2.FindDuplicatesResponse(summary=duplicates_pb2.DuplicateSummary(
            groups=len(groups), groups_sent=len(groups), pairs=3, items_in_groups=5, items_searched=total))

    def GetStatus(self, request, context):
        return gateway_pb2.GetStatusResponse(
            upstreams=[gateway_pb2.UpstreamStatus(name="embedder", target="127.0.0.1:1", state="SERVING"),
                       gateway_pb2.UpstreamStatus(name="indexer", target="127.0.0.1:2", state="SERVING")],
            model=common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=512, weights_source="random:0",
                                       fingerprint="f" * 64),
            index=common_pb2.IndexInfo(item_count=len(self.photos), dimension=512, input_dimension=512,
                                       metric="angular", trees=10, bundle_version="test-v1"),
            compatible=True, default_k=self.DEFAULT_K, max_k=self.MAX_K)


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


def expected_captions(hits) -> list[str]:
    return [f"#{r} · {h.score:.3f} · {h.item_id}" for r, h in enumerate(hits, start=1)]


def expected_image_captions(double) -> list[str]:
    return expected_captions(double.image_hits())


def expect_no_gradio_errors(page) -> None:
    """No Gradio error toast and no red 'Error' pill on any output."""
    assert page.locator(".toast-body.error").count() == 0
    assert page.get_by_text("Error", exact=True).count() == 0


# ----------------------------------------------------------------------------------- tests
def test_search_shows_hit_images_and_clicking_a_hit_searches_by_it(gateway, page):
    """In Chromium: the status panel shows the index and the gateway's k limits, which the k
    box takes; uploading a demo photo searches with k = 0 (the gateway's default) and the
    gallery shows all three rows of hits' real images (decoded, naturalWidth > 0) with one-line
    '#rank · score · id' captions (the whole caption in a tooltip), a placeholder for the hit
    outside the media roots, and the timings; Search sends the k set on the page; clicking a hit
    shows the gateway's SearchById answer for that item and puts that item in the query panel;
    no request leaves the UI's origin. Screenshot: /tmp/cbir-ui.png."""
    double, _, _ = gateway
    from playwright.sync_api import expect

    expect(page.locator("#status")).to_contain_text("10 images · bundle test-v1", timeout=WAIT_MS)
    expect(page.locator("#status")).to_contain_text("Indexer: SERVING at 127.0.0.1:2")
    expect(page.locator("#status")).to_contain_text("Results per search: 12 by default, at most 20")
    expect(page.locator("#k")).to_contain_text("Default 12, at most 20")
    k_input = page.locator("#k input[type=number]")
    expect(k_input).to_have_value("12")

    # upload -> search by image (the upload itself triggers it), k = 0: the gateway's default
    page.locator("#query input[type=file]").set_input_files(str(PHOTOS / "opencv-fruits.jpg"))
    expect_captions(page, expected_image_captions(double))
    images = wait_images_loaded(page, 10)
    assert all("/gradio_api/file=" + str(PHOTOS) in i["src"] for i in images[:9]), images
    assert not any(str(GatewayDouble.OUTSIDE) in i["src"] for i in images), images  # placeholder, not the file
    assert double.requests[0] == ("image", 0, (PHOTOS / "opencv-fruits.jpg").stat().st_size)
    expect(page.locator("#message")).to_contain_text("10 results for the uploaded image")
    expect(page.locator("#query-info")).to_contain_text("Results for the uploaded image")
    expect(page.locator("#timings")).to_contain_text("embed 40 ms · index 0.5 ms")
    check_gallery_layout(page, double)
    page.screenshot(path=str(SCREENSHOT.with_name("cbir-ui-results.png")), full_page=True)

    # the Search button, with k changed on the page
    k_input.fill("7")
    k_input.press("Enter")
    page.locator("#search").click()
    wait_requests(double, "image", 2)
    assert double.requests[-1][:2] == ("image", 7)
    expect_captions(page, expected_image_captions(double))

    # click hit #2 -> search by its id; the gallery changes to that answer, the query panel shows the item
    clicked = double.image_hits()[1].item_id
    page.locator("#results button.thumbnail-item").nth(1).click()
    expect_captions(page, expected_captions(double.id_hits(clicked)))
    wait_images_loaded(page, 5)
    assert double.requests[-1] == ("id", 7, clicked)
    classes = page.eval_on_selector_all("#results button.thumbnail-item", "bs => bs.map(b => b.className)")
    assert not any("selected" in c.split() for c in classes), classes  # no stale highlight from the click
    expect(page.locator("#message")).to_contain_text(f"similar to item {clicked} (result #2 of the previous search)")
    expect(page.locator("#query-info")).to_contain_text(f"Results for item {clicked} (result #2 of the previous search)")
    page.wait_for_function(
        """(name) => { const img = document.querySelector('#query img');
                       return img && img.complete && img.naturalWidth > 0 && decodeURIComponent(img.src).includes(name); }""",
        arg=double.ids[clicked].name, timeout=WAIT_MS)  # the clicked item's image, not the old upload

    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert page.foreign_requests == []
    assert "Traceback" not in page_text(page)
    expect_no_gradio_errors(page)


def check_gallery_layout(page, double) -> None:
    """Every row of the gallery is in view (none cut by a fixed height), and each caption is one
    line covering a small strip of its tile, the whole caption in the tile's tooltip."""
    layout = page.evaluate("""() => {
        const wrap = document.querySelector('#results .grid-wrap');
        const box = wrap.getBoundingClientRect();
        const tiles = [...document.querySelectorAll('#results button.thumbnail-item')].map(t => {
            const r = t.getBoundingClientRect(); const label = t.querySelector('.caption-label');
            const l = label.getBoundingClientRect();
            return {top: r.top, bottom: r.bottom, height: r.height, label_h: l.height, title: t.title,
                    line: parseFloat(getComputedStyle(label).lineHeight) || 16};
        });
        return {wrap_bottom: box.bottom, scroll: wrap.scrollHeight, client: wrap.clientHeight, tiles};
    }""")
    tiles = layout["tiles"]
    assert len(tiles) == 10 and len({round(t["top"]) for t in tiles}) == 3, tiles  # three rows
    assert layout["scroll"] <= layout["client"] + 1, layout  # nothing hidden behind a scrollbar
    assert all(t["bottom"] <= layout["wrap_bottom"] + 1 for t in tiles), layout
    for tile, text in zip(tiles, expected_image_captions(double)):
        assert tile["label_h"] <= 2 * tile["line"] and tile["label_h"] < tile["height"] / 6, tile  # one line
        assert tile["title"] == text, tile  # the whole caption, long id included, as the tooltip


def test_k_above_the_gateways_maximum_is_refused_in_a_sentence(gateway, page):
    """In Chromium: k typed above the gateway's maximum (Enter, then Search) is refused by the
    page in a sentence naming the limit; the previous results stay, nothing reaches the gateway,
    and no Gradio 'Error' pill or toast appears."""
    double, _, _ = gateway
    from playwright.sync_api import expect

    expect(page.locator("#k")).to_contain_text("at most 20", timeout=WAIT_MS)
    page.locator("#query input[type=file]").set_input_files(str(PHOTOS / "opencv-fruits.jpg"))
    expect_captions(page, expected_image_captions(double))
    k_input = page.locator("#k input[type=number]")
    k_input.fill("500")
    k_input.press("Enter")
    page.locator("#search").click()
    message = page.locator("#message")
    expect(message).to_contain_text("Not searched. The gateway returns at most 20 results per search; "
                                    "500 is too many. Pick a k from 1 to 20.")
    expect(message).to_contain_text("The results below are from the previous search.")
    assert captions(page) == expected_image_captions(double)
    assert double.count("image") == 1
    expect_no_gradio_errors(page)
    page.screenshot(path=str(SCREENSHOT.with_name("cbir-ui-k.png")), full_page=True)


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
    assert double.requests == [("image", 0, garbage.stat().st_size)]

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
    wait_images_loaded(page, 10)
    kind, k, size = double.requests[0]
    assert (kind, k) == ("image", 0) and size > 0  # the pasted PNG (a canvas copy of the photo)


def test_the_duplicates_tab_shows_the_groups_side_by_side(gateway, page):
    """In Chromium: on the Duplicates tab, Find duplicates calls the gateway's FindDuplicates with the class
    chosen, and the page shows each group's images (decoded) side by side, captioned with their ids, with its
    pairs' scores and classes; the unused group slots stay hidden; no Gradio error. Screenshot:
    /tmp/cbir-ui-duplicates.png."""
    double, _, _ = gateway
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Duplicates").click()
    page.locator("#dup-find").click()
    expect(page.locator("#dup-message")).to_contain_text("2 groups of copies among the 10 images, largest first")
    first, second = double.duplicate_groups()
    expect(page.locator("#dup-group-0 .caption-label")).to_have_text([i.item_id for i in first.items])
    expect(page.locator("#dup-group-1 .caption-label")).to_have_text([i.item_id for i in second.items])
    page.wait_for_function(
        """() => { const imgs = [...document.querySelectorAll('#dup-group-0 img')];
                   return imgs.length === 3 && imgs.every(i => i.complete && i.naturalWidth > 0); }""", timeout=WAIT_MS)
    tops = page.eval_on_selector_all("#dup-group-0 img", "imgs => imgs.map(i => Math.round(i.getBoundingClientRect().top))")
    assert len(set(tops)) == 1, tops  # side by side, one row
    expect(page.locator("#dup-group-0")).to_contain_text(f"{first.pairs[0].item_a} ~ {first.pairs[0].item_b}: "
                                                         "score 0.991 · same image")
    expect(page.locator("#dup-group-0")).to_contain_text("score 0.612 · copy · 48 inliers")
    expect(page.locator("#dup-group-2")).to_be_hidden()
    assert double.requests[-1] == ("duplicates", "copy")
    page.screenshot(path=str(SCREENSHOT.with_name("cbir-ui-duplicates.png")), full_page=True)
    assert page.foreign_requests == []
    expect_no_gradio_errors(page)
