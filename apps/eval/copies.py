"""DISC21-style copies made with `augly` (the library DISC21's edits came from): the queries of
`cbir eval copies`.

One query per original and transformation family (`FAMILIES`): a crop to 25-35 % of the area, a
rotation of 10-45 degrees, a quarter turn, a perspective warp, the original pasted at 30-50 % scale
into another photo, a 2x2 collage, a screenshot/social frame, a text overlay, an emoji overlay, a
heavy JPEG (quality 5-10), grayscale, blur, pixelation, padding, a mirror, and a combination of
several. `make_copy(image, family, seed=, key=, backgrounds=)` returns the copy encoded as JPEG
and the drawn parameters; the draws come from a generator seeded by (seed, key, family), so a query
depends only on those (and on the background pool): not on the order queries are made in.

The photos of the overlay and collage families (`backgrounds`) must not be in the gallery: a copy
pasted onto a gallery photo would have two right answers.

augly 1.0.0 is installed WITHOUT its `[image]` extra (which pins Pillow < 9 and torch); its
`meme_format` and `perspective_transform` fail on current Pillow/NumPy, so the perspective warp is
done here with Pillow's `Image.transform(..., PERSPECTIVE)`.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

FAMILIES: tuple[str, ...] = (
    "crop", "rotate", "rotate90", "perspective", "overlay", "collage", "screenshot", "text", "emoji",
    "jpeg", "grayscale", "blur", "pixelate", "pad", "mirror", "combo",
)
NEEDS_BACKGROUNDS = ("overlay", "collage")
SAVE_QUALITY = 95
_FONTS = ("Impact.ttf", "OpenSans-Bold.ttf", "Montserrat-Black.ttf", "IBMPlexSans-Bold.ttf", "Ubuntu-B.ttf",
          "NotoSans-Regular.ttf", "Raleway-Bold.ttf", "SourceSansPro-Bold.ttf")
_EMOJI_DIRS = ("smileys", "animals_and_nature", "food_and_drink", "objects", "people", "travel_and_places")


class AuglyMissing(RuntimeError):
    pass


def _augly():
    try:
        import augly.image.functional as functional
        import augly.utils as utils
    except ImportError as error:  # pragma: no cover - depends on the install
        raise AuglyMissing("the copy families need augly: pip install 'augly==1.0.0' (without extras; or "
                           "the cbir[eval] extra)") from error
    return functional, utils


@dataclass(frozen=True)
class Copy:
    family: str
    data: bytes  # encoded JPEG
    params: dict  # the drawn parameters, for the JSON report


def family_rng(seed: int, key: str, family: str) -> np.random.Generator:
    """The generator of one (seed, original, family): independent of every other draw."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00copy:{family}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def parse_families(text: str | None) -> tuple[str, ...]:
    """`crop,jpeg,...` -> family names in FAMILIES order; all of them for None/''/'all'."""
    if not text or text.strip() == "all":
        return FAMILIES
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown copy famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                         f"choose from {', '.join(FAMILIES)}")
    return tuple(name for name in FAMILIES if name in names)


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def _crop(image, rng, lo=0.25, hi=0.35):
    F, _ = _augly()
    area = float(rng.uniform(lo, hi))
    wf = float(np.clip(np.sqrt(area) * np.exp(rng.uniform(-0.3, 0.3)), area, 1.0))
    hf = float(np.clip(area / wf, 0.05, 1.0))
    x1, y1 = float(rng.uniform(0, 1 - wf)), float(rng.uniform(0, 1 - hf))
    return F.crop(image, x1=x1, y1=y1, x2=x1 + wf, y2=y1 + hf), {"area": round(wf * hf, 3),
                                                                 "box": [round(v, 3) for v in (x1, y1, wf, hf)]}


def _rotate(image, rng, lo=10.0, hi=45.0):
    F, _ = _augly()
    degrees = _sign(rng) * float(rng.uniform(lo, hi))
    return F.rotate(image, degrees=degrees), {"degrees": round(degrees, 2)}


