"""Metadata filters (cbir.filters): the condition syntax, then filtered searches through a real indexer
over gRPC (Annoy and faiss HNSW bundles with metadata), the real gateway in front of it, and the whole
stack (real embedder) through the CLI."""

from __future__ import annotations

import json
import socket
from datetime import date, timedelta

import grpc
import numpy as np
import pytest
from click.testing import CliRunner

from apps.cli import main as cli
from cbir import filters
from cbir import vectors as wire
from cbir.bundle import open_bundle, write_bundle
from cbir.client import GatewayClient
from cbir.filters import DateRange, Equals, FilterError, NumberRange, OneOf, parse_condition, parse_filter
from cbir.health import wait_until_serving
from cbir.v1 import common_pb2, indexer_pb2, indexer_pb2_grpc
from services.indexer.index import SearchIndex
from services.indexer.server import IndexerServer
from services.indexer.settings import IndexerSettings

N = 2000
DIM = 32
FINGERPRINT = "fp-filters"
COUNTRIES = ["fr", "de", "it", "es", "nl"]
RARE = [3, 42, 333, 777, 1234, 1500, 1999]  # the only items with rare=yes: 0.35 % of the bundle
FIRST_DAY = date(2015, 1, 1)


# ----------------------------------------------------------------------------------- the syntax


@pytest.mark.parametrize("text, expected", [
    ("country=fr", Equals("country", "fr")),
    (" country == fr ", Equals("country", "fr")),
    ("title=a walk in the park", Equals("title", "a walk in the park")),
    ("tag in cat, dog,,bird", OneOf("tag", frozenset({"cat", "dog", "bird"}))),
    ("year>=2010", NumberRange("year", low="2010")),
    ("year>2010.5", NumberRange("year", low="2010.5", low_exclusive=True)),
    ("year<=-3", NumberRange("year", high="-3")),
    ("taken<2020-01-01", DateRange("taken", high="2020-01-01", high_exclusive=True)),
    ("taken>=2020-01-01T10:00:00+02:00", DateRange("taken", low="2020-01-01T10:00:00+02:00")),
])
def test_conditions_in_the_cli_syntax(text, expected):
    assert parse_condition(text) == expected


@pytest.mark.parametrize("text, says", [
    ("country", "is not a condition; write one of: field=value"),
    ("country!=fr", "!= is not supported"),
    ("year>=", "has no value after >="),
    ("tag in  ,", "lists no values after 'in'"),
    ("year>=soon", "'soon' is neither a number nor an ISO 8601 date"),
    ("taken<2020-13-01", "'2020-13-01' is neither a number nor an ISO 8601 date"),
    (" =3", "filter condition without a field name"),
])
def test_a_malformed_condition_says_what_is_wrong_in_words(text, says):
    with pytest.raises(FilterError) as caught:
        parse_condition(text)
    assert says in str(caught.value)


def test_a_filter_is_many_conditions_and_survives_the_wire():
    """';' and new lines separate conditions (the UI's box); the proto form gives the same filter back."""
    conditions = parse_filter("country=fr; year>=2010\n tag in a,b ;; taken<2020-01-01")
    assert [str(c) for c in conditions] == ["country=fr", "year>=2010", "tag in a,b", "taken<2020-01-01"]
    assert filters.from_proto(filters.to_proto(conditions)) == conditions
    assert parse_filter(["year>=2010", "  "]) == (NumberRange("year", low="2010"),)


@pytest.mark.parametrize("condition, says", [
    (common_pb2.Condition(field="year"), "sets no test"),
    (common_pb2.Condition(equals="fr"), "has no field name"),
    (common_pb2.Condition(field="year", number=common_pb2.Range()), "needs a lower or an upper bound"),
    (common_pb2.Condition(field="year", number=common_pb2.Range(min="x")), "'x' is not a number"),
    (common_pb2.Condition(field="year", number=common_pb2.Range(min="2020", max="2010")), "nothing can match"),
    (common_pb2.Condition(field="tag", one_of=common_pb2.ValueSet()), "needs at least one value"),
    (common_pb2.Condition(field="taken", date=common_pb2.Range(max="yesterday")), "'yesterday' is neither"),
])
def test_a_malformed_wire_condition_is_refused_in_words(condition, says):
    with pytest.raises(FilterError) as caught:
        filters.from_proto(common_pb2.Filter(conditions=[condition]))
    assert says in str(caught.value)


