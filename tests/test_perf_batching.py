"""The dynamic batcher waits only for requests that are known to be coming.

A fake model records the batches it is given; the batch timeout is an hour, so a batcher that
waited for it would leave these tests hanging (caught by the join timeouts) instead of passing.
"""

from __future__ import annotations

import threading

import numpy as np

from services.embedder.batcher import Batcher

HOUR = 3600.0


class Model:
    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.batches.append(len(pixels))
        return pixels.reshape(len(pixels), -1)[:, :2].astype(np.float32)


def rows(*values: int) -> np.ndarray:
    return np.array([[v, v] for v in values], dtype=np.uint8)


def in_thread(fn, *args):
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", fn(*args)))
    thread.start()
    return thread, out


def test_a_lone_request_runs_at_once_without_waiting_for_the_timeout():
    """Nothing else announced: the first job's batch runs immediately (the timeout is an hour)."""
    model = Model()
    batcher = Batcher(model, max_batch=8, timeout_s=HOUR)
    try:
        with batcher.arriving() as arrival:
            thread, out = in_thread(lambda: batcher.embed(rows(7), arrival=arrival))
            thread.join(60)
        assert not thread.is_alive() and out["result"].tolist() == [[7.0, 7.0]]
        assert model.batches == [1]
    finally:
        batcher.close()


def test_a_batch_waits_for_announced_requests_and_takes_them_along():
    """Request B is still decoding (announced) when A is queued: A's batch waits for B and runs both together;
    each caller gets its own rows."""
    model = Model()
    batcher = Batcher(model, max_batch=8, timeout_s=HOUR)
    try:
        with batcher.arriving() as b_arrival:
            with batcher.arriving() as a_arrival:
                a_thread, a_out = in_thread(lambda: batcher.embed(rows(1), arrival=a_arrival))
                a_thread.join(0.5)
                assert a_thread.is_alive() and model.batches == []  # waiting for B, not running A alone
                b_thread, b_out = in_thread(lambda: batcher.embed(rows(2, 3), arrival=b_arrival))
                a_thread.join(60)
                b_thread.join(60)
        assert model.batches == [3]
        assert a_out["result"].tolist() == [[1.0, 1.0]] and b_out["result"].tolist() == [[2.0, 2.0], [3.0, 3.0]]
    finally:
        batcher.close()


def test_an_announced_request_that_never_embeds_stops_holding_the_batch():
    """A request whose images were all bad leaves `arriving()` without embedding: the waiting batch then runs."""
    model = Model()
    batcher = Batcher(model, max_batch=8, timeout_s=HOUR)
    try:
        with batcher.arriving():  # this request will never call embed
            with batcher.arriving() as arrival:
                thread, out = in_thread(lambda: batcher.embed(rows(5), arrival=arrival))
                thread.join(0.5)
                assert thread.is_alive()
        thread.join(60)
        assert not thread.is_alive() and out["result"].tolist() == [[5.0, 5.0]]
        assert model.batches == [1]
    finally:
        batcher.close()
