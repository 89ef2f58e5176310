"""Sources 2 and 3: the official Keras VGG-16 files, from the Keras cache or downloaded from their URL.

The cache is `<KERAS_HOME or ~/.keras>/models/<official file name>`, md5-checked as Keras does.
The download fetches the official file (or a mirror's, `keras_weights_base_url`) into that folder,
as `keras.utils.get_file` would, but with its own timeout on this one connection (no process-wide
socket default) and without Keras's "Downloading data from ..." print: the chain logs the outcome.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from pathlib import Path

from services.embedder.weights.chain import (
    SourceUnavailable,
    Weights,
    one_line,
    partial_path,
    sha256_file,
)

log = logging.getLogger(__name__)

# The official Keras files: include_top -> (file name, md5 that keras.applications.VGG16 checks).
KERAS_FILES = {
    True: ("vgg16_weights_tf_dim_ordering_tf_kernels.h5", "64373286793e3c8b2b4e3219cbf3544b"),
    False: ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "6d6bbae143d832006294945121d1f1fc"),
}
_MAX_WAIT_S = 60.0  # longest wait for one connect or read; the whole download has download_timeout_s


def keras_home(settings) -> Path:
    """Keras's cache root as Keras finds it: KERAS_HOME, else ~/.keras (or /tmp/.keras if ~ is read-only)."""
    if settings.keras_home is not None:
        return Path(settings.keras_home).expanduser()
    home = Path("~").expanduser()
    return (home if os.access(home, os.W_OK) else Path("/tmp")) / ".keras"


def _model_folders(settings) -> list[Path]:
    """Where the official files are kept: <keras_home>/models, and /tmp/.keras/models when keras_home is
    not writable (where `keras.utils.get_file` puts them then). The first is where a download goes."""
    home = keras_home(settings)
    if os.access(home, os.W_OK):
        return [home / "models"]
    return [home / "models", Path("/tmp/.keras/models")]


def _candidates(feature: str) -> list[bool]:
    """Which official files fit the feature, the one to prefer first (smaller, when it fits)."""
    return [True] if feature == "fc1" else [False, True]


def keras_cache(settings) -> Weights:
    folders = _model_folders(settings)
    problems = []
    for include_top in _candidates(settings.feature):
        name, md5 = KERAS_FILES[include_top]
        for folder in folders:
            path = folder / name
            if not path.is_file():
                continue
            sha256, actual_md5 = _hash_file(path)
            if actual_md5 != md5:
                problems.append(f"{path} is damaged or incomplete (md5 {actual_md5}, expected {md5})")
                continue
            return Weights("keras-cache", sha256, "caffe", include_top, path=path)
    if settings.feature == "fc1":
        notop = [f / KERAS_FILES[False][0] for f in folders if (f / KERAS_FILES[False][0]).is_file()]
        if notop:
            problems.append(f"found only {notop[0]}, conv layers only: fc1 needs {KERAS_FILES[True][0]}")
    names = " or ".join(KERAS_FILES[t][0] for t in _candidates(settings.feature))
    where = " or ".join(str(f) for f in folders)
    raise SourceUnavailable("; ".join(problems) if problems else f"no {names} in {where}")


def keras_download(settings) -> Weights:
    include_top = settings.feature == "fc1"  # gem: the 58 MB conv-only file is enough
    name, md5 = KERAS_FILES[include_top]
    origin = settings.keras_weights_base_url.rstrip("/") + "/" + name
    folder = _model_folders(settings)[-1]
    path = folder / name
    try:
        download(origin, path, md5=md5, timeout_s=settings.download_timeout_s)
    except SourceUnavailable as reason:
        raise SourceUnavailable(f"{origin}: {reason}") from None
    except (OSError, ValueError, HTTPException) as error:  # URLError, HTTPError and timeouts are OSErrors
        raise SourceUnavailable(f"{origin}: {_download_error(origin, error)}") from None
    return Weights("keras-download", sha256_file(path), "caffe", include_top, path=path)


def download(origin: str, path: Path, *, md5: str, timeout_s: float) -> None:
    """Fetch `origin` into `path` (atomically, md5-checked). Each connect and read waits at most
    min(timeout_s, 60) s, the whole download at most `timeout_s`; only this connection has the timeout."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(origin, headers={"User-Agent": "cbir-embedder"})
    with urllib.request.urlopen(request, timeout=min(timeout_s, _MAX_WAIT_S)) as response:
        length = response.headers.get("Content-Length")
        size = f"{int(length) / 1e6:.0f} MB" if length and length.isdigit() else "size unknown"
        log.info("weights: downloading %s (%s) into %s", origin, size, path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(path)
        digest = hashlib.md5()
        try:
            with open(partial, "wb") as out:
                while chunk := response.read(1 << 20):
                    if time.monotonic() > deadline:
                        raise SourceUnavailable(f"the download took over {timeout_s:g} s")
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != md5:
                raise SourceUnavailable(f"the downloaded file has md5 {digest.hexdigest()}, expected {md5}")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def _download_error(origin: str, error: BaseException) -> str:
    """Why a download failed, in words: offline (no name resolution), refused, HTTP status, timeout."""
    host = urllib.parse.urlsplit(origin).hostname or origin
    if isinstance(error, urllib.error.HTTPError):
        return f"the server answered HTTP {error.code} {error.reason}"
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve {host} (no network or no DNS here: {reason.strerror or reason})"
    if isinstance(reason, ConnectionRefusedError):
        return f"{host} refused the connection"
    if isinstance(reason, TimeoutError | socket.timeout):
        return f"no answer from {host} in time"
    return one_line(reason) if isinstance(reason, BaseException) else str(reason)


def _hash_file(path: Path) -> tuple[str, str]:
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            md5.update(chunk)
    return sha256.hexdigest(), md5.hexdigest()
