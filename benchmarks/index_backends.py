"""Index backends side by side on the same vectors: Annoy and the faiss types (hnsw, hnsw-sq8, ivfpq).

For each index type, one run on one synthetic clustered set (benchmarks/_common.py, L2-normalised,
like GeM features), metric angular:

- build: `cbir index build-from-features --index TYPE` in a child process (/usr/bin/time -v: wall
  seconds, peak RSS), and the index file's size;
- an indexer process (`python -m services.indexer`, warm-up on) serving the bundle: QueryVector
  over gRPC one at a time, k = --k, at the bundle's default effort: p50/p99 latency and recall@k
  against exact search; its memory (VmRSS = anonymous + file-backed pages);
- a second indexer process on the same bundle, both answering: their PSS together (shared pages
  counted once) against twice one process's RSS — what mmap saves on a host with replicas;
- with --sweep: recall@k and ANN-only latency in this process at a few efforts per type.

Usage (100k x 512 took ~30 min on 2 busy cores, 26 of them building the two HNSW graphs):
  .venv/bin/python benchmarks/index_backends.py --items 100000 --dim 512
  .venv/bin/python benchmarks/index_backends.py --items 20000 --dim 128 --types annoy,hnsw --sweep
  .venv/bin/python benchmarks/index_backends.py --types ivfpq --index-param ivfpq:nprobe=64 --index-param ivfpq:rerank=8
  .venv/bin/python benchmarks/index_backends.py --vectors real.npy --types annoy,ivfpq --sweep   # real GeM vectors
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from _common import (
    PYTHON,
    clustered_set,
    exact_top_k,
    memory,
    mib,
    percentile,
    queries_through,
    recall,
    service,
    synthetic_model,
    timed_child,
    write_ids,
)

TYPES = ("annoy", "hnsw", "hnsw-sq8", "ivfpq")
# efforts tried with --sweep (search_k: Annoy's candidates, HNSW's efSearch, IVF's nprobe; 0 = the default)
SWEEP = {"annoy": [0, 5_000, 30_000], "hnsw": [0, 32, 64, 256], "hnsw-sq8": [0, 64, 256], "ivfpq": [0, 8, 32, 64, 128]}


def pss(pid: int) -> int:
    """Proportional set size in bytes: shared pages divided among the processes mapping them."""
    text = pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


def sweep(root: pathlib.Path, index_type: str, queries: np.ndarray, truth: np.ndarray, k: int) -> list[dict]:
    """recall@k and ANN-only latency (this process, no gRPC) at a few efforts."""
    from cbir.bundle import open_bundle
    from services.indexer.index import SearchIndex

    index = SearchIndex(open_bundle(root, verify_checksums=False))
    rows = []
    try:
        for effort in SWEEP[index_type]:
            times, found = [], []
            for q in queries:
                start = time.perf_counter()
                ids, _ = index.bundle.index.search(q, k, effort)
                times.append(time.perf_counter() - start)
                found.append(ids)
            rows.append({"search_k": effort, "effective": index._search_k(k, effort), "recall": recall(found, truth),
                         "p50_ms": statistics.median(times) * 1e3, "p99_ms": percentile(times, 0.99) * 1e3})
    finally:
        index.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated index types")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", action="store_true", help="also recall and latency at a few efforts per type")
    parser.add_argument("--index-param", action="append", default=[], metavar="TYPE:KEY=VALUE",
                        help="a build parameter for one index type, e.g. ivfpq:nprobe=64 (repeatable)")
    parser.add_argument("--vectors", type=pathlib.Path, default=None,
                        help="real vectors instead of synthetic ones: an .npy of unit rows (e.g. the evaluation "
                        "cache's GeM and region vectors of real photos); its last --queries rows are the queries")
    parser.add_argument("--workdir", type=pathlib.Path, default=None, help="keep vectors and bundles here")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the results here")
    parser.add_argument("--build-only", action="store_true",
                        help="build the bundles (and record their build time in WORKDIR/TYPE.build.json), serve nothing")
    parser.add_argument("--reuse", action="store_true",
                        help="serve the bundles an earlier --build-only run left in --workdir (its build figures)")
    args = parser.parse_args()
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = sorted(set(types) - set(TYPES))
    if unknown:
        parser.error(f"unknown index types {unknown}; choose from {', '.join(TYPES)}")

    import grpc
    from cbir.v1 import indexer_pb2_grpc

    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="index-backends-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.vectors:
        given = np.load(args.vectors, mmap_mode="r")
        args.items, args.dim = len(given) - args.queries, given.shape[1]
        queries = np.array(given[args.items:], dtype=np.float32)
        vectors_path, ids_path = workdir / f"real-{args.items}x{args.dim}.npy", workdir / f"ids-{args.items}.txt"
        np.save(vectors_path, np.asarray(given[:args.items], dtype=np.float32))
        described = f"real vectors from {args.vectors}"
        write_ids(ids_path, args.items)
    else:
        vectors_path, ids_path, queries = clustered_set(workdir, args.items, args.dim, args.seed, args.queries)
        described = "clustered unit vectors"
    fingerprint, model_path = synthetic_model(workdir, args.dim, args.seed)
    base = np.load(vectors_path, mmap_mode="r")
    truth = None if args.build_only else exact_top_k(base, queries, args.k, "angular")
    print(f"{args.items:,} x {args.dim} {described}, angular, {len(queries)} held-out queries, k = {args.k}; "
          f"work folder {workdir}")

    if (args.build_only or args.reuse) and not args.workdir:
        parser.error("--build-only and --reuse need --workdir")
    results = []
    for index_type in types:
        root = workdir / index_type
        command = [PYTHON, "-m", "apps", "index", "build-from-features", str(vectors_path), "--ids", str(ids_path),
                   "--model-info", str(model_path), "--out", str(root), "--index", index_type]
        for given in args.index_param:
            kind, _, param = given.partition(":")
            if kind == index_type:
                command += ["--index-param", param]
        record = workdir / f"{index_type}.build.json"
        if args.reuse and record.exists():
            build = json.loads(record.read_text())
        else:
            build = timed_child(command)
            record.write_text(json.dumps({key: build[key] for key in ("seconds", "max_rss", "user_s", "sys_s")}))
        if args.build_only:
            print(f"  {index_type}: built in {build['seconds']:.0f} s (peak RSS {mib(build['max_rss'])})", flush=True)
            continue
        from cbir.bundle import open_bundle

        with open_bundle(root, verify_checksums=False) as bundle:
            index_bytes = (bundle.path / bundle.index_file).stat().st_size
            default_effort = bundle.manifest.default_search_k
            params = bundle.manifest.index_params or {"trees": bundle.manifest.trees}
        env = {"CBIR_INDEXER_BUNDLE": str(root), "CBIR_INDEXER_LOG_LEVEL": "WARNING"}
        with service("indexer", env, workdir / f"indexer-{index_type}-1.log") as (first, target, to_serving, _):
            channel = grpc.insecure_channel(target)
            stub = indexer_pb2_grpc.IndexerStub(channel)
            queries_through(stub, queries[:20], args.k, fingerprint)  # warm this client's path
            times, found = queries_through(stub, queries, args.k, fingerprint)
            one = memory(first.pid)
            with service("indexer", env, workdir / f"indexer-{index_type}-2.log") as (second, target2, _, _):
                channel2 = grpc.insecure_channel(target2)
                queries_through(indexer_pb2_grpc.IndexerStub(channel2), queries, args.k, fingerprint)
                queries_through(stub, queries[:50], args.k, fingerprint)
                two_pss = pss(first.pid) + pss(second.pid)
                channel2.close()
            channel.close()
        row = {"index_type": index_type, "params": params, "default_search_k": default_effort,
               "build_s": build["seconds"], "build_peak_rss": build["max_rss"], "index_bytes": index_bytes,
               "to_serving_s": to_serving, "rss": one, "two_indexers_pss": two_pss,
               "p50_ms": statistics.median(times) * 1e3, "p99_ms": percentile(times, 0.99) * 1e3,
               "recall": recall(found, truth)}
        if args.sweep:
            row["sweep"] = sweep(root, index_type, queries, truth, args.k)
        results.append(row)
        print(f"  {index_type}: built in {row['build_s']:.0f} s (peak RSS {mib(build['max_rss'])}), index "
              f"{mib(index_bytes)}, indexer RSS {mib(one['VmRSS'])} (anon {mib(one['RssAnon'])}, file "
              f"{mib(one['RssFile'])}), two indexers PSS {mib(two_pss)}, QueryVector p50 {row['p50_ms']:.2f} ms, "
              f"p99 {row['p99_ms']:.2f} ms, recall@{args.k} {row['recall']:.3f}", flush=True)

    if not results:
        return
    annoy = next((r for r in results if r["index_type"] == "annoy"), results[0])
    print(f"\n| index | parameters | default effort | build s | build peak RSS | index file | indexer RSS (anon + file) "
          f"| 2 indexers PSS | QueryVector p50 / p99 ms | recall@{args.k} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rss = r["rss"]
        print(f"| {r['index_type']} | {', '.join(f'{k} {v}' for k, v in r['params'].items())} | {r['default_search_k']:,} "
              f"| {r['build_s']:.0f} ({r['build_s'] / annoy['build_s']:.1f}x) | {mib(r['build_peak_rss'])} "
              f"| {mib(r['index_bytes'])} ({r['index_bytes'] / annoy['index_bytes']:.2f}x) "
              f"| {mib(rss['VmRSS'])} ({mib(rss['RssAnon'])} + {mib(rss['RssFile'])}) | {mib(r['two_indexers_pss'])} "
              f"| {r['p50_ms']:.2f} / {r['p99_ms']:.2f} ({r['p50_ms'] / annoy['p50_ms']:.2f}x) | {r['recall']:.3f} |")
    if args.sweep:
        print(f"\nANN only, this process (no gRPC, no id lookup): recall@{args.k}, p50 / p99 ms per effort")
        for r in results:
            cells = [f"{s['effective']:,}: {s['recall']:.3f}, {s['p50_ms']:.2f} / {s['p99_ms']:.2f}" for s in r["sweep"]]
            print(f"  {r['index_type']:9} " + " | ".join(cells))
    if args.json:
        args.json.write_text(json.dumps({"items": args.items, "dim": args.dim, "k": args.k, "queries": len(queries),
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
