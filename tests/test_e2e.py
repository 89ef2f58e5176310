"""The whole system end to end: a bundle built from real photos, the three real services over
real gRPC channels, searched through the public gateway API, the CLI and the Python client."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cbir.bundle import open_bundle
from apps.cli import main as cli
from cbir.client import GatewayClient
from conftest import DEMO_PHOTOS, E2E_PHOTOS

pytestmark = pytest.mark.slow


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def test_build_keeps_every_vector_with_its_id_and_rejects_bad_files(bundle, collection):
    """Every readable photo is in the bundle under its folder-relative id with its file:// URL;
    the truncated JPEG and the text file are in rejects.jsonl with a reason, and did not stop it."""
    result = bundle.result
    assert (result.items, result.rejected) == (len(E2E_PHOTOS), 2)
    rejects = {json.loads(line)["item_id"]: json.loads(line)["reason"]
               for line in result.rejects_file.read_text().splitlines()}
    assert set(rejects) == {"truncated.jpg", "notes.png"}
    assert all(reason for reason in rejects.values())
    with open_bundle(bundle.root) as opened:
        records = {record.item_id: record for record in opened.iter_items()}
        assert "nested/opencv-baboon.jpg" in records and "skimage-coffee.jpg" in records
        assert records["skimage-coffee.jpg"].url == (collection / "skimage-coffee.jpg").resolve().as_uri()
        assert opened.manifest.model_fingerprint.startswith("vgg16-gem-")
        assert not (bundle.root / ".work").exists(), "the shards are removed once the bundle is written"


@pytest.mark.parametrize("name", ["skimage-astronaut.jpg", "opencv-fruits.jpg", "mate-aqua.jpg"])
def test_search_with_a_collection_photo_returns_it_first(stack, collection, name):
    """The query photo itself comes back first with score ~1, then the others, best first."""
    path = next(collection.rglob(name))
    with GatewayClient(stack.gateway) as client:
        response = client.search_image(path.read_bytes(), k=5)
    hits = list(response.hits)
    assert len(hits) == 5
    assert hits[0].item_id == path.relative_to(collection).as_posix()
    assert hits[0].url == path.resolve().as_uri()
    assert hits[0].score > 0.999
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    assert response.bundle_version and response.timings.embed_ms > 0 and response.timings.total_ms > 0


def test_a_recompressed_and_resized_copy_still_finds_its_original(stack):
    """A re-encoded, smaller copy (a near duplicate, not the same bytes) finds the original first."""
    original = Image.open(DEMO_PHOTOS / "skimage-chelsea.jpg").convert("RGB")
    copy = _jpeg(original.resize((original.width // 2, original.height // 2)), quality=60)
    with GatewayClient(stack.gateway) as client:
        hits = client.search_image(copy, k=3).hits
    assert hits[0].item_id == "skimage-chelsea.jpg"


def test_search_by_id_and_exclude_self(stack):
    with GatewayClient(stack.gateway) as client:
        with_self = client.search_id("skimage-rocket.jpg", k=4).hits
        without = client.search_id("skimage-rocket.jpg", k=4, exclude_self=True).hits
    assert with_self[0].item_id == "skimage-rocket.jpg" and with_self[0].score > 0.999
    assert "skimage-rocket.jpg" not in [h.item_id for h in without]
    assert [h.item_id for h in without[:3]] == [h.item_id for h in with_self[1:4]]


def test_status_shows_both_upstreams_serving_and_compatible(stack, bundle):
    with GatewayClient(stack.gateway) as client:
        status = client.status()
    assert {u.name: u.state for u in status.upstreams} == {"embedder": "SERVING", "indexer": "SERVING"}
    assert status.compatible
    assert status.index.item_count == bundle.result.items
    assert status.model.fingerprint == status.index.model_fingerprint


def _bomb_png() -> bytes:
    """A 20000x20000 1-bit PNG: a few KB on disk, 400 megapixels decoded."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "payload, code, words",
    [
        (b"", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (b"\xff\xd8\xff\xe0 definitely not a jpeg", grpc.StatusCode.INVALID_ARGUMENT, ""),
        (b"hello, I am a text file\n", grpc.StatusCode.INVALID_ARGUMENT, ""),
        ((DEMO_PHOTOS / "skimage-coffee.jpg").read_bytes()[:3000], grpc.StatusCode.INVALID_ARGUMENT, ""),
        (_bomb_png(), grpc.StatusCode.INVALID_ARGUMENT, "pixels"),
        (b"\0" * (17 * 1024 * 1024), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ],
    ids=["empty", "corrupt-jpeg", "text", "truncated", "bomb-20000x20000", "over-message-limit"],
)
def test_bad_images_get_a_clear_status_and_the_stack_keeps_serving(stack, payload, code, words):
    """Each bad input is refused with its status and a message (no traceback), and a good search
    right after still works."""
    with GatewayClient(stack.gateway) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.search_image(payload, k=3)
        assert caught.value.code() == code
        details = caught.value.details() or ""
        assert "Traceback" not in details and details
        assert words.lower() in details.lower()
        assert client.search_id("skimage-coffee.jpg", k=1).hits[0].item_id == "skimage-coffee.jpg"


@pytest.mark.parametrize(
    "call, code",
    [
        (lambda c: c.search_id("no-such-photo.jpg", k=3), grpc.StatusCode.NOT_FOUND),
        (lambda c: c.search_id("skimage-coffee.jpg", k=10**6), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.search_image((DEMO_PHOTOS / "skimage-coffee.jpg").read_bytes(), k=5000),
         grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.search_id("", k=3), grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["unknown-id", "absurd-k-by-id", "absurd-k-by-image", "empty-id"],
)
def test_bad_requests_get_a_clear_status(stack, call, code):
    with GatewayClient(stack.gateway) as client:
        with pytest.raises(grpc.RpcError) as caught:
            call(client)
    assert caught.value.code() == code
    assert caught.value.details() and "Traceback" not in caught.value.details()


def test_cli_search_prints_the_hits_as_json_and_as_a_table(stack, collection):
    runner = CliRunner()
    image = str(collection / "skimage-coffee.jpg")
    result = runner.invoke(cli, ["search", image, "--k", "3", "--gateway", stack.gateway, "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)["hits"]
    assert hits[0]["item_id"] == "skimage-coffee.jpg" and len(hits) == 3
    table = runner.invoke(cli, ["search", image, "--k", "2", "--gateway", stack.gateway])
    assert table.exit_code == 0 and "skimage-coffee.jpg" in table.output.splitlines()[1]


def test_cli_search_against_a_gateway_that_is_down_says_so(collection):
    result = CliRunner().invoke(cli, ["search", str(collection / "skimage-coffee.jpg"), "--gateway", "127.0.0.1:1"])
    assert result.exit_code != 0
    assert "UNAVAILABLE" in result.output


def test_build_through_the_embedder_service_gives_the_same_vectors(stack, collection, bundle, tmp_path):
    """`cbir index build --embedder TARGET` embeds over gRPC and stores the same vectors under the
    same ids as the in-process build."""
    result = CliRunner().invoke(cli, [
        "index", "build", str(collection), "--out", str(tmp_path / "remote"),
        "--embedder", stack.embedder, "--batch-size", "5", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    assert f"with {len(E2E_PHOTOS)} images" in result.output and "2 rejected" in result.output
    with open_bundle(tmp_path / "remote") as remote, open_bundle(bundle.root) as local:
        remote_ids = [r.item_id for r in remote.iter_items()]
        local_ids = [r.item_id for r in local.iter_items()]
        assert remote_ids == local_ids
        np.testing.assert_allclose(np.asarray(remote.features()), np.asarray(local.features()), atol=1e-5)
        assert remote.model_fingerprint == local.model_fingerprint
