"""services.indexer.index: queries over an opened bundle, called directly (no network)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cbir.bundle import open_bundle, write_bundle
from cbir.errors import Incompatible, InvalidRequest, NotFound, NotReady
from cbir.v1 import common_pb2
from services.indexer.index import IndexHolder, SearchIndex, score

DIM = 32
N = 400


def model(fingerprint: str = "fp-A") -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=DIM, fingerprint=fingerprint)


def clustered(n: int = N, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, DIM)) * 3
    return (centers[rng.integers(0, 8, n)] + rng.normal(size=(n, DIM))).astype(np.float32)


def make_index(root, *, metric="angular", pca_dimension=0, whiten=False, n=N, max_k=1000, trees=6):
    vectors = clustered(n)
    ids = [f"item{i}" for i in range(n)]
    write_bundle(
        root, ids=ids, urls=[f"file:///photos/{i}.jpg" for i in ids], vectors=vectors, model=model(),
        metric=metric, trees=trees, pca_dimension=pca_dimension, pca_whiten=whiten,
        metadata=[{"row": i} for i in range(n)],
    )
    return SearchIndex(open_bundle(root), max_k=max_k), vectors


@pytest.fixture
def angular(tmp_path):
    index, vectors = make_index(tmp_path / "b")
    yield index, vectors
    index.close()


@pytest.mark.parametrize(
    "metric,pca_dimension,whiten",
    [("angular", 0, False), ("euclidean", 0, False), ("manhattan", 0, False),
     ("angular", 12, False), ("angular", 12, True), ("euclidean", 12, True)],
)
def test_a_stored_vector_finds_itself_first_with_score_one(tmp_path, metric, pca_dimension, whiten):
    """For every metric, with and without PCA (+whitening applied to the query): the item's own vector
    returns that item first, distance ~0, score ~1, the rest best first with scores in [0, 1]."""
    index, vectors = make_index(tmp_path / "b", metric=metric, pca_dimension=pca_dimension, whiten=whiten)
    try:
        for i in (0, 123, N - 1):
            hits = index.query_vector(vectors[i], k=10)
            assert len(hits) == 10
            assert hits[0].item_id == f"item{i}"
            assert hits[0].url == f"file:///photos/item{i}.jpg"
            assert hits[0].metadata == {"row": str(i)}
            assert hits[0].score == pytest.approx(1.0, abs=1e-4)
            assert hits[0].distance == pytest.approx(0.0, abs=1e-3)
            distances = [h.distance for h in hits]
            assert distances == sorted(distances)
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
            assert all(0.0 <= h.score <= 1.0 for h in hits)
    finally:
        index.close()


def test_results_match_exact_search_at_the_default_search_k(angular):
    """On a small clustered set the default search_k finds (nearly) the exact top 10 by cosine."""
    index, vectors = angular
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = clustered(20, seed=7)
    recall = []
    for q in queries:
        exact = np.argsort(-(unit @ (q / np.linalg.norm(q))))[:10]
        got = {int(h.item_id[4:]) for h in index.query_vector(q, k=10)}
        recall.append(len(got & set(exact.tolist())) / 10)
    assert np.mean(recall) >= 0.95


def test_score_formulas():
    """angular: cosine = 1 - d^2/2 clipped to [0, 1]; euclidean and manhattan: 1 / (1 + d)."""
    assert score("angular", 0.0) == 1.0
    assert score("angular", 1.0) == pytest.approx(0.5)
    assert score("angular", 2.0) == 0.0  # opposite direction
    assert score("euclidean", 0.0) == 1.0
    assert score("manhattan", 3.0) == pytest.approx(0.25)


def test_k_larger_than_the_collection_returns_every_item(tmp_path):
    """k above the item count returns all items, once each, even with a tiny search_k (several Annoy leaves:
    a search that stopped after the first would miss some)."""
    n = 150
    index, vectors = make_index(tmp_path / "b", n=n)
    try:
        for search_k in (0, 1):
            hits = index.query_vector(vectors[0], k=500, search_k=search_k)
            assert sorted(h.item_id for h in hits) == sorted(f"item{i}" for i in range(n))
        assert len(index.query_item("item3", k=500, search_k=1, exclude_self=True)) == n - 1
    finally:
        index.close()


@pytest.mark.parametrize("k", [0, 1001, 10**6])
def test_k_outside_the_allowed_range_is_invalid(angular, k):
    """k must be in [1, max_k]; the message gives the range."""
    index, vectors = angular
    with pytest.raises(InvalidRequest, match="between 1 and 1000"):
        index.query_vector(vectors[0], k=k)
    with pytest.raises(InvalidRequest, match="between 1 and 1000"):
        index.query_item("item0", k=k)


def test_search_k(angular):
    """Negative search_k is invalid; 0 uses the bundle default; a huge one is capped, not an overflow."""
    index, vectors = angular
    with pytest.raises(InvalidRequest, match="search_k must be >= 0"):
        index.query_vector(vectors[0], k=5, search_k=-1)
    default = index.query_vector(vectors[0], k=5)
    assert [h.item_id for h in index.query_vector(vectors[0], k=5, search_k=10**15)] == [h.item_id for h in default]


@pytest.mark.parametrize(
    "vector,message",
    [(np.zeros(DIM + 1, np.float32), "dimension 33"), (np.full(DIM, np.nan, np.float32), "NaN")],
)
def test_bad_vectors_are_invalid(angular, vector, message):
    """A vector of the wrong dimension or with NaN is refused."""
    index, _ = angular
    with pytest.raises(InvalidRequest, match=message):
        index.query_vector(vector, k=5)


def test_another_models_fingerprint_is_incompatible(angular):
    """A vector from another model (fingerprint given) is refused naming both fingerprints; the same one is fine."""
    index, vectors = angular
    with pytest.raises(Incompatible) as excinfo:
        index.query_vector(vectors[0], k=5, model_fingerprint="fp-B")
    assert "'fp-B'" in str(excinfo.value) and "'fp-A'" in str(excinfo.value)
    assert "cbir index build" in str(excinfo.value)
    assert index.query_vector(vectors[0], k=5, model_fingerprint="fp-A")[0].item_id == "item0"


def test_query_item(angular):
    """By item id: the item first (distance 0) unless exclude_self; an unknown id is NotFound naming it."""
    index, vectors = angular
    hits = index.query_item("item42", k=5)
    assert hits[0].item_id == "item42" and hits[0].score == pytest.approx(1.0)
    assert [h.item_id for h in hits] == [h.item_id for h in index.query_vector(vectors[42], k=5)]
    without = index.query_item("item42", k=5, exclude_self=True)
    assert len(without) == 5 and "item42" not in [h.item_id for h in without]
    assert [h.item_id for h in without[:4]] == [h.item_id for h in hits[1:]]
    with pytest.raises(NotFound, match="'no-such-item'"):
        index.query_item("no-such-item", k=5)


def test_get_items(angular):
    """Items come back in request order; unknown ids are listed (a few) in NotFound; empty is invalid."""
    index, _ = angular
    assert [r.item_id for r in index.get_items(["item9", "item2", "item9"])] == ["item9", "item2", "item9"]
    with pytest.raises(NotFound) as excinfo:
        index.get_items(["item1"] + [f"ghost{i}" for i in range(8)])
    message = str(excinfo.value)
    assert "8 of 9" in message and "'ghost0'" in message and "and 3 more" in message and "ghost7" not in message
    with pytest.raises(InvalidRequest, match="no item ids"):
        index.get_items([])


def test_info_describes_the_bundle(tmp_path):
    """IndexInfo carries counts, dimensions, metric, trees, model, version, path and PCA."""
    index, _ = make_index(tmp_path / "b", metric="euclidean", pca_dimension=8, whiten=True)
    try:
        info = index.info()
        m = index.bundle.manifest
        assert (info.item_count, info.dimension, info.input_dimension) == (N, 8, DIM)
        assert (info.metric, info.trees, info.pca_dimension, info.pca_whiten) == ("euclidean", 6, 8, True)
        assert info.model_fingerprint == "fp-A" and info.model == model()
        assert (info.bundle_version, info.bundle_path) == (m.version, str(index.bundle.path))
        assert info.created_at == m.created_at and info.default_search_k == m.default_search_k > 0
    finally:
        index.close()


def test_concurrent_queries_agree_with_sequential_ones(angular):
    """Queries from many threads at once (Annoy without the GIL, SQLite per thread) give the same answers."""
    index, vectors = angular
    expected = {i: [h.item_id for h in index.query_vector(vectors[i], k=20)] for i in range(0, N, 5)}

    def ask(i: int) -> tuple[int, list[str]]:
        return i, [h.item_id for h in index.query_vector(vectors[i], k=20)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(ask, list(expected) * 4))
    assert all(expected[i] == got for i, got in results)


def test_holder_answers_not_ready_until_an_index_is_swapped_in(angular):
    """The holder is the one reference: NotReady with its reason while empty, the index once swapped in."""
    index, _ = angular
    holder = IndexHolder("no bundle at /x: build one")
    with pytest.raises(NotReady, match="no bundle at /x"):
        with holder.lease():
            pass
    assert holder.swap(index) is None
    with holder.lease() as leased:
        assert leased is index
    assert holder.swap(None, reason="shutting down") is index
    with pytest.raises(NotReady, match="shutting down"):
        with holder.lease():
            pass


def test_close_waits_for_requests_still_using_the_index(tmp_path):
    """After a swap, closing the old index waits until the request holding it is done (no unmapped reads)."""
    index, vectors = make_index(tmp_path / "b")
    holder = IndexHolder()
    holder.swap(index)
    entered, release = threading.Event(), threading.Event()
    answers = []

    def slow_request():
        with holder.lease() as leased:
            entered.set()
            release.wait(10)
            answers.append(leased.query_vector(vectors[1], k=3)[0].item_id)

    thread = threading.Thread(target=slow_request)
    thread.start()
    assert entered.wait(10)
    holder.swap(None, reason="reloading")
    closer = threading.Thread(target=index.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive() and not index.bundle.closed  # still in use: not closed yet
    release.set()
    thread.join(10)
    closer.join(10)
    assert answers == ["item1"] and index.bundle.closed
