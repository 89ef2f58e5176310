"""Reading an item's bytes from a local file or an http(s) URL, with size and time limits."""

from __future__ import annotations

import pathlib
import urllib.error
import urllib.request

from cbir.ingest.sources import SourceItem, is_remote

USER_AGENT = "cbir-index-build/0.1 (+https://github.com/cbir)"


class FetchError(Exception):
    """The bytes could not be read; the message says why."""


def read_bytes(item: SourceItem, *, max_bytes: int, timeout_s: float = 20.0) -> bytes:
    if is_remote(item.location):
        return _download(item.location, max_bytes=max_bytes, timeout_s=timeout_s)
    path = pathlib.Path(item.location)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise FetchError(f"file is {size} bytes, over the {max_bytes}-byte limit")
        return path.read_bytes()
    except OSError as error:
        raise FetchError(f"cannot read {path}: {error.strerror or error}") from None


def _download(url: str, *, max_bytes: int, timeout_s: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as error:
        raise FetchError(f"HTTP {error.code} from {url}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise FetchError(f"cannot download {url}: {reason}") from None
    if len(data) > max_bytes:
        raise FetchError(f"download is over the {max_bytes}-byte limit")
    return data
