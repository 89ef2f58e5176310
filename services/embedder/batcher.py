"""Dynamic batching: images of concurrent requests share one model call.

Request threads `embed()` their decoded pixels; one worker thread takes the first waiting job,
gathers more until it has `max_batch` images or `timeout_s` has passed since that first job
arrived, runs the model once and hands each caller its own rows. While the model runs, new jobs
queue up, so under load batches fill by themselves.

The wait is only spent on requests known to be coming: the servicer announces each request while
it decodes its images (`arriving()`), and a batch waits (at most `timeout_s`) only while some
announced request has not reached `embed()` yet. A lone request runs at once, without waiting for
the timeout; when several clients send at the same moment (the batch before answered them all
together), the batch waits for all of them instead of running the first one alone.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import prometheus_client

from cbir import metrics
from cbir.errors import NotReady

log = logging.getLogger(__name__)

BATCH_SIZE = prometheus_client.Histogram(
    "cbir_embedder_batch_size",
    "Images per model call of the embedder's dynamic batcher.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


@dataclass
class _Job:
    pixels: np.ndarray | list  # (n, 224, 224, 3) uint8, or n images of any shapes (keep_aspect); n <= max_batch
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


_STOP = object()
_POLL_S = 0.001  # how often a gathering batch looks again whether announced requests are still coming


class Batcher:
    """Groups the pixels of concurrent callers into batches for `run` ((N, ...) -> (N, D))."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], *, max_batch: int, timeout_s: float,
                 name: str = "embedder-batcher"):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._run = run
        self._max_batch = max_batch
        self._timeout_s = timeout_s
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._carry: _Job | None = None
        self._arriving = 0  # announced requests that have not reached embed() yet
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def arriving(self):
        """Announce a request whose images are being decoded: batches wait for it (up to the timeout).

        Pass the yielded token to `embed(..., arrival=token)`, which ends the announcement when the
        job is queued; leaving the block without embedding (every image was bad) ends it too."""
        token = [True]
        with self._lock:
            self._arriving += 1
        try:
            yield token
        finally:
            with self._lock:
                if token[0]:
                    token[0] = False
                    self._arriving -= 1

    def embed(self, pixels: np.ndarray, arrival: list | None = None) -> np.ndarray:
        """(n, ...) pixels -> (n, D) rows, computed together with whatever else is waiting. Blocks."""
        jobs = []
        with self._lock:  # a job is never queued behind the stop marker
            if arrival is not None and arrival[0]:
                arrival[0] = False
                self._arriving -= 1
            if self._closed:
                raise NotReady("the embedder is shutting down; retry on another replica")
            for start in range(0, len(pixels), self._max_batch):
                job = _Job(pixels[start:start + self._max_batch])
                self._queue.put(job)
                jobs.append(job)
        return np.concatenate([job.future.result() for job in jobs])

    def close(self, timeout_s: float = 60.0) -> None:
        """Finish the jobs already queued, then stop the worker thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("batcher worker still busy after %.0f s; leaving it", timeout_s)

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._carry or self._queue.get()
            self._carry = None
            if first is _STOP:
                break
            jobs, count = [first], len(first.pixels)
            deadline = first.arrived + self._timeout_s
            while count < self._max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    wait = deadline - time.monotonic()
                    if wait <= 0 or not self._arriving:
                        break  # nothing queued and nothing announced (or waited long enough): run now
                    try:
                        job = self._queue.get(timeout=min(wait, _POLL_S))
                    except queue.Empty:
                        continue
                if job is _STOP:
                    stopping = True
                    break
                if count + len(job.pixels) > self._max_batch:
                    self._carry = job  # first in the next batch
                    break
                jobs.append(job)
                count += len(job.pixels)
            self._run_batch(jobs, count)

    def _run_batch(self, jobs: list[_Job], count: int) -> None:
        BATCH_SIZE.observe(count)
        started = time.monotonic()
        for job in jobs:  # time from queued to its batch's model call: batching wait plus any backlog
            metrics.STAGE_SECONDS.labels("embedder", "queue").observe(started - job.arrived)
        try:
            pixels = jobs[0].pixels if len(jobs) == 1 else _joined([job.pixels for job in jobs])
            rows = self._run(pixels)
        except BaseException as error:  # every caller learns about it; the worker carries on
            for job in jobs:
                job.future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        start = 0
        for job in jobs:
            job.future.set_result(rows[start:start + len(job.pixels)])
            start += len(job.pixels)


def _joined(parts: list) -> np.ndarray | list:
    """The pixels of several jobs as one batch: stacked arrays, or one list of images of any shapes."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return [image for part in parts for image in part]