def test_a_date_bound_stands_for_its_whole_day():
    """`<= d` keeps the whole of day d, `> d` starts the next day, `< d` ends before it; datetimes are moments
    (no zone = UTC)."""
    # the fourth is 2020-01-01T01:00 in UTC
    values = ["2020-01-01", "2020-01-01T23:59:59", "2020-01-02", "2019-12-31T23:00:00-02:00", "not a date"]
    stamps = np.array([filters.as_timestamp(v) for v in values])
    assert parse_condition("taken<=2020-01-01").holds(stamps).tolist() == [True, True, False, True, False]
    assert parse_condition("taken>2020-01-01").holds(stamps).tolist() == [False, False, True, False, False]
    assert parse_condition("taken<2020-01-01").holds(stamps).tolist() == [False, False, False, False, False]
    assert parse_condition("taken>=2020-01-01T01:00Z").holds(stamps).tolist() == [False, True, True, True, False]
    assert parse_condition("taken<2020-01-01T01:00").holds(stamps).tolist() == [True, False, False, False, False]


# ----------------------------------------------------------------------------------- a bundle with metadata


def metadata_of(i: int) -> dict[str, str]:
    taken = FIRST_DAY + timedelta(days=i % 1000)
    row = {"country": COUNTRIES[i % 5], "tag": f"t{i % 10}", "taken": taken.isoformat()}
    if i % 7 == 0:
        row["taken"] = f"{taken.isoformat()}T12:30:00Z"  # some values are datetimes
    if i % 50:
        row["year"] = str(1990 + i % 30)  # every 50th item has no year
    if i in RARE:
        row["rare"] = "yes"
    return row


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(20, DIM)) * 3
    return (centers[rng.integers(0, 20, N)] + rng.normal(size=(N, DIM))).astype(np.float32)


def build(root, vectors, index_type: str, metadata=True):
    ids = [f"item-{i}" for i in range(N)]
    return write_bundle(
        root, ids=ids, urls=[f"https://img.example/{i}.jpg" for i in ids], vectors=vectors,
        model=common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=DIM, fingerprint=FINGERPRINT),
        metric="angular", trees=8, index_type=index_type,
        metadata=[metadata_of(i) for i in range(N)] if metadata else None,
    )


@pytest.fixture(scope="module", params=["annoy", "hnsw"])
def indexer(request, tmp_path_factory, vectors):
    """(index type, stub) of a real indexer on 127.0.0.1:0 serving a bundle of that index type."""
    root = tmp_path_factory.mktemp(request.param) / "bundle"
    build(root, vectors, request.param)
    server = IndexerServer(IndexerSettings(bundle=root, port=0, metrics_port=None, max_k=100))
    server.start_serving()
    target = f"127.0.0.1:{server.port}"
    wait_until_serving(target, service="cbir.v1.Indexer", timeout_s=30)
    channel = grpc.insecure_channel(target)
    yield request.param, indexer_pb2_grpc.IndexerStub(channel), target
    channel.close()
    server.stop(0)


def number(hit) -> int:
    return int(hit.item_id.split("-")[1])


def exact_among(vectors: np.ndarray, query: np.ndarray, allowed, k: int) -> list[int]:
    """The k allowed rows nearest to `query` by cosine, found by brute force."""
    allowed = np.array(sorted(allowed))
    unit = vectors[allowed] / np.linalg.norm(vectors[allowed], axis=1, keepdims=True)
    order = np.argsort(-(unit @ (query / np.linalg.norm(query))), kind="stable")
    return allowed[order[:k]].tolist()


def matching(condition) -> set[int]:
    """The items meeting `condition` (a predicate over an item's metadata)."""
    return {i for i in range(N) if condition(metadata_of(i))}


def query_vector(stub, vector, k, conditions=(), **fields):
    request = indexer_pb2.QueryVectorRequest(vector=wire.to_proto(vector), k=k, model_fingerprint=FINGERPRINT,
                                             filter=filters.to_proto(parse_filter(conditions)), **fields)
    return stub.QueryVector(request, timeout=10).hits


