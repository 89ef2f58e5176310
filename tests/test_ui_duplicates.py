"""The Duplicates tab's handlers against real servers: an indexer (a real gRPC server on 127.0.0.1:0) over a
bundle of chosen vectors whose items are demo photos, the real gateway in front of it, and the real
`GatewayClient`. What the page would show is checked: progress, then groups of images side by side with their
ids and pair scores, ten to a page; the empty collection, no duplicates and a gateway that is down, in words."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

from cbir.bundle import add_deleted, write_bundle
from cbir.client import GatewayClient
from cbir.health import wait_until_serving
from cbir.v1 import common_pb2
from services.gateway.server import GatewayServer
from services.gateway.settings import GatewaySettings
from services.indexer.server import IndexerServer
from services.indexer.settings import IndexerSettings
from ui.duplicates import GROUPS_PER_PAGE, DuplicatesHandlers
from ui.media import MediaPolicy

PHOTOS = Path(__file__).resolve().parents[1] / "demo" / "photos"
MODEL = common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=64, fingerprint="fp-ui-duplicates")


def photo_bundle(root: Path, pairs: int, singles: int = 0) -> Path:
    """`pairs` pairs of items ("p07-a", "p07-b": cosine ~0.99, a same-image pair by the score rule) and
    `singles` unrelated items ("s03"), each item a demo photo's file:// URI."""
    rng = np.random.default_rng(11)
    bases = rng.normal(size=(pairs + singles, 64)).astype(np.float32)
    ids, vectors = [], []
    for number in range(pairs):
        ids += [f"p{number:02d}-a", f"p{number:02d}-b"]
        vectors += [bases[number], bases[number] + 0.15 * rng.normal(size=64).astype(np.float32)]
    for number in range(singles):
        ids.append(f"s{number:02d}")
        vectors.append(bases[pairs + number])
    photos = sorted(PHOTOS.glob("*.jpg"))
    urls = [photos[i % len(photos)].as_uri() for i in range(len(ids))]
    return write_bundle(root, ids=ids, urls=urls, vectors=np.stack(vectors), model=MODEL, metric="angular", trees=5)


@contextlib.contextmanager
def gateway_over(bundle_root: Path):
    """The real indexer serving `bundle_root` and the real gateway in front of it: yields the gateway's target."""
    indexer = IndexerServer(IndexerSettings(port=0, metrics_port=None, bundle=bundle_root))
    indexer.start_serving()
    gateway = None
    try:
        wait_until_serving(f"127.0.0.1:{indexer.port}")
        gateway = GatewayServer(GatewaySettings(port=0, metrics_port=None, embedder_target="127.0.0.1:1",
                                                indexer_target=f"127.0.0.1:{indexer.port}"))
        gateway.start_serving()
        yield f"127.0.0.1:{gateway.port}"
    finally:
        if gateway is not None:
            gateway.stop(0)
        indexer.stop(0)


@contextlib.contextmanager
def handlers_for(target: str):
    with GatewayClient(target, timeout_s=30) as client:
        yield DuplicatesHandlers(client, MediaPolicy([PHOTOS]), gateway_target=target, timeout_s=30)


def test_groups_are_shown_side_by_side_ten_to_a_page(tmp_path):
    """25 pairs among 28 images: the search reports progress, then page 1 of 3 shows groups 1-10, each its two
    images (real files under the media root) captioned with their ids and its pair's score and class; next goes
    to groups 11-20 and 21-25, and past either end the page stays where it is."""
    with gateway_over(photo_bundle(tmp_path / "b", pairs=25, singles=3)) as target, handlers_for(target) as handlers:
        views = list(handlers.find("copy"))
    progress, last = views[:-1], views[-1]
    assert progress and all(view.groups is None for view in progress)  # the groups on the page stay meanwhile
    assert "0 of 53" in progress[0].message and "53 of 53" in progress[-1].message
    assert last.message == ("**25 groups of copies** among the 53 images, largest first (50 images in groups). "
                            "Groups 1–10.")
    assert (last.page, last.pages, last.pager, len(last.groups)) == (0, 3, "Page 1 of 3", GROUPS_PER_PAGE)
    first = last.groups[0]
    assert first.title == "**Group 1** · 2 images"
    assert [item_id for _, item_id in first.gallery] == ["p00-a", "p00-b"]
    for source, _ in first.gallery:
        assert Path(source).is_file() and Path(source).is_relative_to(PHOTOS.resolve())
    assert first.pairs.startswith("- p00-a ~ p00-b: score 0.9") and first.pairs.endswith(" · same image")

    second = handlers.page(last.found, 1)
    assert (second.page, len(second.groups), second.message.endswith("Groups 11–20.")) == (1, 10, True)
    assert second.groups[0].title == "**Group 11** · 2 images"
    third = handlers.page(last.found, 2)
    assert (third.page, len(third.groups), third.pager) == (2, 5, "Page 3 of 3")
    assert handlers.page(last.found, 3).page == 2 and handlers.page(last.found, -1).page == 0


def test_no_duplicates_and_an_empty_collection_are_said_in_words(tmp_path):
    """Unrelated images only: "no copies found among the N images"; every image deleted: the collection is empty.
    Neither shows a group."""
    root = tmp_path / "singles"
    photo_bundle(root, pairs=0, singles=6)
    with gateway_over(root) as target, handlers_for(target) as handlers:
        view = list(handlers.find("near-duplicate"))[-1]
    assert (view.message, view.groups) == ("**No same images found** among the 6 images.", [])

    add_deleted(root, [f"s{number:02d}" for number in range(6)])
    with gateway_over(root) as target, handlers_for(target) as handlers:
        view = list(handlers.find("copy"))[-1]
    assert (view.message, view.groups) == ("**The collection is empty**: there are no images to compare.", [])


def test_a_gateway_that_is_down_is_a_readable_message():
    """No gateway at the target: one view saying so (naming the target), and the groups on the page stay."""
    with handlers_for("127.0.0.1:1") as handlers:
        (view,) = handlers.find("copy")
    assert view.groups is None
    assert view.message.startswith("⚠️ **Search failed.** The search service is not reachable right now "
                                   "(gateway 127.0.0.1:1)")


@pytest.mark.parametrize("choice", ["duplicates", "COPY"])
def test_a_class_the_page_does_not_offer_is_refused_before_any_call(choice):
    class NoCalls:
        def find_duplicates_events(self, *args, **kwargs):
            raise AssertionError("the gateway was called")

    handlers = DuplicatesHandlers(NoCalls(), MediaPolicy([PHOTOS]), gateway_target="-", timeout_s=1)
    (view,) = handlers.find(choice)
    assert view.message == "⚠️ Pick one of: copy, near-duplicate." and view.groups is None
