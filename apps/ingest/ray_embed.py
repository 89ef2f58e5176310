"""`cbir index build --ray`: the build's embedding step on a Ray cluster, through Ray Data.

The pipeline: the items to embed (listed by the coordinator) -> read (file or URL bytes, and the PDQ record
made where the bytes are read; Ray Data fuses this step into the actors' calls) -> an actor pool, one VGG-16
per actor (a GPU each when the cluster has GPUs), that decodes and extracts local features in threads and
embeds, with the same `LocalEmbedding` code as the in-process build (decoding depends on the model's
settings, so it happens where the model is) -> results stream back to the coordinator. `embed_all` has
`build._embed_all`'s contract, so listing, shards, rejects, resume, deletion lists and the bundle stay one
code path (`build._build`). The Ray nodes read the images: a folder source must be at the same path on
every node (a shared volume), or use a manifest of URLs.

Exactly once: the coordinator (the process that runs `cbir index build`) is the only writer. Ray tasks
and actors only compute and return rows tagged with the item's position in the list; the coordinator
writes each position once (a second copy, from a retried task, is dropped) into the shards, keyed by item
id. So a task that Ray runs twice can never write twice, and a killed coordinator resumes from the shards.

Failures: Ray Data restarts a dead actor (its default `max_restarts=-1`) and runs its unfinished batches
again (`max_task_retries=-1`); a read task whose worker died is run again by Ray. When Ray gives up, the
build stops with an error (never a bundle with items missing): the shards keep every result already
written, and the next run embeds only what is missing. After the stream ends the coordinator checks that
every item came back; one that did not is an error too, never a silent loss. A node that leaves takes its
actor with it: the actor restarts where the cluster has room (keep a spare CPU, or GPU, for that).

Ray is imported inside the functions: `cbir` works without the `ray` extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import socket
import threading
import urllib.parse
from typing import Iterator

import numpy as np

from cbir import pdq
from cbir.download import FetchError
from cbir.errors import BadImage
from apps.ingest.build import BuildOptions, make_downloader
from apps.ingest.embedding import Embedded, LocalEmbedding
from apps.ingest.pipeline import ordered_map
from apps.ingest.sources import SourceItem, is_remote, read_bytes

log = logging.getLogger(__name__)

LOCAL = "local"  # `--ray` alone: this machine's Ray (a running one, else a new one for this build)
CONNECT_TIMEOUT_S = 10.0


class RayError(RuntimeError):
    """Ray is missing or unreachable, the cluster cannot run the build, or it lost results."""


class RayEmbedding:
    """VGG-16 run in Ray actors: each builds its own model from `settings` (EmbedderSettings travel
    pickled, so every actor uses the coordinator's configuration). `info` comes from one load here: the
    bundle records it, and every actor's model is checked against it, so vectors of two models never mix."""

    parallel_batches = 1

    def __init__(self, settings):
        from services.embedder.embedder import Embedder

        self.settings = settings
        self.info = Embedder.from_settings(settings).info


def _ray():
    try:
        import ray
    except ImportError:
        raise RayError("--ray needs Ray: pip install 'cbir[ray]'") from None
    return ray


def connect(address: str) -> bool:
    """Join the Ray cluster at `address` (LOCAL, "auto", "HOST:PORT" or "ray://HOST:10001") unless this
    process is already connected; True when this call connected. RayError when it cannot be reached."""
    ray = _ray()
    if ray.is_initialized():
        return False
    if not address.strip():
        raise RayError("an empty Ray address: give HOST:PORT, ray://HOST:PORT, auto, or --ray alone")
    _check_reachable(os.environ.get("RAY_ADDRESS", "") if address == "auto" else address)
    try:
        ray.init(address=None if address == LOCAL else address, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as error:
        where = "this machine" if address == LOCAL else address
        raise RayError(f"cannot join the Ray cluster at {where}: {str(error).splitlines()[0]}") from None
    return True


def _check_reachable(address: str) -> None:
    """RayError unless something accepts connections at the address's host and port: Ray itself waits for
    an unreachable cluster for minutes, then aborts the process."""
    if address in ("", LOCAL, "auto"):
        return  # Ray finds (or starts) it on this machine, and says so quickly when it cannot
    host, _, port = urllib.parse.urlsplit(address if "://" in address else f"//{address}").netloc.rpartition(":")
    if not host or not port.isdigit():
        raise RayError(f"{address!r} is not a Ray address: give HOST:PORT, ray://HOST:PORT, auto, or --ray alone")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise RayError(f"cannot join the Ray cluster at {address}: nothing answers there ({error.strerror or error}); "
                       "is the cluster running, and is that its head's address?") from None


@contextlib.contextmanager
def ray_session(address: str):
    """Connected to Ray for the block; disconnects only if it connected (a caller's connection stays)."""
    connected = connect(address)
    try:
        yield
    finally:
        if connected:
            _ray().shutdown()


def embed_all(items: list[SourceItem], embedding: RayEmbedding, options, downloader=None,
              pdqhash=None) -> Iterator[tuple]:
    """Like `build._embed_all`: (item, (Embedded, PDQ record), None, False) or (item, None, reason, transient)
    for every item, in order, computed on the Ray cluster at `options.ray_address`. `downloader` is not
    used: each read task makes its own (a connection pool does not travel between processes)."""
    if not isinstance(embedding, RayEmbedding):
        raise TypeError("a Ray build needs a RayEmbedding (its settings are what the actors load)")
    if not items:
        return
    with ray_session(options.ray_address):
        dataset = _pipeline(items, embedding, options, with_pdq=pdqhash is not None)
        try:
            yield from _in_order(items, _results(dataset))
        except _ray().exceptions.RayError as error:
            raise RayError(f"the Ray build stopped: {_last_line(error)}. Run the build again: it goes on from "
                           "its work shards") from error


def _last_line(error: Exception) -> str:
    """The worker's error: Ray's message carries its traceback, whose last line names it."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    return next((line for line in reversed(lines) if line), type(error).__name__)


def _pipeline(items: list[SourceItem], embedding: RayEmbedding, options, with_pdq: bool):
    """The Ray Data dataset of results: one row per item, tagged with its position in `items`."""
    ray = _ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the build's own bar counts the items as they come back
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its progress lines would interleave with the bar
    actors, gpus = _pool_size(ray, options)
    rows = [{"index": i, "item_id": item.item_id, "location": item.location} for i, item in enumerate(items)]
    batches = math.ceil(len(rows) / options.batch_size)
    return (
        ray.data.from_items(rows, override_num_blocks=batches)
        # The deletion list stays with the coordinator: a read task needs only the read limits.
        .map_batches(_read_batch, batch_size=options.batch_size,
                     fn_kwargs=dict(options=dataclasses.replace(options, deleted=frozenset()), with_pdq=with_pdq))
        # Two batches per actor at once: one is read and decoded while the other is in the model.
        .map_batches(_EmbedBatch, batch_size=options.batch_size, num_cpus=1, num_gpus=gpus,
                     compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=2,
                                                        enable_true_multi_threading=True),
                     fn_constructor_kwargs=dict(settings=embedding.settings, fingerprint=embedding.info.fingerprint,
                                                decode_workers=options.read_workers))
    )


def _pool_size(ray, options) -> tuple[int, float]:
    """(actors, GPUs per actor): one actor per GPU when the cluster has GPUs, else one per node, always
    leaving a CPU for Ray Data's other tasks (an actor pool that holds every CPU starves them: a deadlock)."""
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if cpus < 2:
        raise RayError(f"the Ray cluster has {cpus} CPU(s); a build needs at least 2 (reading, and the model)")
    if options.ray_actors:
        wanted = options.ray_actors
    elif gpus:
        wanted = gpus
    else:
        wanted = sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) >= 1)
    actors = max(1, min(wanted, cpus - 1))
    if gpus and actors > gpus:
        raise RayError(f"{actors} actors asked for, the Ray cluster has {gpus} GPU(s)")
    return actors, 1.0 if gpus else 0.0