def _rotate90(image, rng):
    clockwise = bool(rng.random() < 0.5)
    return image.transpose(Image.Transpose.ROTATE_270 if clockwise else Image.Transpose.ROTATE_90), {
        "degrees": -90 if clockwise else 90}


def perspective_coefficients(output_points, input_points) -> list[float]:
    """Pillow's PERSPECTIVE coefficients mapping each output point to its input point (4 pairs)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(output_points, input_points):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64)).tolist()


def _perspective(image, rng, strength=0.2):
    w, h = image.size
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    dst = src + rng.uniform(-strength, strength, (4, 2)) * np.array([w, h])
    dst -= dst.min(axis=0)
    size = (max(1, int(np.ceil(dst[:, 0].max()))), max(1, int(np.ceil(dst[:, 1].max()))))
    coeffs = perspective_coefficients(dst, src)
    warped = image.transform(size, Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return warped, {"corners": np.round(dst / [w, h], 3).tolist()}


def _paste(image, rng, background: Image.Image):
    bg = _rgb(background).copy()
    scale = float(rng.uniform(0.30, 0.50))
    w = max(16, int(bg.width * scale))
    h = max(16, int(image.height * w / image.width))
    if h > bg.height * 0.9:
        h = max(16, int(bg.height * 0.9))
        w = max(16, int(image.width * h / image.height))
    fg = image.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    x, y = int(rng.integers(0, max(1, bg.width - w + 1))), int(rng.integers(0, max(1, bg.height - h + 1)))
    bg.paste(fg, (x, y))
    return bg, {"scale": round(scale, 3), "at": [x, y]}


def _collage(image, rng, others: Sequence[Image.Image], cell: int = 320):
    tiles = [_rgb(o) for o in others[:3]]
    where = int(rng.integers(4))
    tiles.insert(where, image)
    out = Image.new("RGB", (2 * cell, 2 * cell), (255, 255, 255))
    for k, tile in enumerate(tiles):
        out.paste(tile.resize((cell - 4, cell - 4), Image.Resampling.BILINEAR, reducing_gap=3.0),
                  ((k % 2) * cell + 2, (k // 2) * cell + 2))
    return out, {"cell": where}


def _screenshot(image, rng):
    F, utils = _augly()
    template = ("web.png", "mobile.png")[int(rng.integers(2))]
    crop = bool(rng.random() < 0.5)
    out = F.overlay_onto_screenshot(image, template_filepath=os.path.join(utils.SCREENSHOT_TEMPLATES_DIR, template),
                                    crop_src_to_fit=crop)
    return _rgb(out), {"template": template, "crop_src_to_fit": crop}


def _text(image, rng, size=(0.10, 0.20)):
    F, utils = _augly()
    font_name = _FONTS[int(rng.integers(len(_FONTS)))]
    font = os.path.join(utils.FONTS_DIR, font_name)
    with open(font.replace(".ttf", ".pkl"), "rb") as handle:
        charset = pickle.load(handle)
    letters = [i for i, c in enumerate(charset) if 65 <= c <= 90 or 97 <= c <= 122 or c == 32]
    text = [int(letters[int(rng.integers(len(letters)))]) for _ in range(int(rng.integers(6, 16)))]
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    font_size = float(rng.uniform(*size))
    out = F.overlay_text(image, text=text, font_file=font, font_size=font_size, opacity=1.0, color=color,
                         x_pos=float(rng.uniform(0, 0.4)), y_pos=float(rng.uniform(0.05, 0.8)))
    return _rgb(out), {"font": font_name, "chars": len(text), "font_size": round(font_size, 3)}


def _emoji(image, rng):
    F, utils = _augly()
    folder = os.path.join(utils.EMOJI_DIR, _EMOJI_DIRS[int(rng.integers(len(_EMOJI_DIRS)))])
    files = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    name = files[int(rng.integers(len(files)))]
    size = float(rng.uniform(0.20, 0.35))
    out = F.overlay_emoji(image, emoji_path=os.path.join(folder, name), opacity=1.0, emoji_size=size,
                          x_pos=float(rng.uniform(0, 1 - size)), y_pos=float(rng.uniform(0, 1 - size)))
    return _rgb(out), {"emoji": name, "size": round(size, 3)}


def _grayscale(image, rng):
    F, _ = _augly()
    return _rgb(F.grayscale(image)), {}


def _blur(image, rng):
    F, _ = _augly()
    radius = float(rng.uniform(2.0, 4.0))
    return F.blur(image, radius=radius), {"radius": round(radius, 2)}


def _pixelate(image, rng):
    F, _ = _augly()
    ratio = float(rng.uniform(0.10, 0.25))
    return F.pixelization(image, ratio=ratio), {"ratio": round(ratio, 3)}


def _pad(image, rng, lo=0.1, hi=0.4):
    F, _ = _augly()
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    wf, hf = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    return F.pad(image, w_factor=wf, h_factor=hf, color=color), {"w_factor": round(wf, 3), "h_factor": round(hf, 3)}


def _mirror(image, rng):
    F, _ = _augly()
    return F.hflip(image), {}


def _combo(image, rng):
    """One of three recipes; the JPEG quality it returns is the encoding's."""
    F, _ = _augly()
    recipe = int(rng.integers(3))
    if recipe == 0:  # crop (45-65 % of the area) + text + JPEG 20-40
        image, crop = _crop(image, rng, 0.45, 0.65)
        image, text = _text(image, rng)
        return image, {"recipe": "crop+text+jpeg", "crop": crop, "text": text}, int(rng.integers(20, 41))
    if recipe == 1:  # rotate 10-25 + emoji + grayscale
        image, rotate = _rotate(image, rng, 10, 25)
        image, emoji = _emoji(image, rng)
        return _rgb(F.grayscale(image)), {"recipe": "rotate+emoji+grayscale", "rotate": rotate, "emoji": emoji}, None
    image, pad = _pad(F.hflip(image), rng, 0.05, 0.2)  # mirror + pad + blur + JPEG 30
    radius = float(rng.uniform(1.0, 2.0))
    return F.blur(image, radius=radius), {"recipe": "mirror+pad+blur+jpeg", "pad": pad, "radius": round(radius, 2)}, 30


