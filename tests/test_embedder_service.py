"""The embedder over real gRPC: a GrpcService with the real servicer on 127.0.0.1:0, VGG-16 with seeded random weights.

The model is built once for the module (2 CPU cores: every image costs ~0.15 s); servers share it.
"""

import io
import pathlib
import struct
import threading
import zlib

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, ImageDraw
from prometheus_client import REGISTRY

from cbir import local_features as lf
from cbir.v1 import embedder_pb2, embedder_pb2_grpc
from cbir.vectors import from_proto
from services.embedder.embedder import Embedder
from services.embedder.server import EmbedderServer
from services.embedder.settings import EmbedderSettings

MAX_IMAGES = 8
MAX_MESSAGE_MB = 2


def settings(**overrides) -> EmbedderSettings:
    values = dict(
        weights="random", random_seed=0, port=0, metrics_port=None, max_images_per_request=MAX_IMAGES,
        max_message_mb=MAX_MESSAGE_MB, grace_seconds=0,
    )
    return EmbedderSettings(**{**values, **overrides})


def png(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def scene(kind: int, size=(256, 256)) -> Image.Image:
    """Distinct drawn pictures: kind 0 ellipse, 1 stripes, 2 triangle, 3+ a grid of squares of varying colours."""
    image = Image.new("RGB", size, (200, 220, 255))
    draw = ImageDraw.Draw(image)
    if kind == 0:
        draw.ellipse((40, 40, 200, 200), fill=(200, 30, 30))
    elif kind == 1:
        for x in range(0, size[0], 32):
            draw.rectangle((x, 0, x + 15, size[1]), fill=(20, 120, 20))
    elif kind == 2:
        draw.polygon([(128, 20), (240, 230), (16, 230)], fill=(30, 30, 200))
    else:
        for i in range(0, size[0], 64):
            for j in range(0, size[1], 64):
                draw.rectangle((i, j, i + 40, j + 40), fill=((kind * 53 + i) % 256, (kind * 97 + j) % 256, kind * 31 % 256))
    return image


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit grayscale PNG: tens of KB on disk, 400 Mpx once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def sample(name: str, labels: dict | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.from_settings(settings())


@pytest.fixture(scope="module")
def server(embedder):
    running = EmbedderServer(settings())
    running.start()
    running.load(embedder)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield embedder_pb2_grpc.EmbedderStub(channel)
    channel.close()


def embed(stub, *images: bytes) -> embedder_pb2.EmbedResponse:
    return stub.Embed(embedder_pb2.EmbedRequest(images=list(images)), timeout=120)


def vectors(response) -> np.ndarray:
    assert all(not r.error for r in response.results), [r.error for r in response.results]
    return np.stack([from_proto(r.vector) for r in response.results])


def test_health_is_serving_only_after_the_model_is_loaded(embedder):
    """Started but not loaded: health NOT_SERVING and Embed UNAVAILABLE; after load(): SERVING and Embed works."""
    running = EmbedderServer(settings())
    running.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            for service in ("", "cbir.v1.Embedder"):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as caught:
                embed(stub, png(scene(0)))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in caught.value.details()

            running.load(embedder)
            status = health.Check(health_pb2.HealthCheckRequest(service="cbir.v1.Embedder"), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert vectors(embed(stub, png(scene(0)))).shape == (1, 512)
    finally:
        running.stop(0)


def test_gem_vectors_are_512_d_unit_and_repeatable(stub, embedder):
    """The same image twice gives the same 512-d unit vector; the response names the model fingerprint."""
    first = embed(stub, png(scene(0)))
    second = embed(stub, png(scene(0)))
    a, b = vectors(first)[0], vectors(second)[0]
    assert a.shape == (512,) and a.dtype == np.float32
    assert abs(np.linalg.norm(a) - 1.0) < 1e-5
    np.testing.assert_array_equal(a, b)
    assert first.model_fingerprint == embedder.info.fingerprint


def test_region_vectors_are_returned_when_asked_and_only_then(stub, embedder):
    """The default descriptor model sends sixteen unit region vectors of its own dimension with regions=True."""
    image = png(scene(1))
    asked = stub.Embed(embedder_pb2.EmbedRequest(images=[image], regions=True), timeout=60).results[0]
    plain = stub.Embed(embedder_pb2.EmbedRequest(images=[image]), timeout=60).results[0]
    regions = np.stack([from_proto(region) for region in asked.regions])
    assert embedder.has_regions and len(plain.regions) == 0
    assert regions.shape == (16, embedder.dimension) and np.allclose(np.linalg.norm(regions, axis=1), 1.0, atol=1e-5)
    assert np.allclose(from_proto(asked.vector), from_proto(plain.vector), atol=1e-6)


def test_a_query_sends_more_keypoints_than_an_item_stores_and_its_mirrors(stub, embedder):
    """local_features alone: what a bundle stores (at most 500 keypoints); with mirrored (a query): more
    keypoints, the strongest of them those of the item, and as many of the mirror image."""
    photo = (pathlib.Path(__file__).resolve().parent.parent / "demo" / "photos" / "opencv-baboon.jpg").read_bytes()
    item = stub.Embed(embedder_pb2.EmbedRequest(images=[photo], local_features=True), timeout=60).results[0]
    query = stub.Embed(embedder_pb2.EmbedRequest(images=[photo], local_features=True, mirrored=True),
                       timeout=60).results[0]
    stored, sent, mirror = (lf.from_bytes(b) for b in (item.local_features, query.local_features,
                                                       query.local_features_mirrored))
    assert len(item.local_features_mirrored) == 0 and len(stored) == lf.MAX_KEYPOINTS == 500
    assert lf.MAX_KEYPOINTS < len(sent) <= lf.QUERY_KEYPOINTS == 1000 and len(mirror) > lf.MAX_KEYPOINTS
    assert np.array_equal(sent.xy[:20], stored.xy[:20])  # the same strongest keypoints


def test_different_images_give_different_vectors(stub):
    """Three different pictures give three clearly different vectors."""
    found = vectors(embed(stub, *(png(scene(k)) for k in range(3))))
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(found[i] - found[j]).max() > 1e-3
            assert float(found[i] @ found[j]) < 0.999


def test_a_batch_gives_the_same_vectors_as_one_by_one(stub):
    """Four images in one request equal the four images sent one at a time."""
    images = [png(scene(k)) for k in range(4)]
    together = vectors(embed(stub, *images))
    alone = np.concatenate([vectors(embed(stub, image)) for image in images])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


def test_formats_and_colour_modes_give_the_vector_of_the_same_pixels(stub):
    """Grayscale, opaque RGBA, palette PNG, lossless WebP and GIF of a picture embed like its RGB PNG."""
    picture = scene(2)
    gray = picture.convert("L")
    few_colours = picture.quantize(16).convert("RGB")  # exactly representable as a palette image
    response = embed(
        stub,
        png(gray.convert("RGB")), png(gray),
        png(picture), png(picture.convert("RGBA")), png(picture, "WEBP", lossless=True),
        png(few_colours), png(few_colours.quantize(16)), png(few_colours.quantize(16), "GIF"),
    )
    found = vectors(response)
    np.testing.assert_allclose(found[1], found[0], rtol=1e-4, atol=1e-5)  # L == its RGB copy
    np.testing.assert_allclose(found[3:5], found[[2, 2]], rtol=1e-4, atol=1e-5)  # RGBA, WebP == RGB
    np.testing.assert_allclose(found[6:8], found[[5, 5]], rtol=1e-4, atol=1e-5)  # palette PNG, GIF == RGB
    assert np.abs(found[0] - found[2]).max() > 1e-3  # gray really differs from colour


def test_bad_images_fail_only_their_own_result(stub):
    """Empty bytes, text, a truncated JPEG and a 20000x20000 PNG bomb each get an error; the good images get vectors."""
    good = [png(scene(0)), png(scene(1))]
    jpeg = png(scene(3), "JPEG", quality=90)
    response = embed(stub, good[0], b"", b"hello, not an image", jpeg[: len(jpeg) // 2], png_bomb(), good[1])
    results = response.results
    assert len(results) == 6
    assert "empty" in results[1].error
    assert "not an image" in results[2].error
    assert "truncated" in results[3].error
    assert "too many pixels" in results[4].error
    for bad in results[1:5]:
        assert not bad.HasField("vector")
    expected = vectors(embed(stub, *good))
    np.testing.assert_allclose(
        np.stack([from_proto(results[0].vector), from_proto(results[5].vector)]), expected, rtol=1e-4, atol=1e-5
    )


def test_empty_request_is_invalid_argument_and_the_server_keeps_serving(stub):
    """An Embed request without images -> INVALID_ARGUMENT saying so; the next request works."""
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(embedder_pb2.EmbedRequest(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no images" in caught.value.details()
    assert vectors(embed(stub, png(scene(0)))).shape == (1, 512)


def test_too_many_images_is_invalid_argument(stub):
    """More images than max_images_per_request -> INVALID_ARGUMENT naming the limit, before any decoding."""
    with pytest.raises(grpc.RpcError) as caught:
        embed(stub, *([b"x"] * (MAX_IMAGES + 1)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"limit of {MAX_IMAGES}" in caught.value.details()


def test_message_over_the_grpc_limit_is_resource_exhausted(stub):
    """An image larger than the server's message limit is refused by gRPC itself (RESOURCE_EXHAUSTED); serving goes on."""
    with pytest.raises(grpc.RpcError) as caught:
        embed(stub, b"\xff\xd8" + b"\x00" * (MAX_MESSAGE_MB * 1024 * 1024 + 10))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert vectors(embed(stub, png(scene(1)))).shape == (1, 512)


def test_model_info_and_its_metric(stub, embedder):
    """GetModelInfo returns the embedder's ModelInfo; cbir_embedder_model_info carries the same labels."""
    info = stub.GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=10).model
    assert info == embedder.info
    pooling = "gem(p=3);source=512;squash=224+keep_aspect=448"  # the default descriptor (resize=auto)
    assert (info.name, info.feature, info.dimension, info.pooling) == ("vgg16", "gem", 512, pooling)
    assert info.local_features == "rootsift:500@512"
    assert (info.weights_source, info.weights_fingerprint, info.preprocessing) == ("random:0", "random-seed-0", "caffe")
    assert info.fingerprint.startswith("vgg16-gem-")
    labels = {
        "name": "vgg16", "feature": "gem", "dimension": "512", "weights_source": "random:0",
        "weights_fingerprint": "random-seed-0", "preprocessing": "caffe", "pooling": pooling,
        "fingerprint": info.fingerprint, "local_features": "rootsift:500@512",
    }
    assert sample("cbir_embedder_model_info", labels) == 1.0


def test_concurrent_requests_are_batched_and_each_gets_its_own_vector(embedder):
    """Eight clients at once (batch timeout 200 ms): some model call holds more than one image, and every
    client still receives the vector of its own image."""
    images = [png(scene(k)) for k in range(3, 11)]
    expected = embedder.embed_pixels(np.stack([embedder.decode(image) for image in images]))
    running = EmbedderServer(settings(batch_timeout_ms=200))
    running.start()
    running.load(embedder)
    batches_before = sample("cbir_embedder_batch_size_count")
    singles_before = sample("cbir_embedder_batch_size_bucket", {"le": "1.0"})
    model_calls_before = sample("cbir_stage_seconds_count", {"service": "embedder", "stage": "model"})
    decodes_before = sample("cbir_stage_seconds_count", {"service": "embedder", "stage": "decode"})
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(images))

    def client(index: int) -> None:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = embedder_pb2_grpc.EmbedderStub(channel)
                grpc.channel_ready_future(channel).result(timeout=30)
                start.wait(timeout=30)
                results[index] = vectors(embed(stub, images[index]))[0]
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(images))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        running.stop(0)
    assert not errors, errors
    for index in range(len(images)):
        np.testing.assert_allclose(results[index], expected[index], rtol=1e-4, atol=1e-5)
    batches = sample("cbir_embedder_batch_size_count") - batches_before
    multi_image_batches = batches - (sample("cbir_embedder_batch_size_bucket", {"le": "1.0"}) - singles_before)
    assert 1 <= batches < len(images)
    assert multi_image_batches >= 1
    assert sample("cbir_stage_seconds_count", {"service": "embedder", "stage": "model"}) - model_calls_before == batches
    assert sample("cbir_stage_seconds_count", {"service": "embedder", "stage": "decode"}) - decodes_before == len(images)
