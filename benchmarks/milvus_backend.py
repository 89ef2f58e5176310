"""Annoy and the milvus index backend side by side, through a real indexer over gRPC.

One synthetic clustered set (benchmarks/_common.py: L2-normalised, like GeM features), metric angular; for
each backend:

- build: `build_from_features` (what `cbir index build-from-features --index ...` runs) in a child process,
  wall seconds and peak RSS (/usr/bin/time -v);
- an indexer process (`python -m services.indexer`, warm-up on) serving the bundle: QueryVector over gRPC one
  at a time, k = --k, at the bundle's default effort: p50 / p99 latency, recall@k against exact search, and
  the share of queries whose top k (as a set) is Annoy's and the exact one.

Backends: `annoy` (30 trees), `milvus-lite` (a milvus-lite database in the version folder, run by pymilvus
inside the indexer process) and `milvus-server` (the embedded Milvus 2.3.5 standalone that the `milvus`
package ships, started here on loopback unless --milvus-uri names a running server).

Usage:
  .venv/bin/python benchmarks/milvus_backend.py --items 20000 --dim 512
  .venv/bin/python benchmarks/milvus_backend.py --backends annoy,milvus-server --milvus-uri http://127.0.0.1:19530
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import sys
import tempfile

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
)
from _milvus import embedded_milvus  # noqa: E402

BACKENDS = ("annoy", "milvus-lite", "milvus-server")
_BUILD = """
import sys
from apps.ingest.from_features import build_from_features
build_from_features(sys.argv[1], sys.argv[2], ids=sys.argv[3], model=sys.argv[4], index_type=sys.argv[5])
"""


def same_sets(found: list[list[int]], other) -> float:
    """The share of queries whose hits are, as a set, the other answer's."""
    return float(np.mean([set(f) == {int(i) for i in o} for f, o in zip(found, other)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: " + ", ".join(BACKENDS))
    parser.add_argument("--milvus-uri", default=None, help="a running Milvus server (else the embedded one is started)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=pathlib.Path, default=None, help="keep vectors and bundles here")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the results here")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := sorted(set(backends) - set(BACKENDS)):
        parser.error(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")

    import grpc
    from cbir.v1 import indexer_pb2_grpc

    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="milvus-backend-"))
    workdir.mkdir(parents=True, exist_ok=True)
    vectors_path, ids_path, queries = clustered_set(workdir, args.items, args.dim, args.seed, args.queries)
    fingerprint, model_path = synthetic_model(workdir, args.dim, args.seed)
    truth = exact_top_k(np.load(vectors_path, mmap_mode="r"), queries, args.k, "angular")
    print(f"{args.items:,} x {args.dim} clustered unit vectors, angular, {len(queries)} held-out queries, k = {args.k}; "
          f"work folder {workdir}", flush=True)

    results = []
    with contextlib.ExitStack() as stack:
        server = args.milvus_uri
        if "milvus-server" in backends and server is None:
            server = stack.enter_context(embedded_milvus(workdir))
        for backend in backends:
            root = workdir / backend
            env = {"CBIR_MILVUS_URI": server} if backend == "milvus-server" else {"CBIR_MILVUS_URI": ""}
            index_type = "annoy" if backend == "annoy" else "milvus"
            build = timed_child([PYTHON, "-c", _BUILD, str(vectors_path), str(root), str(ids_path), str(model_path),
                                 index_type], env=env)
            serve_env = {"CBIR_INDEXER_BUNDLE": str(root), "CBIR_INDEXER_LOG_LEVEL": "WARNING", **env}
            with service("indexer", serve_env, workdir / f"indexer-{backend}.log") as (process, target, to_serving, _):
                channel = grpc.insecure_channel(target)
                stub = indexer_pb2_grpc.IndexerStub(channel)
                queries_through(stub, queries[:20], args.k, fingerprint)  # warm this client's path
                times, found = queries_through(stub, queries, args.k, fingerprint)
                rss = memory(process.pid)["VmRSS"]
                channel.close()
            row = {"backend": backend, "build_s": build["seconds"], "build_peak_rss": build["max_rss"],
                   "to_serving_s": to_serving, "indexer_rss": rss, "p50_ms": statistics.median(times) * 1e3,
                   "p99_ms": percentile(times, 0.99) * 1e3, "recall": recall(found, truth),
                   "same_as_exact": same_sets(found, truth), "found": found}
            results.append(row)
            print(f"  {backend}: built in {row['build_s']:.0f} s (peak RSS {mib(row['build_peak_rss'])}), serving after "
                  f"{to_serving:.1f} s, indexer RSS {mib(rss)}, QueryVector p50 {row['p50_ms']:.2f} ms, p99 "
                  f"{row['p99_ms']:.2f} ms, recall@{args.k} {row['recall']:.3f}", flush=True)

    annoy = next((r for r in results if r["backend"] == "annoy"), None)
    print(f"\n| backend | build s | build peak RSS | indexer RSS | QueryVector p50 / p99 ms | recall@{args.k} "
          f"| top {args.k} = exact | top {args.k} = Annoy's |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for r in results:
        vs_annoy = f"{same_sets(r['found'], annoy['found']):.0%}" if annoy else "-"
        print(f"| {r['backend']} | {r['build_s']:.0f} | {mib(r['build_peak_rss'])} | {mib(r['indexer_rss'])} "
              f"| {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['recall']:.3f} | {r['same_as_exact']:.0%} | {vs_annoy} |")
    if args.json:
        args.json.write_text(json.dumps({"items": args.items, "dim": args.dim, "k": args.k, "queries": len(queries),
                                         "results": [{k: v for k, v in r.items() if k != "found"} for r in results]},
                                        indent=2))


if __name__ == "__main__":
    main()
