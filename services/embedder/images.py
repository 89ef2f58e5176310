"""Encoded image bytes -> the (224, 224, 3) uint8 RGB array VGG-16 takes, or `BadImage` saying why.

The bytes come from strangers: the size in the header is checked against `max_pixels` before a
single pixel is decoded (decompression bombs), every decoder failure becomes `BadImage`, and
large JPEGs are decoded at a reduced scale (`draft`), which is much faster than a full decode.
"""

from __future__ import annotations

import io
import logging
import re

import numpy as np
from PIL import ExifTags, Image

from cbir.errors import BadImage

log = logging.getLogger(__name__)

SIZE = 224
_WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_TURNS = {  # EXIF orientation -> transpose, the table of `PIL.ImageOps.exif_transpose`
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def load_image(data: bytes, *, max_pixels: int, max_bytes: int | None = None, size: int = SIZE,
               keep_aspect: bool = False, source: bool = False) -> np.ndarray:
    """Decode `data` (any format Pillow reads) into a uint8 RGB array the network takes.

    EXIF orientation is applied, transparency is composited onto white, palette, grayscale,
    CMYK and 16-bit images are converted to 8-bit RGB. The result is resized to size x size
    (aspect ratio not kept, as Keras's `load_img(target_size=...)` does), or with `keep_aspect` so
    that its longer side is `size` and its shorter side keeps the image's proportions (rounded to
    a multiple of 16). With `source`, the proportions are kept exactly and the image is only ever
    made smaller, to a longer side of at most `size` (what `descriptor` passes and local features are
    made from). Multi-frame images (GIF, TIFF, ...) use their first frame. Raises
    `BadImage` with a reason a person can act on.
    """
    if not data:
        raise BadImage("the image is empty (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise BadImage(f"image is {len(data)} bytes, more than the limit of {max_bytes} bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # Pillow's own guard, for sizes far above its limit
        raise BadImage(
            f"image has too many pixels (the limit is {max_pixels:,}); refused as a possible decompression bomb"
        ) from None
    except Exception as error:  # UnidentifiedImageError and friends: whatever Pillow cannot parse
        log.debug("Pillow cannot open %d bytes: %r", len(data), error)
        raise BadImage(
            f"the data ({len(data):,} bytes) is not an image Pillow can read (JPEG, PNG, WebP, GIF, BMP, TIFF)"
        ) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise BadImage(
                f"image is {width}x{height} = {width * height:,} pixels, more than the limit of "
                f"{max_pixels:,}; scale it down before sending it"
            )
        try:
            # JPEG (and MPO): decode at 1/2, 1/4 or 1/8 scale when that still covers size x size. Others: no-op.
            image.draft("RGB", (size, size))
            image.load()
        except Exception as error:  # truncated or corrupt data
            raise BadImage(f"the {image.format or 'image'} data is corrupt or truncated{_reason(error)}") from None
        try:
            return _to_array(image, size, keep_aspect, source)
        except BadImage:
            raise
        except Exception as error:
            raise BadImage(
                f"the {image.format or 'image'} image (mode {image.mode}) cannot be converted to RGB{_reason(error)}"
            ) from None


def aspect_size(width: int, height: int, longer: int, multiple: int = 16) -> tuple[int, int]:
    """(w, h) with the longer side `longer` and the shorter one in proportion, both multiples of `multiple`."""
    scale = longer / max(width, height)
    return (max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple))


def source_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """(w, h) in the image's proportions with the longer side at most `longest` (never enlarged)."""
    scale = min(1.0, longest / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit(image: np.ndarray, resize: str, size: int) -> np.ndarray:
    """A source image resized for one network pass: "squash" to size x size, "keep_aspect" to a longer
    side of `size` (both sides multiples of 16)."""
    height, width = image.shape[:2]
    target = (size, size) if resize == "squash" else aspect_size(width, height, size)
    if target == (width, height):
        return image
    resized = Image.fromarray(image).resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8))


def _to_array(image: Image.Image, size: int = SIZE, keep_aspect: bool = False, source: bool = False) -> np.ndarray:
    turn = _orientation(image)
    image = _to_rgb(image)
    if source:
        target = source_size(*image.size, size)
    else:
        target = aspect_size(*image.size, size) if keep_aspect else (size, size)
    if image.size != target:
        image = image.resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
    if turn is not None:  # on the small resized image: cheaper than turning the full one, same result
        image = image.transpose(turn)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:  # cannot happen for an RGB image; guards the contract
        raise BadImage(f"decoded to shape {array.shape}, expected (height, width, 3)")
    return np.ascontiguousarray(array)


def _orientation(image: Image.Image) -> Image.Transpose | None:
    """The turn that makes the image upright, from its EXIF orientation tag (as `ImageOps.exif_transpose`).

    A broken EXIF block leaves the image as stored: the pixels are still good.
    """
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as error:
        log.debug("ignoring unreadable EXIF data: %s", error)
        return None
    return _TURNS.get(orientation)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grayscale
        return Image.fromarray(_gray_to_uint8(np.asarray(image), mode), "L").convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _gray_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    top = float(values.max()) if values.size else 0.0
    scaled = values.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and top > 255.0):  # 16-bit samples
        scaled /= 257.0
    elif mode == "F" and top <= 1.0:  # float samples in [0, 1]
        scaled *= 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


_REPR = re.compile(r"<[^<>]*>|\b0x[0-9a-fA-F]+\b")  # <_io.BytesIO object at 0x7f...>, bare addresses


def _reason(error: Exception) -> str:
    """": <Pillow's explanation>" for a BadImage message, as plain text: object reprs and addresses are
    left out (they mean nothing to the sender), and so is the explanation when nothing else is left."""
    log.debug("image decoding failed: %r", error)
    text = " ".join(_REPR.sub("", str(error)).split()).strip(" :;,.")
    return f": {text}" if text and any(c.isalpha() for c in text) else ""
