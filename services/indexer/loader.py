"""Opens the configured bundle, and keeps trying while it is missing or broken.

The indexer never exits for want of a bundle: it stays up, NOT_SERVING, answers UNAVAILABLE with
the reason, logs that reason once (again only when it changes), and looks again every
`poll_seconds`. A broken bundle that has not changed on disk since the last attempt is not
re-opened (its checksums are not re-read every few seconds).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from cbir.bundle import CURRENT_FILE, open_bundle
from cbir.errors import BundleError

from . import metrics as indexer_metrics
from .index import IndexHolder, SearchIndex
from .settings import IndexerSettings

log = logging.getLogger(__name__)


def _snapshot(path: Path) -> tuple:
    """What on disk decides whether the bundle at `path` opens: names, sizes and change times."""

    def stat(p: Path) -> tuple:
        try:
            s = p.stat()
        except OSError:
            return (p.name, None)
        return (p.name, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino)

    def folder(p: Path) -> tuple:
        try:
            return tuple(stat(p / name) for name in sorted(os.listdir(p)))
        except OSError:
            return ()

    entries = [stat(path), folder(path)]
    try:
        version = (path / CURRENT_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        version = ""
    if version and "/" not in version and version not in ("", ".", ".."):
        entries.append(folder(path / version))
    return tuple(entries)


class BundleLoader:
    """Loads `settings.bundle` into `holder` from a background thread, retrying until it succeeds."""

    def __init__(self, settings: IndexerSettings, holder: IndexHolder, on_ready: Callable[[SearchIndex], None]):
        self.settings = settings
        self.holder = holder
        self.on_ready = on_ready
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_failure: tuple | None = None  # (snapshot, reason)
        self.attempts = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="indexer-bundle-loader", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop retrying. An open in progress (checksums of a big bundle) is not waited for beyond `timeout`:
        the thread is a daemon, and closes what it opened once it sees the stop."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.try_load():
                return
            self._stop.wait(self.settings.poll_seconds)

    def try_load(self) -> bool:
        """One attempt: True when a bundle was loaded and is now served."""
        path = Path(self.settings.bundle)
        snapshot = _snapshot(path)
        if self._last_failure is not None and self._last_failure[0] == snapshot:
            return False  # nothing changed on disk since the last failure
        self.attempts += 1
        start = time.perf_counter()
        try:
            bundle = open_bundle(
                path, verify_checksums=self.settings.verify_checksums, prefault=self.settings.prefault
            )
        except BundleError as error:
            self._failed(snapshot, str(error))
            return False
        except Exception as error:  # unreadable disk, permissions, out of memory...
            log.debug("opening %s failed", path, exc_info=True)
            self._failed(snapshot, f"cannot open the index bundle at {path}: {type(error).__name__}: {error}")
            return False
        if self._stop.is_set():
            bundle.close()
            return True
        index = SearchIndex(bundle, max_k=self.settings.max_k)
        seconds = time.perf_counter() - start
        previous = self.holder.swap(index)
        indexer_metrics.set_bundle(bundle)
        indexer_metrics.BUNDLE_LOAD_SECONDS.set(seconds)
        manifest = bundle.manifest
        log.info(
            "serving index bundle %s from %s: %d items, %s, %d-d%s, %d trees, model %s (opened in %.2fs%s)",
            manifest.version, bundle.path, manifest.item_count, manifest.metric, manifest.index_dimension,
            f" (PCA from {manifest.input_dimension})" if manifest.pca else "", manifest.trees,
            manifest.model_fingerprint, seconds, ", checksums verified" if self.settings.verify_checksums else "",
        )
        self._last_failure = None
        self.on_ready(index)
        if previous is not None:
            previous.close()
        return True

    def _failed(self, snapshot: tuple, problem: str) -> None:
        reason = f"{problem} (the indexer checks again every {self.settings.poll_seconds:g}s)"
        if self._last_failure is None or self._last_failure[1] != reason:
            log.error("index bundle not usable, not serving: %s", reason)
        self._last_failure = (snapshot, reason)
        self.holder.set_reason(reason)