def _read_batch(batch: dict[str, np.ndarray], options: BuildOptions, with_pdq: bool) -> dict[str, np.ndarray]:
    """Read (or download) each item's bytes in threads and make its PDQ record there, where the bytes are
    (as the in-process build does). Runs on a Ray node: in a task, or fused into an actor's call."""
    pdqhash = pdq.load_pdqhash() if with_pdq else None
    if with_pdq and pdqhash is None:
        raise RayError("this Ray worker lacks pdqhash (cbir[pdq]), which the coordinator has: install it on every node")
    items = [SourceItem(str(item_id), str(location), str(location))
             for item_id, location in zip(batch["item_id"], batch["location"])]
    remote = any(is_remote(item.location) for item in items)
    downloader = make_downloader(options) if remote else None

    def read(item: SourceItem) -> tuple[bytes, bytes, str, bool]:
        try:
            data = read_bytes(item, max_bytes=options.max_image_bytes, timeout_s=options.fetch_timeout_s,
                              downloader=downloader)
        except FetchError as error:
            return b"", b"", str(error), error.transient
        record = pdq.hash_bytes(pdqhash, data) if pdqhash else pdq.empty(1)[0]
        return data, np.asarray(record, dtype=pdq.RECORD).tobytes(), "", False

    workers = options.fetch_workers if remote else options.read_workers
    try:
        rows = list(ordered_map(read, items, workers=workers, lookahead=2 * workers))
    finally:
        if downloader is not None:
            downloader.close()
    return {
        "index": batch["index"],
        "data": _objects([data for data, _, _, _ in rows]),
        "pdq": _objects([record for _, record, _, _ in rows]),
        "reason": _objects([reason for _, _, reason, _ in rows]),
        "transient": np.array([passing for _, _, _, passing in rows], dtype=bool),
    }


