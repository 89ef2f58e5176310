"""The web UI on the real stack, in a real browser: a bundle built from real photos, the real
embedder, indexer and gateway, the real UI, and Debian's Chromium driven by Playwright."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from conftest import E2E_PHOTOS
from test_ui_browser import WAIT_MS, browser, wait_images_loaded  # noqa: F401  (browser is a fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.filterwarnings("ignore:::gradio.queueing")]


@pytest.fixture
def ui_url(stack, collection):
    from cbir.client import GatewayClient
    from ui.server import UiServer
    from ui.settings import UiSettings

    settings = UiSettings(port=0, gateway_target=stack.gateway, media_roots=[collection], log_level="WARNING")
    client = GatewayClient(stack.gateway, timeout_s=settings.request_timeout_s)
    server = UiServer(settings, client)
    yield server.start()
    server.stop()
    client.close()


def test_uploading_a_collection_photo_shows_it_first_and_clicking_a_hit_searches_by_it(browser, ui_url, collection):
    """Upload a photo of the collection: the first gallery tile is that photo (its own image,
    loaded from the collection), with score 1.000; the status panel shows the real index and the
    k box the gateway's default (the UI asks for k = 0, the gateway's default number of hits);
    clicking the second hit makes that item the first result and shows it in the query panel."""
    from services.gateway.settings import GatewaySettings

    default_k = GatewaySettings().default_k
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    try:
        page.goto(ui_url)
        expect(page.locator("#status")).to_contain_text(f"{len(E2E_PHOTOS)} images", timeout=WAIT_MS)
        expect(page.locator("#k input[type=number]")).to_have_value(str(default_k))
        page.locator("#query input[type=file]").set_input_files(str(collection / "skimage-coffee.jpg"))
        first_caption = page.locator("#results .caption-label").first
        # the photo itself: score 1.000 and the match class "same image" (ui.handlers.caption)
        expect(first_caption).to_have_text("#1 · 1.000 · same image · skimage-coffee.jpg", timeout=WAIT_MS)
        images = wait_images_loaded(page, min(default_k, len(E2E_PHOTOS)))
        assert "skimage-coffee.jpg" in images[0]["src"]
        # the id is the caption's last part (a match class may come before it)
        second = page.locator("#results .caption-label").nth(1).inner_text().rsplit(" · ", 1)[-1].strip()
        page.locator("#results button.thumbnail-item").nth(1).click()
        expect(first_caption).to_have_text(f"#1 · 1.000 · same image · {second}", timeout=WAIT_MS)
        expect(page.locator("#query-info")).to_contain_text(f"Results for item {second}")
        page.screenshot(path="/tmp/cbir-ui-e2e.png", full_page=True)
        assert "Traceback" not in page.locator("body").inner_text()
    finally:
        page.close()
