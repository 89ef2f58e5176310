"""Turning a hit's URL into something the gallery may show, safely.

A hit's URL is an http(s) URL or a `file://` URI of one of the collection's local images.

- http(s) URLs go to the browser as they are: the user's browser fetches them, the UI does not.
- `file://` URIs are shown only when the file's *real* path (symlinks resolved) is a regular file
  inside one of the configured media roots. A URI with a `..` segment, a remote host, a NUL byte,
  or a path that leaves the roots (directly or through a symlink) is refused. The gallery is
  then given that real path, and the Gradio server is told to serve those roots and nothing else
  (see `ui.server`), so what the page can load and what this module allows are the same set.
- Anything else (other schemes, bare paths, empty URLs) is "image not available", never an error.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

_WEB_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class Media:
    """What the gallery shows for one hit: `source` (a local real path or an http(s) URL), or,
    when `source` is None, the reason it cannot be shown."""

    source: str | None
    reason: str = ""

    @property
    def available(self) -> bool:
        return self.source is not None


def _refused(reason: str) -> Media:
    return Media(None, reason)


class MediaPolicy:
    """Decides which hit URLs the gallery may show. `roots` are folders; missing ones are ignored."""

    def __init__(self, roots: Iterable[str | os.PathLike]):
        resolved = []
        for root in roots:
            real = Path(os.path.realpath(os.path.expanduser(os.fspath(root))))
            if real.is_dir():
                resolved.append(real)
            else:
                log.warning("media root %s is not a folder; its images will not be shown", root)
        self.roots: tuple[Path, ...] = tuple(dict.fromkeys(resolved))

    def resolve(self, url: str) -> Media:
        """The gallery source for `url`, or a refusal with its reason. Never raises."""
        try:
            return self._resolve(url)
        except (ValueError, OSError) as error:  # malformed URL, unreadable path, ...
            return _refused(f"unusable URL ({error.__class__.__name__})")

    def _resolve(self, url: str) -> Media:
        if not url or not url.strip():
            return _refused("no URL")
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme in _WEB_SCHEMES:
            if not parts.netloc:
                return _refused("URL without a host")
            if parts.path.lower().endswith(".svg"):
                # Gradio's gallery would download an SVG on the server to inline it; we never
                # make the UI server fetch URLs on the index's behalf.
                return _refused("SVG URLs are not shown")
            return Media(url.strip())
        if scheme == "file":
            return self._local(parts.netloc, parts.path)
        return _refused(f"unsupported URL scheme {scheme!r}" if scheme else "not a URL")

    def _local(self, host: str, quoted_path: str) -> Media:
        if host not in ("", "localhost"):
            return _refused("file URI on another host")
        path = unquote(quoted_path)
        if "\x00" in path:
            return _refused("NUL byte in path")
        if not path.startswith("/"):
            return _refused("relative file path")
        if ".." in path.split("/"):
            return _refused("'..' in file path")
        if not self.roots:
            return _refused("no media roots configured")
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(root) for root in self.roots):
            return _refused("outside the media roots")
        if not real.is_file():
            return _refused("file not found")
        return Media(str(real))


@functools.cache
def placeholder_image():
    """A small grey tile saying 'image not available' (a PIL image, made once)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (256, 256), (229, 231, 235))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=20)
    for line, y in (("image", 100), ("not available", 128)):
        width = draw.textlength(line, font=font)
        draw.text(((256 - width) / 2, y), line, fill=(75, 85, 99), font=font)
    return image
