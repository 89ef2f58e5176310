"""Filtered against unfiltered search, side by side, through a real indexer over gRPC.

One synthetic clustered set (benchmarks/_common.py: L2-normalised, like GeM features) whose items
carry one metadata column, `bucket` (0-99, uniform, seeded), so that a filter's share of the items
is known: `bucket<10` allows 10 %, `bucket=7` 1 %, `bucket<50` half. For each index type: the
bundle is built with `cbir index build-from-features --ids ids.csv` (the CSV's other columns become
metadata), an indexer process (`python -m services.indexer`) serves it, and QueryVector runs one
query at a time, the filters interleaved query by query (unfiltered, 10 %, 1 %, 50 %, ...): p50 / p99
latency, the ratio to the unfiltered p50, and recall@k against exact search among the allowed items.
The first query of each filter (which reads the `bucket` column from the item table) is timed apart.

With --table-items N: what the metadata column view costs at N items (an item table written here,
no index): reading one field's column, and evaluating a filter over every item.

Usage (100k x 512, annoy and ivfpq: ~5 min on 2 busy cores; an hnsw graph alone takes ~13 min to build):
  nice -n 10 .venv/bin/python benchmarks/filtered_search.py --items 100000 --dim 512
  .venv/bin/python benchmarks/filtered_search.py --items 20000 --dim 128 --types annoy,hnsw --table-items 1000000
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    PYTHON,
    exact_top_k,
    held_out_queries,
    mib,
    percentile,
    service,
    synthetic_model,
    timed_child,
    write_clustered_npy,
)

TYPES = ("annoy", "hnsw", "hnsw-sq8", "ivfpq")
# (label, conditions, which buckets they allow)
FILTERS = [
    ("unfiltered", [], range(100)),
    ("10 %", ["bucket<10"], range(10)),
    ("1 %", ["bucket=7"], [7]),
    ("50 %", ["bucket<50"], range(50)),
]


def write_ids_csv(path: pathlib.Path, buckets: np.ndarray) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write("id,bucket\n")
        for i, bucket in enumerate(buckets):
            handle.write(f"img{i:08d},{bucket}\n")


def query(stub, vector: np.ndarray, k: int, fingerprint: str, conditions: list[str]):
    from cbir import filters
    from cbir.v1 import indexer_pb2
    from cbir.vectors import to_proto

    request = indexer_pb2.QueryVectorRequest(vector=to_proto(vector), k=k, model_fingerprint=fingerprint,
                                             filter=filters.to_proto(filters.parse_filter(conditions)))
    start = time.perf_counter()
    response = stub.QueryVector(request, timeout=60)
    return time.perf_counter() - start, [int(h.item_id[3:]) for h in response.hits]


def table_cost(items: int, workdir: pathlib.Path) -> dict:
    """Seconds to read one field's column at `items` items, and to evaluate filters over them."""
    from cbir.bundle.items import ItemTable, write_items
    from cbir.bundle.metadata import MetadataColumns
    from cbir.filters import parse_filter

    name = f"items-{items}.sqlite"
    if not (workdir / name).exists():
        rng = np.random.default_rng(1)
        rows = [json.dumps({"bucket": str(b), "country": f"c{b % 20}", "taken": f"20{10 + b % 15}-0{1 + b % 9}-1{b % 10}"})
                for b in rng.integers(0, 100, items)]
        write_items(workdir / name, [f"img{i:08d}" for i in range(items)], [""] * items, rows)
    table = ItemTable(workdir, name)
    columns = MetadataColumns(table, items)
    out = {"items": items}
    try:
        for label, conditions in [("read bucket, bucket<10", ["bucket<10"]), ("read country, country=c3", ["country=c3"]),
                                  ("read taken, taken<2015-03-01", ["taken<2015-03-01"])]:
            start = time.perf_counter()
            columns.mask(parse_filter(conditions))
            out[label] = time.perf_counter() - start
        for conditions in (["bucket<10"], ["country in c1,c2", "bucket>=50"], ["taken<2015-03-01"]):
            times = []
            for _ in range(20):
                start = time.perf_counter()
                columns.mask(parse_filter(conditions))
                times.append(time.perf_counter() - start)
            out["evaluate " + "; ".join(conditions)] = statistics.median(times)
    finally:
        table.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--types", default="annoy,ivfpq", help=f"comma-separated, of {', '.join(TYPES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table-items", type=int, default=0, help="also time the metadata columns at this many items")
    parser.add_argument("--workdir", type=pathlib.Path, default=None, help="keep vectors and bundles here")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the results here")
    args = parser.parse_args()
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    if unknown := sorted(set(types) - set(TYPES)):
        parser.error(f"unknown index types {unknown}; choose from {', '.join(TYPES)}")

    import grpc
    from cbir.v1 import indexer_pb2_grpc

    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="filtered-search-"))
    workdir.mkdir(parents=True, exist_ok=True)
    vectors_path = workdir / f"vectors-{args.items}x{args.dim}-s{args.seed}.npy"
    ids_path = workdir / f"ids-{args.items}-s{args.seed}.csv"
    if not vectors_path.exists():
        write_clustered_npy(vectors_path, args.items, args.dim, seed=args.seed)
    buckets = np.random.default_rng(args.seed + 7).integers(0, 100, args.items)
    if not ids_path.exists():
        write_ids_csv(ids_path, buckets)
    queries = held_out_queries(args.dim, args.queries, args.seed)
    fingerprint, model_path = synthetic_model(workdir, args.dim, args.seed)
    base = np.load(vectors_path, mmap_mode="r")
    truth = {}
    for label, _, allowed_buckets in FILTERS:
        allowed = np.flatnonzero(np.isin(buckets, list(allowed_buckets)))
        truth[label] = allowed[exact_top_k(base[allowed], queries, args.k, "angular")]
    print(f"{args.items:,} x {args.dim} clustered unit vectors, angular, {len(queries)} queries, k = {args.k}, "
          f"filters interleaved query by query; work folder {workdir}", flush=True)

    results = []
    for index_type in types:
        root = workdir / index_type
        if not root.exists():
            build = timed_child([PYTHON, "-m", "apps", "index", "build-from-features", str(vectors_path), "--ids",
                                 str(ids_path), "--model-info", str(model_path), "--out", str(root),
                                 "--index", index_type])
            print(f"  {index_type}: built in {build['seconds']:.0f} s (peak RSS {mib(build['max_rss'])})", flush=True)
        env = {"CBIR_INDEXER_BUNDLE": str(root), "CBIR_INDEXER_LOG_LEVEL": "WARNING"}
        with service("indexer", env, workdir / f"indexer-{index_type}.log") as (_, target, _, _):
            channel = grpc.insecure_channel(target)
            stub = indexer_pb2_grpc.IndexerStub(channel)
            first = {label: query(stub, queries[0], args.k, fingerprint, conditions)[0]
                     for label, conditions, _ in FILTERS}
            for q in queries[:20]:  # warm this client's path and every filter's cached items
                for _, conditions, _ in FILTERS:
                    query(stub, q, args.k, fingerprint, conditions)
            times = {label: [] for label, _, _ in FILTERS}
            found = {label: [] for label, _, _ in FILTERS}
            for i, q in enumerate(queries):
                for shift in range(len(FILTERS)):  # rotate the order: no filter always runs first
                    label, conditions, _ = FILTERS[(i + shift) % len(FILTERS)]
                    seconds, hits = query(stub, q, args.k, fingerprint, conditions)
                    times[label].append(seconds)
                    found[label].append(hits)
            channel.close()
        unfiltered_p50 = statistics.median(times["unfiltered"])
        for label, _, allowed_buckets in FILTERS:
            allowed = set(np.flatnonzero(np.isin(buckets, list(allowed_buckets))).tolist())
            p50 = statistics.median(times[label])
            row = {"index_type": index_type, "filter": label, "p50_ms": p50 * 1e3,
                   "p99_ms": percentile(times[label], 0.99) * 1e3, "ratio": p50 / unfiltered_p50,
                   "recall": float(np.mean([len(set(f) & set(t.tolist())) / args.k
                                            for f, t in zip(found[label], truth[label])])),
                   "all_allowed": all(set(f) <= allowed for f in found[label]),
                   "full_k": all(len(f) == args.k for f in found[label]), "first_ms": first[label] * 1e3}
            results.append(row)

    print(f"\n| index | filter | QueryVector p50 ms | p99 ms | p50 / unfiltered p50 | recall@{args.k} among allowed "
          f"| every hit allowed, k hits | first query ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['index_type']} | {r['filter']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['ratio']:.2f}x "
              f"| {r['recall']:.3f} | {'yes' if r['all_allowed'] and r['full_k'] else 'NO'} | {r['first_ms']:.1f} |")
    table = table_cost(args.table_items, workdir) if args.table_items else None
    if table:
        print(f"\nmetadata columns at {table['items']:,} items (seconds):")
        for key, value in table.items():
            if key != "items":
                print(f"  {key}: {value:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"items": args.items, "dim": args.dim, "k": args.k, "queries": len(queries),
                                         "results": results, "table": table}, indent=2))


if __name__ == "__main__":
    main()
