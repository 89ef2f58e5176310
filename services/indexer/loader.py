"""Opens the configured bundle, keeps trying while it is missing or broken, and follows new versions.

Start-up: the indexer never exits for want of a bundle. It stays up, NOT_SERVING, answers
UNAVAILABLE with the reason, logs that reason once (again only when it changes), and looks again
every `poll_seconds`. A broken bundle that has not changed on disk since the last attempt is not
re-opened (its checksums are not re-read every few seconds).

While serving, every `watch_seconds` it looks at the bundle root's `current` pointer and its
deletion list (`deleted.txt`):

- `current` names another version: that version is opened, checked (manifest, sizes, checksums,
  Annoy/feature consistency), refused if it was built with another model than the live one
  (unless allowed), warmed up, and only then swapped in. Requests in flight finish on the old
  version, which is closed once the last of them is done: no request fails during a switch. A
  version that cannot be served is logged and the live one stays; it is tried again when the
  pointer or that version's folder changes.
- the deletion list changed: the live index hides the listed items from then on.

`reload()` does the same on demand (the `ReloadBundle` RPC), for `current` or a named version.
One load runs at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from cbir.bundle import CURRENT_FILE, MANIFEST_FILE, Bundle, open_bundle, read_current, read_deleted, touch_files
from cbir.bundle import ITEMS_FILE, PCA_FILE
from cbir.errors import BundleError, Incompatible

from . import metrics as indexer_metrics
from .index import IndexHolder, SearchIndex
from .settings import IndexerSettings

log = logging.getLogger(__name__)

# How long a replaced version waits for the requests still using it before it is unmapped anyway
# (they are leased: `SearchIndex.close` leaves it mapped if one is still running).
_CLOSE_WAIT_S = 60.0


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


def _file_state(path: Path) -> tuple | None:
    try:
        s = path.stat()
    except OSError:
        return None
    return (s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino)


@dataclasses.dataclass
class ReloadResult:
    reloaded: bool
    version: str
    previous_version: str
    item_count: int
    deleted_items: int
    seconds: float


class BundleLoader:
    """Loads `settings.bundle` into `holder` from a background thread, retrying until it succeeds,
    then follows the bundle root's `current` pointer and deletion list."""

    def __init__(self, settings: IndexerSettings, holder: IndexHolder, on_ready: Callable[[SearchIndex], None]):
        self.settings = settings
        self.holder = holder
        self.on_ready = on_ready
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._load_lock = threading.Lock()  # one open/check/warm/swap at a time
        self._last_failure: tuple | None = None  # (snapshot, reason) of the last failed attempt
        self._pointer_seen: str | None = None  # `current` when we last acted on it
        self._deleted_state: tuple | None = None
        self.attempts = 0

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="indexer-bundle-loader", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop retrying and watching. An open in progress (checksums of a big bundle) is not waited for
        beyond `timeout`: the thread is a daemon, and closes what it opened once it sees the stop."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.holder.current is None:
                self.try_load()
            else:
                try:
                    self.check_for_changes()
                except Exception:  # never let the watcher die: the live version stays served
                    log.exception("watching %s failed; the live version stays", self.settings.bundle)
            ready = self.holder.current is not None
            self._stop.wait(self.settings.watch_seconds if ready else self.settings.poll_seconds)

    @property
    def root(self) -> Path | None:
        """The bundle root (None when the settings name one version folder)."""
        path = Path(self.settings.bundle)
        if (path / MANIFEST_FILE).exists() and not (path / CURRENT_FILE).exists():
            return None
        return path

    # ------------------------------------------------------------------ start-up
    def try_load(self) -> bool:
        """One start-up attempt: True when a bundle was loaded and is now served."""
        path = Path(self.settings.bundle)
        snapshot = _snapshot(path)
        if self._last_failure is not None and self._last_failure[0] == snapshot:
            return False  # nothing changed on disk since the last failure
        self.attempts += 1
        try:
            pointer = read_current(path) if (path / CURRENT_FILE).exists() else None
        except BundleError:
            pointer = None
        try:
            self._load(version=None, trigger="start", allow_model_change=True)
        except (BundleError, Incompatible) as error:
            self._failed(snapshot, str(error))
            return False
        except Exception as error:  # unreadable disk, permissions, out of memory...
            log.debug("opening %s failed", path, exc_info=True)
            self._failed(snapshot, f"cannot open the index bundle at {path}: {type(error).__name__}: {error}")
            return False
        self._pointer_seen = pointer
        self._last_failure = None
        return self.holder.current is not None

    def _failed(self, snapshot: tuple, problem: str) -> None:
        reason = f"{problem} (the indexer checks again every {self.settings.poll_seconds:g}s)"
        if self._last_failure is None or self._last_failure[1] != reason:
            log.error("index bundle not usable, not serving: %s", reason)
        self._last_failure = (snapshot, reason)
        self.holder.set_reason(reason)

    # ------------------------------------------------------------------ while serving
    def check_for_changes(self) -> None:
        """One look at `current` and the deletion list (what the watcher thread does every watch_seconds)."""
        root = self.root
        if root is not None:
            try:
                pointer = read_current(root)
            except BundleError as error:
                pointer = None
                self._log_once(("pointer", str(error)), "cannot read the bundle pointer, the live version stays: %s", error)
            if pointer is not None and pointer != self._pointer_seen:
                snapshot = _snapshot(root)
                if self._last_failure is None or self._last_failure[0] != snapshot:
                    try:
                        self._load(version=pointer, trigger="pointer", allow_model_change=self.settings.allow_model_change)
                        self._pointer_seen = pointer
                        self._last_failure = None
                    except (BundleError, Incompatible) as error:
                        live = self.holder.current
                        log.error(
                            "%s names version %s, which cannot be served; still serving %s: %s",
                            root / CURRENT_FILE, pointer, live.version if live else "nothing", error,
                        )
                        self._last_failure = (snapshot, str(error))
        self._check_deleted()

    def _log_once(self, key: tuple, message: str, *args) -> None:
        if getattr(self, "_logged", None) != key:
            self._logged = key
            log.error(message, *args)

    def _check_deleted(self, force: bool = False) -> None:
        index = self.holder.current
        if index is None:
            return
        path = index.bundle.deleted_list
        state = _file_state(path)
        if not force and state == self._deleted_state:
            return
        try:
            deleted = read_deleted(path.parent)
        except BundleError as error:
            self._log_once(("deleted", str(error)), "%s; the previous deletion list stays in force", error)
            return
        before = index.deleted_count
        count = index.set_deleted(deleted)
        self._deleted_state = state
        indexer_metrics.set_bundle(index.bundle, served=index.served_count, deleted=count)
        if count != before or force:
            log.info("deletion list %s: %d items of bundle %s hidden", path, count, index.version)

    # ------------------------------------------------------------------ reload
    def reload(self, version: str = "", *, allow_model_change: bool = False) -> ReloadResult:
        """Serve `version` (default: what `current` names) after opening, checking and warming it.
        Raises BundleError / Incompatible (the live version stays) when it cannot be served."""
        root = self.root
        live = self.holder.current
        if root is None:
            if version and (live is None or version != live.version):
                raise BundleError(
                    f"the indexer serves the single version folder {self.settings.bundle}: point "
                    "CBIR_INDEXER_BUNDLE at the bundle root to switch between versions"
                )
            target = None
        else:
            target = version or read_current(root)
            if target is None:
                raise BundleError(f"{root} has no {CURRENT_FILE} file: name a version to serve")
        allow = allow_model_change or self.settings.allow_model_change
        result = self._load(version=target, trigger="rpc", allow_model_change=allow)
        if root is not None and not version:
            self._pointer_seen = target
        return result

    def _load(self, *, version: str | None, trigger: str, allow_model_change: bool) -> ReloadResult:
        with self._load_lock:
            live = self.holder.current
            if live is not None and (version is None and self.root is None or version == live.version):
                self._check_deleted(force=True)
                indexer_metrics.RELOADS.labels(trigger, "unchanged").inc()
                return ReloadResult(False, live.version, live.version, live.served_count, live.deleted_count, 0.0)
            start = time.perf_counter()
            path = Path(self.settings.bundle)
            try:
                if version is None:
                    bundle = open_bundle(
                        path, verify_checksums=self.settings.verify_checksums, prefault=self.settings.prefault
                    )
                else:
                    bundle = open_bundle(
                        path, version=version, verify_checksums=self.settings.verify_checksums,
                        prefault=self.settings.prefault,
                    )
            except BundleError:
                indexer_metrics.RELOADS.labels(trigger, "refused").inc()
                raise
            try:
                self._check_model(bundle, live, allow_model_change)
                index = SearchIndex(bundle, max_k=self.settings.max_k, verification=self.settings.verification())
                index.set_deleted(read_deleted(bundle.deleted_list.parent))
                warm = self._warm_up(index)
            except BaseException:
                bundle.close()
                indexer_metrics.RELOADS.labels(trigger, "refused").inc()
                raise
            if self._stop.is_set():
                bundle.close()
                raise BundleError("the indexer is shutting down")
            self._deleted_state = _file_state(bundle.deleted_list)
            seconds = time.perf_counter() - start
            previous = self.holder.swap(index)
            indexer_metrics.set_bundle(bundle, served=index.served_count, deleted=index.deleted_count)
            indexer_metrics.BUNDLE_LOAD_SECONDS.set(seconds)
            indexer_metrics.RELOADS.labels(trigger, "ok").inc()
            self._log_served(bundle, index, seconds, warm, previous)
            self.on_ready(index)
            if previous is not None:
                previous.close(_CLOSE_WAIT_S)
            return ReloadResult(
                True, index.version, previous.version if previous else "", index.served_count,
                index.deleted_count, seconds,
            )

    def _check_model(self, bundle: Bundle, live: SearchIndex | None, allow_model_change: bool) -> None:
        expected = self.settings.model_fingerprint
        if expected and bundle.model_fingerprint != expected:
            raise Incompatible(
                f"bundle {bundle.path} was built with model {bundle.model_fingerprint!r}, but this indexer serves "
                f"only model {expected!r} (CBIR_INDEXER_MODEL_FINGERPRINT); rebuild it with that model"
            )
        if live is not None and not allow_model_change and bundle.model_fingerprint != live.model_fingerprint:
            raise Incompatible(
                f"bundle {bundle.path} was built with model {bundle.model_fingerprint!r} but the live version "
                f"{live.version} with {live.model_fingerprint!r}: the embedders answer queries with the live "
                f"model, so switching would fail every search. Rebuild it with the live model, or switch "
                f"embedders and index together (allow_model_change)"
            )

    def _warm_up(self, index: SearchIndex) -> str:
        if not self.settings.warm_up:
            return ""
        start = time.perf_counter()
        names = [index.bundle.index_file, ITEMS_FILE] + ([PCA_FILE] if index.bundle.pca is not None else [])
        touched = touch_files(index.bundle.path, names)
        queries = index.warm_up(self.settings.warm_up_queries)
        seconds = time.perf_counter() - start
        indexer_metrics.WARM_UP_SECONDS.set(seconds)
        return f", warmed up in {seconds:.2f}s ({touched / 2**20:.1f} MiB read, {queries} queries)"

    def _log_served(self, bundle: Bundle, index: SearchIndex, seconds: float, warm: str, previous) -> None:
        manifest = bundle.manifest
        log.info(
            "serving index bundle %s from %s: %d items%s, %s, %d-d%s, %s, model %s (opened in %.2fs%s%s)%s",
            manifest.version, bundle.path, manifest.item_count,
            f" ({index.deleted_count} deleted)" if index.deleted_count else "", manifest.metric,
            manifest.index_dimension, f" (PCA from {manifest.input_dimension})" if manifest.pca else "",
            f"{manifest.trees} trees" if manifest.index_type == "annoy" else f"{manifest.index_type} index",
            manifest.model_fingerprint, seconds,
            ", checksums verified" if self.settings.verify_checksums else "", warm,
            f"; replaces {previous.version}" if previous is not None else "",
        )
