"""services.embedder.images.load_image: every input Pillow reads becomes 224x224 RGB; bad bytes become BadImage.

No model here: these tests are fast. Images are drawn with Pillow.
"""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cbir.errors import BadImage
from services.embedder.images import load_image

MAX_PIXELS = 50_000_000
RED = (220, 30, 30)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def quadrants(width: int = 320, height: int = 240) -> Image.Image:
    """Four flat colours, one per quadrant: any turn or flip moves them."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    w, h = width // 2, height // 2
    draw.rectangle((0, 0, w - 1, h - 1), fill=(230, 30, 30))
    draw.rectangle((w, 0, width - 1, h - 1), fill=(30, 200, 30))
    draw.rectangle((0, h, w - 1, height - 1), fill=(30, 30, 220))
    draw.rectangle((w, h, width - 1, height - 1), fill=(240, 240, 40))
    return image


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit grayscale PNG of width x height black pixels: a few tens of KB on disk, 400 Mpx decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: encode(Image.new("RGB", (300, 200), RED), "JPEG", quality=95), id="jpeg"),
        pytest.param(lambda: encode(Image.new("RGB", (300, 200), RED), "PNG"), id="png"),
        pytest.param(lambda: encode(Image.new("RGB", (300, 200), RED), "WEBP", lossless=True), id="webp"),
        pytest.param(lambda: encode(Image.new("RGB", (300, 200), RED).convert("P"), "GIF"), id="gif-palette"),
        pytest.param(lambda: encode(Image.new("RGB", (300, 200), RED).convert("P"), "PNG"), id="png-palette"),
        pytest.param(lambda: encode(Image.new("RGBA", (300, 200), RED + (255,)), "PNG"), id="png-rgba-opaque"),
        pytest.param(lambda: encode(Image.new("RGB", (300, 200), RED), "TIFF"), id="tiff"),
        pytest.param(lambda: encode(Image.new("RGB", (300, 200), RED), "BMP"), id="bmp"),
        pytest.param(lambda: encode(Image.new("RGB", (300, 200), RED).convert("CMYK"), "JPEG", quality=95),
                     id="jpeg-cmyk"),
    ],
)
def test_formats_decode_to_224_rgb_with_their_colours(make):
    """Each format and colour mode decodes to (224, 224, 3) uint8 with the colour it was drawn in."""
    pixels = load_image(make(), max_pixels=MAX_PIXELS)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.reshape(-1, 3).mean(axis=0) - RED).max() < 8


def test_grayscale_becomes_three_equal_channels():
    """An 8-bit grayscale PNG keeps its gray level in R, G and B."""
    pixels = load_image(encode(Image.new("L", (100, 80), 77), "PNG"), max_pixels=MAX_PIXELS)
    assert pixels.shape == (224, 224, 3)
    assert np.all(pixels == 77)


def test_16_bit_grayscale_is_scaled_not_clipped():
    """A 16-bit grayscale PNG at half range (32768) reads as mid-gray (128), not as saturated white."""
    sixteen = Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16))
    data = encode(sixteen, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit file
    pixels = load_image(data, max_pixels=MAX_PIXELS)
    assert np.all(np.abs(pixels.astype(int) - 128) <= 1)


def test_transparency_is_composited_on_white():
    """Transparent pixels (RGBA and a palette with a transparent index) become white, opaque ones keep their colour."""
    rgba = Image.new("RGBA", (224, 224), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle((0, 0, 111, 223), fill=RED + (255,))
    for data in (encode(rgba, "PNG"), encode(rgba, "WEBP", lossless=True)):
        pixels = load_image(data, max_pixels=MAX_PIXELS)
        assert np.all(pixels[:, 150:] == 255), "transparent half should be white"
        assert np.abs(pixels[:, :100].reshape(-1, 3).mean(axis=0) - RED).max() < 2

    palette = Image.new("P", (224, 224), 0)
    palette.putpalette([0, 0, 0] + list(RED) + [0] * 762)
    ImageDraw.Draw(palette).rectangle((0, 0, 111, 223), fill=1)
    pixels = load_image(encode(palette, "PNG", transparency=0), max_pixels=MAX_PIXELS)
    assert np.all(pixels[:, 150:] == 255)
    assert np.all(pixels[:, :100] == RED)


# EXIF orientation -> the transpose that turns the stored pixels upright, and the one that makes them from upright.
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
INVERSE = {Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(orientation):
    """A JPEG stored sideways with an EXIF orientation tag decodes like the upright JPEG, not like its stored pixels."""
    upright = quadrants()
    turn = ORIENTATIONS[orientation]
    stored = upright.transpose(INVERSE.get(turn, turn))
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = encode(stored, "JPEG", quality=95, exif=exif.tobytes())

    expected = load_image(encode(upright, "JPEG", quality=95), max_pixels=MAX_PIXELS)
    as_stored = load_image(encode(stored, "JPEG", quality=95), max_pixels=MAX_PIXELS)
    got = load_image(tagged, max_pixels=MAX_PIXELS)
    assert mean_abs_diff(got, expected) < 3
    assert mean_abs_diff(as_stored, expected) > 20  # the test image is not symmetric: the tag matters


def test_large_jpeg_gives_the_same_picture_as_a_small_one():
    """A 4000x3000 JPEG (decoded at reduced scale through draft, a speed-up) gives the picture a 400x300 one gives."""
    big = quadrants(4000, 3000)
    small = quadrants(400, 300)
    got = load_image(encode(big, "JPEG", quality=90), max_pixels=MAX_PIXELS)
    assert mean_abs_diff(got, load_image(encode(small, "JPEG", quality=90), max_pixels=MAX_PIXELS)) < 3


def test_empty_bytes_are_refused():
    """Zero bytes -> BadImage that says the image is empty."""
    with pytest.raises(BadImage, match="empty"):
        load_image(b"", max_pixels=MAX_PIXELS)


def test_text_is_refused():
    """A text file -> BadImage that says Pillow cannot read it."""
    with pytest.raises(BadImage, match="not an image"):
        load_image(b"just some text, not an image\n" * 20, max_pixels=MAX_PIXELS)


def test_truncated_jpeg_is_refused():
    """A JPEG cut in half -> BadImage that says it is truncated or corrupt."""
    data = encode(quadrants(), "JPEG", quality=95)
    with pytest.raises(BadImage, match="truncated"):
        load_image(data[: len(data) // 2], max_pixels=MAX_PIXELS)


def test_corrupt_png_is_refused():
    """A PNG with its pixel data overwritten -> BadImage, not an exception of another type."""
    data = bytearray(encode(quadrants(), "PNG"))
    data[60:200] = b"\xff" * 140
    with pytest.raises(BadImage):
        load_image(bytes(data), max_pixels=MAX_PIXELS)


def test_decompression_bomb_is_refused_from_its_header():
    """A small PNG whose header says 8000x8000 (64 Mpx > 50 Mpx) is refused by the max_pixels check, naming the size."""
    bomb = png_bomb(8000, 8000)
    assert len(bomb) < 200_000  # small on disk: only the header tells
    with pytest.raises(BadImage, match="8000x8000 = 64,000,000 pixels, more than the limit of 50,000,000"):
        load_image(bomb, max_pixels=MAX_PIXELS)


def test_20000_square_bomb_is_refused():
    """The 20000x20000 PNG bomb, which trips Pillow's own DecompressionBombError first, ends as BadImage naming the limit."""
    bomb = png_bomb()
    assert len(bomb) < 1_000_000
    for max_pixels in (MAX_PIXELS, 10**12):  # also when our limit is set above Pillow's
        with pytest.raises(BadImage, match="too many pixels.*decompression bomb"):
            load_image(bomb, max_pixels=max_pixels)