class _EmbedBatch:
    """A Ray actor: one VGG-16, built once from the coordinator's settings. Each batch is decoded (with its
    local features) in threads, then embedded in one call: `LocalEmbedding`, the in-process build's code."""

    def __init__(self, settings, fingerprint: str, decode_workers: int):
        from services.embedder.embedder import Embedder

        self._embedding = LocalEmbedding(Embedder.from_settings(settings))
        if self._embedding.info.fingerprint != fingerprint:
            raise RayError(f"this Ray node's model is {self._embedding.info.fingerprint}, the build's is {fingerprint} "
                           "(different weights files?): vectors of two models cannot share an index")
        self._dimension = self._embedding.info.dimension
        self._workers = decode_workers
        self._model = threading.Lock()  # one batch in the model at a time, as in the in-process build

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["index"])
        reasons = [str(reason) for reason in batch["reason"]]
        prepared = list(ordered_map(self._prepare, [batch["data"][i] if not reasons[i] else None for i in range(count)],
                                    workers=self._workers, lookahead=count))
        for i, (_, reason) in enumerate(prepared):
            reasons[i] = reasons[i] or reason
        good = [i for i in range(count) if not reasons[i]]
        vectors = np.zeros((count, self._dimension), dtype=np.float32)
        local = [b""] * count
        if good:
            with self._model:
                results = self._embedding.embed([prepared[i][0] for i in good])
            for i, result in zip(good, results):
                if isinstance(result, str):
                    reasons[i] = result
                else:
                    vectors[i], local[i] = result.vector, result.local
        return {"index": batch["index"], "vector": vectors, "local": _objects(local), "pdq": batch["pdq"],
                "reason": _objects(reasons), "transient": batch["transient"]}

    def _prepare(self, data: bytes | None):
        """(decoded pixels and local features, "") or (None, why the image cannot be used)."""
        if data is None:
            return None, ""
        try:
            return self._embedding.prepare(bytes(data)), ""
        except BadImage as error:
            return None, str(error)


def _objects(values: list) -> np.ndarray:
    """A column of bytes or str values (np.array would make a fixed-width array of them)."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def _results(dataset) -> Iterator[tuple[int, tuple]]:
    """(position, (result, reason, transient)) as rows arrive at the coordinator."""
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for row in range(len(batch["index"])):
            reason = str(batch["reason"][row])
            if reason:
                yield int(batch["index"][row]), (None, reason, bool(batch["transient"][row]))
                continue
            embedded = Embedded(np.array(batch["vector"][row], dtype=np.float32), bytes(batch["local"][row]))
            record = np.frombuffer(bytes(batch["pdq"][row]), dtype=pdq.RECORD)[0].copy()
            yield int(batch["index"][row]), ((embedded, record), None, False)


def _in_order(items: list[SourceItem], results: Iterator[tuple[int, tuple]]) -> Iterator[tuple]:
    """Each item's result once, in the items' order: results that arrive early wait, a second copy of a
    result (a task Ray ran again) is dropped, and an item that never came back is an error."""
    waiting: dict[int, tuple] = {}
    next_index = 0
    for index, result in results:
        if index < next_index or index in waiting:
            log.info("dropped a second result for %s (a Ray task that ran again)", items[index].item_id)
            continue
        waiting[index] = result
        while next_index in waiting:
            yield (items[next_index], *waiting.pop(next_index))
            next_index += 1
    if next_index < len(items):
        missing = [i for i in range(next_index, len(items)) if i not in waiting]
        raise RayError(f"Ray returned no result for {len(missing)} of {len(items)} items (first: "
                       f"{items[missing[0]].item_id}); run the build again: it embeds only what is missing")
