"""Hostile input, fuzzed with Hypothesis (bounded: `max_examples` per test, scaled by CBIR_FUZZ_SCALE).

- image decoding (`services.embedder.images.load_image`): random bytes, real images of eight
  formats with bytes flipped, cut, inserted or overwritten, and headers that claim huge sizes;
  the only outcomes allowed are a (224, 224, 3) uint8 array or `BadImage`;
- URL handling (`cbir.download`): arbitrary text and URLs built from hostile parts; only
  `UrlRefused` or a parsed target, and under the default policy nothing is ever connected to;
- request handling over gRPC: arbitrary QueryVector/QueryItem/GetItems requests to the real indexer
  and SearchById/SearchByImage/SearchByUrl to the real gateway; every answer is OK or a status that
  names the caller's mistake, never INTERNAL or UNKNOWN, and the servers keep answering.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from collections import Counter

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

# Damaged images are the point here: Pillow warns about them as it reads them.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")

from cbir.bundle import write_bundle
from cbir.client import GatewayClient
from cbir.download import Downloader, FetchError, FetchLimits, UrlPolicy, UrlRefused, parse_url
from cbir.errors import BadImage
from cbir.v1 import common_pb2, indexer_pb2, indexer_pb2_grpc
from services.embedder.images import load_image

SCALE = float(os.environ.get("CBIR_FUZZ_SCALE", "1"))
TRIED: Counter[str] = Counter()  # inputs tried per fuzz target, printed at the end (pytest -s)
StatusCode = grpc.StatusCode


def budget(examples: int, **extra):
    return settings(
        max_examples=max(1, int(examples * SCALE)), deadline=None, database=None, derandomize=SCALE == 1,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                               HealthCheck.data_too_large],
        **extra,
    )


def _encoded(fmt: str, mode: str = "RGB", size=(23, 17), **options) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


SEEDS = {
    "png": _encoded("PNG"), "png-rgba": _encoded("PNG", "RGBA"), "png-16bit": _encoded("PNG", "I;16"),
    "jpeg": _encoded("JPEG", quality=80), "jpeg-progressive": _encoded("JPEG", progressive=True),
    "gif": _encoded("GIF", "P"), "bmp": _encoded("BMP"), "tiff": _encoded("TIFF"), "webp": _encoded("WEBP"),
    "ico": _encoded("ICO", size=(16, 16)), "ppm": _encoded("PPM"),
}
MAX_PIXELS = 2_000_000


def assert_decodes_or_refuses(data: bytes) -> None:
    try:
        array = load_image(data, max_pixels=MAX_PIXELS)
    except BadImage as error:
        assert str(error)  # a reason, always
        return
    assert array.shape == (224, 224, 3) and array.dtype == np.uint8


@budget(400)
@given(st.binary(max_size=2048))
def test_random_bytes_are_an_image_or_bad_image(data):
    TRIED["load_image: random bytes"] += 1
    assert_decodes_or_refuses(data)


@st.composite
def mutated_images(draw):
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "overwrite", "zero-run"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at:at + len(chunk)] = chunk
        else:
            data[at:at + draw(st.integers(1, 64))] = bytes(64)
    return bytes(data)


@budget(600)
@given(mutated_images())
def test_damaged_real_images_of_every_format_are_an_image_or_bad_image(data):
    """Valid PNG (RGB, RGBA, 16-bit), JPEG (baseline, progressive), GIF, BMP, TIFF, WebP, ICO and PPM files
    with up to six random flips, cuts, insertions and overwrites."""
    TRIED["load_image: damaged images"] += 1
    assert_decodes_or_refuses(data)


def _png_claiming(width: int, height: int, color_type: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _gif_claiming(width: int, height: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HH", width & 0xFFFF, height & 0xFFFF) + b"\x80\0\0" + b"\0" * 6
            + b"," + struct.pack("<HHHH", 0, 0, width & 0xFFFF, height & 0xFFFF) + b"\0\x02\x02\x44\x01\0;")


def _bmp_claiming(width: int, height: int) -> bytes:
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 64, 0, 0, 54) + header + b"\0" * 64


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@budget(300)
@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1), st.sampled_from(["png-rgb", "png-rgba", "gif", "bmp"]))
def test_headers_claiming_huge_sizes_are_refused_before_decoding(width, height, kind):
    """Decompression bombs: a header may claim up to 2^31 x 2^31 pixels. Beyond max_pixels the answer is
    BadImage naming the limit, at once and without allocating the pixels (no MemoryError)."""
    TRIED["load_image: huge headers"] += 1
    data = {"png-rgb": lambda: _png_claiming(width, height, 2), "png-rgba": lambda: _png_claiming(width, height, 6),
            "gif": lambda: _gif_claiming(width, height), "bmp": lambda: _bmp_claiming(width, height)}[kind]()
    try:
        load_image(data, max_pixels=MAX_PIXELS)
    except BadImage as error:
        claimed = (width & 0xFFFF) * (height & 0xFFFF) if kind == "gif" else width * height
        if claimed > MAX_PIXELS:
            assert "pixels" in str(error) or "bomb" in str(error) or "corrupt" in str(error) or "not an image" in str(error)
        return
    claimed = (width & 0xFFFF) * (height & 0xFFFF) if kind == "gif" else width * height
    assert claimed <= MAX_PIXELS


# --- URLs ----------------------------------------------------------------------------------------

HOSTILE_HOSTS = st.sampled_from([
    "127.0.0.1", "127.1", "0x7f.1", "2130706433", "017700000001", "[::1]", "[::ffff:127.0.0.1]", "[0:0:0:0:0:0:0:1]",
    "localhost", "LOCALHOST.", "10.0.0.1", "192.168.1.1", "172.31.255.255", "169.254.169.254", "[fe80::1]",
    "0.0.0.0", "[::]", "100.64.0.1", "224.0.0.1", "metadata.google.internal", "example.com", "xn--nxasmq6b.com",
    "ex%61mple.com", "example.com.", "a" * 64 + ".com", "", "[", "[::1", "1.2.3.4.5", "exämple.com",
])


@st.composite
def hostile_urls(draw):
    scheme = draw(st.sampled_from(["http", "https", "HTTP", "ftp", "file", "gopher", "data", "javascript", "", "http:"]))
    userinfo = draw(st.sampled_from(["", "", "user@", "user:pw@", "example.com@", ":@"]))
    host = draw(HOSTILE_HOSTS)
    port = draw(st.sampled_from(["", "", ":80", ":0", ":65536", ":-1", ":6379", ":a", ":99999999999"]))
    path = draw(st.text(max_size=40))
    return f"{scheme}://{userinfo}{host}{port}/{path}"


@budget(1500)
@given(st.one_of(st.text(max_size=200), hostile_urls()))
def test_url_parsing_accepts_or_refuses_nothing_else(url):
    TRIED["parse_url"] += 1
    try:
        target = parse_url(url)
    except UrlRefused as error:
        assert str(error)
        return
    assert target.scheme in ("http", "https") and target.host and 0 < target.port < 65536


class NoDns:
    """A resolver that never leaves the machine: private answers for every name."""

    def __init__(self):
        self.asked = 0

    def __call__(self, host, port):
        self.asked += 1
        return ["10.20.30.40"] if len(host) % 2 else ["127.0.0.1", "fd00::1"]


@pytest.fixture(scope="module")
def default_policy_downloader():
    d = Downloader(UrlPolicy(), FetchLimits(retries=0, timeout_s=1), resolve=NoDns())
    yield d
    d.close()


@budget(800)
@given(hostile_urls())
def test_under_the_default_policy_no_hostile_url_opens_a_connection(default_policy_downloader, url):
    """Every hostile URL (names resolve to private addresses here, IP literals are what they are) ends in
    UrlRefused or another FetchError before a socket is opened."""
    TRIED["Downloader.fetch (default policy)"] += 1
    try:
        default_policy_downloader.fetch(url)
    except FetchError:
        pass
    assert default_policy_downloader.connections == []


# --- request handling over gRPC ------------------------------------------------------------------

DIM = 16
ALLOWED = {StatusCode.OK, StatusCode.INVALID_ARGUMENT, StatusCode.NOT_FOUND, StatusCode.FAILED_PRECONDITION}


@pytest.fixture(scope="module")
def fuzz_indexer(tmp_path_factory):
    from services.indexer.server import IndexerServer
    from services.indexer.settings import IndexerSettings

    root = tmp_path_factory.mktemp("fuzz") / "bundle"
    vectors = np.random.default_rng(0).normal(size=(50, DIM)).astype(np.float32)
    write_bundle(root, ids=[f"p{i}" for i in range(50)] + [], urls=[f"file:///p{i}.jpg" for i in range(50)],
                 vectors=vectors, model=common_pb2.ModelInfo(name="m", feature="f", dimension=DIM, fingerprint="fp"),
                 metric="angular", trees=3)
    server = IndexerServer(IndexerSettings(bundle=root, port=0, metrics_port=None, max_k=100))
    server.start_serving()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = indexer_pb2_grpc.IndexerStub(channel)
    for _ in range(600):
        try:
            stub.GetIndexInfo(indexer_pb2.GetIndexInfoRequest(), timeout=5)
            break
        except grpc.RpcError:
            import time

            time.sleep(0.05)
    yield stub
    channel.close()
    server.stop(0)


def call(method, request) -> tuple[StatusCode, object]:
    try:
        return StatusCode.OK, method(request, timeout=10)
    except grpc.RpcError as error:
        return error.code(), error.details()


TEXT = st.text(max_size=30) | st.sampled_from(["p1", "p49", "p0", "", "p1\x00", "' OR 1=1 --", "%", "_", "p*"])
U32 = st.integers(0, 2**32 - 1) | st.integers(0, 120)
I64 = st.integers(-(2**63), 2**63 - 1) | st.integers(-5, 5000)


@st.composite
def vectors(draw):
    if draw(st.booleans()):
        values = draw(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=DIM, max_size=DIM))
        data = np.asarray(values, dtype="<f4").tobytes()
        dimension = draw(st.sampled_from([DIM, DIM, 0, DIM + 1, 2**32 - 1]))
    else:
        data = draw(st.binary(max_size=4 * DIM + 8))
        dimension = draw(U32)
    return common_pb2.Vector(dimension=dimension, data=data)


@budget(500)
@given(st.one_of(
    st.builds(lambda v, k, sk, fp: ("QueryVector", indexer_pb2.QueryVectorRequest(vector=v, k=k, search_k=sk, model_fingerprint=fp)),
              vectors(), U32, I64, st.sampled_from(["", "fp", "other"]) | st.text(max_size=10)),
    st.builds(lambda i, k, sk, ex: ("QueryItem", indexer_pb2.QueryItemRequest(item_id=i, k=k, search_k=sk, exclude_self=ex)),
              TEXT, U32, I64, st.booleans()),
    st.builds(lambda ids: ("GetItems", indexer_pb2.GetItemsRequest(item_ids=ids)), st.lists(TEXT, max_size=20)),
))
def test_indexer_answers_any_request_with_ok_or_a_clear_status(fuzz_indexer, named_request):
    TRIED[f"indexer {named_request[0]}"] += 1
    name, request = named_request
    code, answer = call(getattr(fuzz_indexer, name), request)
    assert code in ALLOWED, (name, request, code, answer)
    if code is StatusCode.OK and name != "GetItems":
        assert len(answer.hits) <= request.k
        assert len({h.item_id for h in answer.hits}) == len(answer.hits)


@pytest.fixture(scope="module")
def fuzz_gateway(stack):
    """The real gateway in front of the session's embedder and indexer; its downloads resolve every name to
    a private address (no DNS leaves the machine) and refuse them."""
    from services.gateway.server import GatewayServer
    from services.gateway.servicer import GatewayServicer
    from services.gateway.settings import GatewaySettings

    settings = GatewaySettings(port=0, metrics_port=None, embedder_target=stack.embedder,
                               indexer_target=stack.indexer, url_timeout_s=1)
    resolver = NoDns()
    servicer = GatewayServicer.from_settings(settings, resolve=resolver)
    gateway = GatewayServer(settings, servicer)
    gateway.start_serving()
    client = GatewayClient(f"127.0.0.1:{gateway.port}", timeout_s=30)
    yield client, servicer
    client.close()
    gateway.stop(0)


SMALL_IMAGES = st.sampled_from([SEEDS["png"], SEEDS["gif"], SEEDS["bmp"]])


@pytest.mark.slow  # the session's VGG-16 stack
@budget(120)
@given(st.one_of(
    st.builds(lambda i, k, sk, ex: ("search_id", dict(item_id=i, k=k, search_k=sk, exclude_self=ex)),
              TEXT | st.sampled_from(["skimage-coffee.jpg", "nested/opencv-baboon.jpg"]), U32, I64, st.booleans()),
    st.builds(lambda image, k: ("search_image", dict(image=image, k=k)),
              st.binary(max_size=512) | mutated_images() | SMALL_IMAGES, st.integers(0, 30)),
    st.builds(lambda url, k: ("search_url", dict(url=url, k=k)), hostile_urls() | st.text(max_size=50), U32),
))
def test_gateway_answers_any_request_with_ok_or_a_clear_status(fuzz_gateway, named_call):
    """Image bytes (random, damaged, small valid ones: those run VGG-16), ids and k/search_k of any size,
    hostile URLs: OK or INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION, and no download ever connects."""
    client, servicer = fuzz_gateway
    name, arguments = named_call
    TRIED[f"gateway {name}"] += 1
    try:
        getattr(client, name)(**arguments)
        code = StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        assert code in ALLOWED, (name, arguments, code, error.details())
    assert servicer.urls.downloader.connections == []


@pytest.fixture(scope="module", autouse=True)
def report_inputs_tried():
    """Logs how many inputs each fuzz target was given (`pytest -o log_cli=true` shows it)."""
    yield
    logging.getLogger(__name__).info("fuzz inputs tried: %s, total %d", dict(TRIED), sum(TRIED.values()))