def test_max_bytes_is_enforced():
    """An encoded image larger than max_bytes is refused before decoding."""
    data = encode(quadrants(), "PNG")
    with pytest.raises(BadImage, match="limit"):
        load_image(data, max_pixels=MAX_PIXELS, max_bytes=len(data) - 1)
    assert load_image(data, max_pixels=MAX_PIXELS, max_bytes=len(data)).shape == (224, 224, 3)


def _junk() -> dict[str, bytes]:
    jpeg = encode(quadrants(), "JPEG", quality=95)
    png = bytearray(encode(quadrants(), "PNG"))
    png[60:200] = b"\xff" * 140
    return {
        "random bytes": np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated JPEG": jpeg[: len(jpeg) // 2],
        "JPEG header only": jpeg[:20],
        "corrupt PNG": bytes(png),
        "text": b"just some text, not an image\n" * 20,
        "HTML": b"<html><body>404 Not Found</body></html>",
        "empty": b"",
        "PNG bomb": png_bomb(),
    }


@pytest.mark.parametrize("kind", list(_junk()))
def test_bad_image_messages_are_plain_sentences(kind):
    """Every BadImage message reads as a sentence for a person: no Python object reprs, no memory addresses
    (Pillow's own `cannot identify image file <_io.BytesIO object at 0x7f...>` must not leak to the CLI or UI)."""
    with pytest.raises(BadImage) as caught:
        load_image(_junk()[kind], max_pixels=MAX_PIXELS)
    message = str(caught.value)
    assert message and message[0].isalpha(), message
    for leak in ("<", ">", "0x", "object at", "Error:", "BytesIO"):
        assert leak not in message, f"{kind}: {message!r}"