def query_item(stub, item_id, k, conditions=(), **fields):
    request = indexer_pb2.QueryItemRequest(item_id=item_id, k=k, filter=filters.to_proto(parse_filter(conditions)),
                                           **fields)
    return stub.QueryItem(request, timeout=10).hits


def noisy(vectors, row: int, seed: int = 0) -> np.ndarray:
    return vectors[row] + 0.3 * np.random.default_rng(seed).normal(size=DIM).astype(np.float32)


# ----------------------------------------------------------------------------------- filtered searches


@pytest.mark.parametrize("conditions, holds", [
    (["country=fr"], lambda m: m["country"] == "fr"),
    (["tag in t1,t3,nope"], lambda m: m["tag"] in ("t1", "t3")),
    (["year>=2015"], lambda m: "year" in m and int(m["year"]) >= 2015),
    (["year<1995", "year>1991"], lambda m: "year" in m and 1991 < int(m["year"]) < 1995),
    (["taken<2015-03-01"], lambda m: m["taken"][:10] < "2015-03-01"),
    (["taken<=2015-01-10", "country in fr,de"], lambda m: m["taken"][:10] <= "2015-01-10" and m["country"] in ("fr", "de")),
])
def test_only_matching_items_come_back_k_of_them_nearest_first(indexer, vectors, conditions, holds):
    """Equality, set, number range and date range filters (and their AND): every hit meets the filter, k hits
    come back (all of them when fewer match), and they are the exact nearest matching items (few are allowed:
    searched exactly)."""
    _, stub, _ = indexer
    allowed = matching(holds)
    for seed, row in enumerate([5, 900, 1717]):
        query = noisy(vectors, row, seed)
        hits = query_vector(stub, query, 20, conditions)
        assert len(hits) == min(20, len(allowed))  # the last filter: 8 items
        assert all(holds(dict(hit.metadata)) for hit in hits), [dict(h.metadata) for h in hits]
        assert [number(h) for h in hits] == exact_among(vectors, query, allowed, 20)
        assert [h.distance for h in hits] == sorted(h.distance for h in hits)


def test_k_hits_when_k_items_match_even_at_very_low_selectivity(indexer, vectors):
    """7 items of 2000 match: k = 5 gives the nearest 5 of them, k = 20 gives all 7 (and no other item)."""
    _, stub, _ = indexer
    query = noisy(vectors, 100)
    five = query_vector(stub, query, 5, ["rare=yes"])
    assert [number(h) for h in five] == exact_among(vectors, query, RARE, 5)
    everything = query_vector(stub, query, 20, ["rare=yes"])
    assert sorted(number(h) for h in everything) == sorted(RARE)
    assert query_vector(stub, query, 5, ["rare=no"]) == []  # a value no item has: nothing, not an error


def test_a_filter_allowing_most_items_is_applied_inside_the_ann_search(indexer, vectors, monkeypatch):
    """60 % of the items match and the effort is small: the ANN search itself finds k matching items (Annoy by
    asking for more neighbours, faiss within an IDSelector), without the exact search over the allowed items."""
    index_type, stub, _ = indexer

    def no_exact_search(*args, **kwargs):
        raise AssertionError("the exact search over the allowed items ran")

    monkeypatch.setattr(f"cbir.bundle.{'annoy' if index_type == 'annoy' else 'faiss'}_index.nearest_in",
                        no_exact_search)
    allowed = matching(lambda m: m["country"] in ("fr", "de", "it"))
    found = []
    for seed, row in enumerate(range(0, N, 97)):
        query = noisy(vectors, row, seed)
        hits = query_vector(stub, query, 10, ["country in fr,de,it"], search_k=200 if index_type == "annoy" else 10)
        assert len(hits) == 10 and {number(h) for h in hits} <= allowed
        found.append(len({number(h) for h in hits} & set(exact_among(vectors, query, allowed, 10))))
    assert np.mean(found) / 10 >= 0.8  # recall@10 among the matching items