_SIMPLE: dict[str, Callable] = {
    "crop": _crop, "rotate": _rotate, "rotate90": _rotate90, "perspective": _perspective, "screenshot": _screenshot,
    "text": _text, "emoji": _emoji, "grayscale": _grayscale, "blur": _blur, "pixelate": _pixelate, "pad": _pad,
    "mirror": _mirror,
}


def make_copy(image: Image.Image, family: str, *, seed: int, key: str,
              backgrounds: Sequence[Callable[[], Image.Image]] = ()) -> Copy:
    """One copy of an RGB `image` (see `apps.eval.edits.open_rgb`) by `family`, encoded as JPEG.

    `backgrounds`: loaders of photos that are not in the gallery (overlay needs one, collage three).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown copy family {family!r}; choose from {', '.join(FAMILIES)}")
    image = _rgb(image)
    rng = family_rng(seed, key, family)
    quality = SAVE_QUALITY
    if family in _SIMPLE:
        out, params = _SIMPLE[family](image, rng)
    elif family == "jpeg":
        quality = int(rng.integers(5, 11))
        out, params = image, {}
    elif family == "combo":
        out, params, drawn = _combo(image, rng)
        quality = drawn or SAVE_QUALITY
    else:  # overlay, collage
        need = 1 if family == "overlay" else 3
        if len(backgrounds) < need:
            raise ValueError(f"the {family} family needs {need} photo(s) outside the gallery, got {len(backgrounds)}")
        chosen = [int(i) for i in rng.choice(len(backgrounds), need, replace=False)]
        photos = [backgrounds[i]() for i in chosen]
        out, params = _paste(image, rng, photos[0]) if family == "overlay" else _collage(image, rng, photos)
        params["backgrounds"] = chosen
    if quality != SAVE_QUALITY:
        params = {**params, "quality": quality}
    buffer = io.BytesIO()
    _rgb(out).save(buffer, format="JPEG", quality=quality)
    return Copy(family, buffer.getvalue(), params)
