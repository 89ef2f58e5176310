"""Seeded, deterministic image edits: the queries of the copy-detection protocol (Copydays-style).

Each edit is what happens to a photo on its way around the web: cropped (50-90 % of the area
kept), scaled down, recompressed as a low-quality JPEG (30-75), straightened by a few degrees,
colour-corrected, mirrored, captioned, or several of these at once. `edited_bytes(data, edit,
seed=..., key=...)` returns the edited image as encoded bytes (JPEG; quality 95 unless the edit
is `jpeg`), exactly what a user would upload. The random draws come from a generator seeded by
(seed, key, edit), so a query depends only on those three values: not on the order in which the
queries are made, nor on the other images of the collection.

Images are first reduced to at most `MAX_SIDE` pixels on their long side (a photo as shared
online); the embedder later resizes everything to 224x224 anyway.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

MAX_SIDE = 1024
SAVE_QUALITY = 95  # JPEG quality of every edited image, except the `jpeg` edit's own
CAPTION_WORDS = (
    "summer", "holiday", "best", "day", "ever", "look", "at", "this", "view", "wow", "throwback",
    "amazing", "weekend", "vibes", "nature", "love", "our", "trip", "golden", "hour", "no", "filter",
)


@dataclass(frozen=True)
class EditedImage:
    edit: str
    data: bytes  # encoded (JPEG)
    params: dict  # the drawn parameters, for the JSON report


def edit_rng(seed: int, key: str, edit: str) -> np.random.Generator:
    """The generator of one (seed, image, edit): independent of every other draw."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{edit}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _crop(image: Image.Image, rng: np.random.Generator, low: float = 0.5, high: float = 0.9) -> tuple[Image.Image, dict]:
    area = float(rng.uniform(low, high))
    # aspect jitter: the kept part need not have the photo's proportions
    width_frac = min(1.0, max(area, math.sqrt(area) * math.exp(float(rng.uniform(-0.25, 0.25)))))
    height_frac = min(1.0, area / width_frac)
    w, h = image.size
    cw, ch = max(1, round(w * width_frac)), max(1, round(h * height_frac))
    left = int(rng.integers(0, w - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    return image.crop((left, top, left + cw, top + ch)), {"area": round(cw * ch / (w * h), 3), "box": [left, top, cw, ch]}


def _rescale(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    factor = float(rng.uniform(0.15, 0.5))
    w, h = image.size
    size = (max(16, round(w * factor)), max(16, round(h * factor)))
    return image.resize(size, Image.Resampling.BICUBIC), {"factor": round(factor, 3), "size": list(size)}


def _rotate(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    angle = float(rng.uniform(3.0, 10.0)) * (1 if rng.random() < 0.5 else -1)
    w, h = image.size
    rotated = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False)
    # Keep the largest centred rectangle of the photo's proportions free of the black corners.
    a = math.radians(abs(angle))
    scale = min(w / (w * math.cos(a) + h * math.sin(a)), h / (w * math.sin(a) + h * math.cos(a)))
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    left, top = (w - cw) // 2, (h - ch) // 2
    return rotated.crop((left, top, left + cw, top + ch)), {"degrees": round(angle, 2)}


def _colour(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    brightness = float(rng.uniform(0.6, 1.4))
    contrast = float(rng.uniform(0.6, 1.4))
    saturation = float(rng.uniform(0.3, 1.7))
    image = ImageEnhance.Brightness(image).enhance(brightness)
    image = ImageEnhance.Contrast(image).enhance(contrast)
    image = ImageEnhance.Color(image).enhance(saturation)
    return image, {"brightness": round(brightness, 3), "contrast": round(contrast, 3), "saturation": round(saturation, 3)}


def _flip(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    return ImageOps.mirror(image), {}


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # the font Pillow ships (needs FreeType)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _caption(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    words = [CAPTION_WORDS[int(i)] for i in rng.integers(0, len(CAPTION_WORDS), int(rng.integers(2, 5)))]
    text = " ".join(words).upper()
    w, h = image.size
    size = max(8, round(h * float(rng.uniform(0.08, 0.14))))
    font = _font(size)
    image = image.copy()
    draw = ImageDraw.Draw(image)
    stroke = max(1, size // 12)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    if right - left > 0.95 * w:  # too wide: shrink to fit
        size = max(8, int(size * 0.95 * w / (right - left)))
        font = _font(size)
        stroke = max(1, size // 12)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    x = (w - (right - left)) // 2 - left
    at_top = bool(rng.random() < 0.5)
    margin = round(0.04 * h)
    y = margin - top if at_top else h - margin - bottom
    draw.text((x, y), text, font=font, fill=(255, 255, 255), stroke_width=stroke, stroke_fill=(0, 0, 0))
    return image, {"text": text, "size": size, "position": "top" if at_top else "bottom"}


def _combined(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Copydays "strong"-like: a milder crop, a colour change and a caption, then a JPEG (done by the caller)."""
    image, crop = _crop(image, rng, 0.6, 0.9)
    image, colour = _colour(image, rng)
    image, caption = _caption(image, rng)
    return image, {"crop": crop, "colour": colour, "caption": caption}


# name -> (edit, JPEG quality range drawn for the saved file, or None for SAVE_QUALITY)
EDITS: dict[str, tuple[Callable, tuple[int, int] | None]] = {
    "crop": (_crop, None),
    "rescale": (_rescale, None),
    "jpeg": (lambda image, rng: (image, {}), (30, 75)),
    "rotate": (_rotate, None),
    "colour": (_colour, None),
    "flip": (_flip, None),
    "caption": (_caption, None),
    "combined": (_combined, (50, 75)),
}
EDIT_NAMES = tuple(EDITS)


def parse_edits(text: str | None) -> tuple[str, ...]:
    """`crop,jpeg,...` -> the edit names, in EDIT_NAMES order; all of them for None/'' /'all'."""
    if not text or text.strip() == "all":
        return EDIT_NAMES
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in EDITS]
    if unknown:
        raise ValueError(f"unknown edit(s) {', '.join(unknown)}; choose from {', '.join(EDIT_NAMES)}")
    return tuple(name for name in EDIT_NAMES if name in names)


def open_rgb(data: bytes) -> Image.Image:
    """Decode, turn upright (EXIF), convert to RGB and reduce to at most MAX_SIDE px. Raises what Pillow raises."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (MAX_SIDE, MAX_SIDE))
        image = ImageOps.exif_transpose(image).convert("RGB")
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return image


def encode_jpeg(image: Image.Image, quality: int = SAVE_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()


def apply_edit(image: Image.Image, edit: str, *, seed: int, key: str) -> EditedImage:
    """Apply one named edit to an RGB image (see `open_rgb`); the result encoded as JPEG."""
    if edit not in EDITS:
        raise ValueError(f"unknown edit {edit!r}; choose from {', '.join(EDIT_NAMES)}")
    function, quality_range = EDITS[edit]
    rng = edit_rng(seed, key, edit)
    edited, params = function(image, rng)
    quality = SAVE_QUALITY if quality_range is None else int(rng.integers(quality_range[0], quality_range[1] + 1))
    if quality_range is not None:
        params = {**params, "quality": quality}
    return EditedImage(edit, encode_jpeg(edited, quality), params)


def edited_bytes(data: bytes, edit: str, *, seed: int, key: str) -> EditedImage:
    """One edit of an encoded image (see module doc)."""
    return apply_edit(open_rgb(data), edit, seed=seed, key=key)