def test_query_item_is_filtered_too_and_can_leave_itself_out(indexer):
    _, stub, _ = indexer
    hits = query_item(stub, "item-10", 8, ["country=fr"])  # item 10 is from fr: itself first
    assert hits[0].item_id == "item-10" and len(hits) == 8
    assert all(h.metadata["country"] == "fr" for h in hits)
    others = query_item(stub, "item-10", 8, ["country=fr"], exclude_self=True)
    assert "item-10" not in [h.item_id for h in others] and len(others) == 8
    assert [h.item_id for h in others] == [h.item_id for h in hits[1:]] + [others[-1].item_id]
    elsewhere = query_item(stub, "item-11", 8, ["country=fr"])  # item 11 is from de: not among its hits
    assert "item-11" not in [h.item_id for h in elsewhere] and all(h.metadata["country"] == "fr" for h in elsewhere)


def test_min_score_still_drops_weaker_hits_within_the_filter(indexer, vectors):
    _, stub, _ = indexer
    hits = query_vector(stub, vectors[10], 50, ["country=fr"])
    assert hits[5].score > hits[6].score
    kept = query_vector(stub, vectors[10], 50, ["country=fr"], min_score=(hits[5].score + hits[6].score) / 2)
    assert [h.item_id for h in kept] == [h.item_id for h in hits[:6]]


@pytest.mark.parametrize("condition, says", [
    (common_pb2.Condition(field="colour", equals="red"),
     "filter field 'colour' is not a metadata field of the items of bundle"),
    (common_pb2.Condition(field="year", number=common_pb2.Range(min="2010", max="2000")), "nothing can match"),
    (common_pb2.Condition(field="taken", date=common_pb2.Range(min="last week")), "'last week' is neither"),
])
def test_a_bad_filter_is_invalid_argument_in_words(indexer, vectors, condition, says):
    _, stub, _ = indexer
    request = indexer_pb2.QueryVectorRequest(vector=wire.to_proto(vectors[0]), k=5,
                                             filter=common_pb2.Filter(conditions=[condition]))
    with pytest.raises(grpc.RpcError) as caught:
        stub.QueryVector(request, timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert says in caught.value.details()
    if condition.field == "colour":  # the fields the items have, to pick from
        assert caught.value.details().endswith("its fields are: country, rare, tag, taken, year")


# ----------------------------------------------------------------------------------- in process


def test_deleted_items_stay_out_of_filtered_answers(tmp_path, vectors):
    """A filter's items are re-derived when the deletion list changes (not served from a stale cache)."""
    index = SearchIndex(open_bundle(build(tmp_path / "b", vectors, "annoy")))
    try:
        rare = parse_filter("rare=yes")
        assert len(index.query_vector(vectors[3], k=20, conditions=rare)) == 7
        index.set_deleted({"item-3", "item-42"})
        hits = index.query_vector(vectors[3], k=20, conditions=rare)
        assert sorted(int(h.item_id[5:]) for h in hits) == sorted(set(RARE) - {3, 42})
        index.set_deleted(set())
        assert len(index.query_vector(vectors[3], k=20, conditions=rare)) == 7
    finally:
        index.close()


def test_a_bundle_without_metadata_says_so(tmp_path, vectors):
    index = SearchIndex(open_bundle(build(tmp_path / "b", vectors, "annoy", metadata=False)))
    try:
        with pytest.raises(FilterError, match="have no metadata"):
            index.query_vector(vectors[0], k=5, conditions=parse_filter("country=fr"))
    finally:
        index.close()


# ----------------------------------------------------------------------------------- the gateway and the CLI


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_gateway_searches_by_id_with_a_filter_through_the_real_indexer(indexer):
    """SearchById (no embedder involved) through the real gateway and indexer; the indexer's INVALID_ARGUMENT
    for an unknown field reaches the client with its words."""
    from services.gateway.server import GatewayServer
    from services.gateway.settings import GatewaySettings

    _, _, indexer_target = indexer
    gateway = GatewayServer(GatewaySettings(port=0, metrics_port=None, embedder_target=f"127.0.0.1:{closed_port()}",
                                            indexer_target=indexer_target))
    gateway.start_serving()
    try:
        with GatewayClient(f"127.0.0.1:{gateway.port}", timeout_s=10) as client:
            hits = client.search_id("item-7", k=10, filter=["country in it,es", "year>=2000"]).hits
            assert len(hits) == 10
            assert all(h.metadata["country"] in ("it", "es") and int(h.metadata["year"]) >= 2000 for h in hits)
            with pytest.raises(grpc.RpcError) as caught:
                client.search_id("item-7", k=10, filter="colour=red")
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "'colour' is not a metadata field" in caught.value.details()
    finally:
        gateway.stop(0)


def test_cli_refuses_a_malformed_filter_before_calling_anyone(tmp_path):
    image = tmp_path / "q.jpg"
    image.write_bytes(b"not sent anywhere")
    result = CliRunner().invoke(cli, ["search", str(image), "--filter", "year>=soon",
                                      "--gateway", f"127.0.0.1:{closed_port()}"])
    assert result.exit_code == 2
    assert "Invalid value for '--filter'" in result.output and "'soon' is neither a number" in result.output


@pytest.fixture(scope="module")
def photo_stack(tmp_path_factory, random_embedder, bundle):
    """The real embedder, indexer and gateway over the demo photos' bundle rebuilt with metadata: `place` is
    "nested" for the photos in the nested folder, else "top"; `year` 2000 + the row."""
    from services.embedder.server import EmbedderServer
    from services.embedder.settings import EmbedderSettings
    from services.gateway.server import GatewayServer
    from services.gateway.settings import GatewaySettings

    with open_bundle(bundle.root) as built:
        records = list(built.iter_items())
        vectors = np.array(built.features())
        model, metric = built.manifest.model_info(), built.metric
    root = tmp_path_factory.mktemp("with-metadata") / "photos"
    write_bundle(root, ids=[r.item_id for r in records], urls=[r.url for r in records], vectors=vectors, model=model,
                 metric=metric, trees=10,
                 metadata=[{"place": "nested" if r.item_id.startswith("nested/") else "top", "year": str(2000 + i)}
                           for i, r in enumerate(records)])
    embedder = EmbedderServer(EmbedderSettings(port=0, metrics_port=None, weights="random", random_seed=7))
    embedder.start()
    embedder.load(random_embedder)
    indexer = IndexerServer(IndexerSettings(port=0, metrics_port=None, bundle=root))
    indexer.start_serving()
    wait_until_serving(f"127.0.0.1:{indexer.port}")
    gateway = GatewayServer(GatewaySettings(port=0, metrics_port=None, embedder_target=f"127.0.0.1:{embedder.port}",
                                            indexer_target=f"127.0.0.1:{indexer.port}"))
    gateway.start_serving()
    yield f"127.0.0.1:{gateway.port}"
    for server in (gateway, indexer, embedder):
        server.stop(0)


@pytest.mark.slow
def test_cli_search_with_filters_through_the_whole_stack(photo_stack, collection):
    """`cbir search IMAGE --filter ...` (SearchByImage: the real embedder, then the indexer) and with two
    IMAGEs (SearchBatch): only matching photos come back, k of them when k match."""
    photo = next(collection.rglob("skimage-coffee.jpg"))  # a top-level photo
    run = CliRunner().invoke(cli, ["search", str(photo), "--k", "4", "--filter", "place=nested", "--json",
                                   "--gateway", photo_stack])
    assert run.exit_code == 0, run.output
    hits = json.loads(run.output)["hits"]
    assert len(hits) == 4 and all(h["item_id"].startswith("nested/") for h in hits)

    everything = CliRunner().invoke(cli, ["search", str(photo), "--k", "20", "--json", "--gateway", photo_stack])
    years = sorted(int(h["metadata"]["year"]) for h in json.loads(everything.output)["hits"])
    cut = years[len(years) // 2]
    other = next(collection.rglob("opencv-baboon.jpg"))
    run = CliRunner().invoke(cli, ["search", str(photo), str(other), "--k", "20", "--filter", f"year>={cut}",
                                   "--filter", "place in top,nested", "--json", "--gateway", photo_stack])
    assert run.exit_code == 0, run.output
    for result in json.loads(run.output):
        assert sorted(int(h["metadata"]["year"]) for h in result["hits"]) == [y for y in years if y >= cut]

    run = CliRunner().invoke(cli, ["search", str(photo), "--filter", "colour=red", "--gateway", photo_stack])
    assert run.exit_code == 1
    assert "INVALID_ARGUMENT: filter field 'colour' is not a metadata field" in run.output
    assert "its fields are: place, year" in run.output
