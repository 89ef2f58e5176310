"""Index at scale: a bundle of N synthetic vectors built with `cbir index build-from-features`,
served by the real indexer process, beside the original system's index (4096-d, Annoy Manhattan,
30 trees, items added row by row from a table).

    .venv/bin/python benchmarks/scale.py --items 1000000                 # ours at 1M (~15 min, ~7 GB in --workdir)
    .venv/bin/python benchmarks/scale.py --items 1000000 --pca 256       # the same with PCA to 256-d
    .venv/bin/python benchmarks/scale.py --items 100000 --baseline       # ours and the original side by side

Prints, for each index: build time and peak memory (the build runs as a child process under
/usr/bin/time -v), file sizes, the indexer's start time, RSS and first-query latency with the
bundle's files evicted from the page cache (posix_fadvise), ANN latency and recall@k against
exact search over a sweep of search_k, and the smallest search_k that reaches --recall-target.
Index settings not given (metric, trees, PCA) default to `cbir index build`'s current defaults.
The vectors are clustered, non-negative and L2-normalised like GeM (and fc1-after-ReLU) features;
queries are fresh draws from the same distribution. Results also go to <workdir>/scale-*.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    PYTHON, clustered, evict_from_page_cache, exact_top_k, folder_bytes, memory, mib, percentile,
    recall, service, timed_child, write_clustered_npy, write_ids,
)

DEFAULT_SWEEP = (1500, 3000, 4000, 5000, 6000, 7500, 10000, 15000, 30000)


def _defaults() -> dict:
    from apps.ingest import defaults

    return {"metric": defaults.METRIC, "trees": defaults.TREES, "pca_dimension": defaults.PCA_DIMENSION}


def _vectors(workdir: pathlib.Path, n: int, dim: int, queries: int, seed: int):
    """The synthetic set (reused when already written) and fresh queries from its distribution."""
    path = workdir / f"vectors-{n}x{dim}-s{seed}.npy"
    ids = workdir / f"ids-{n}.txt"
    start = time.perf_counter()
    if not path.exists():
        centers = write_clustered_npy(path, n, dim, seed=seed)
        print(f"wrote {n:,} x {dim} synthetic vectors to {path} in {time.perf_counter() - start:.0f} s")
    else:
        from _common import centers_for

        centers = centers_for(dim, 2000, seed)
    if not ids.exists():
        write_ids(ids, n)
    q = clustered(np.random.default_rng(seed + 99), centers, queries)
    return path, ids, q


def _sweep(index, queries_index: np.ndarray, truth: list[np.ndarray], k: int, sweep, repeats: int = 3):
    """ANN only, in this process: per search_k, recall against each truth and latency percentiles.

    The search_k values take turns on each query (and every query runs `repeats` times), so that the
    machine's noise falls on all of them alike; p50/p99 are over all runs, the spread is of the
    per-repeat medians."""
    times = {s: [[] for _ in range(repeats)] for s in sweep}
    cpu = {s: [] for s in sweep}
    found = {s: [] for s in sweep}
    for q in queries_index:
        for r in range(repeats):
            for search_k in sweep:
                c = time.thread_time()
                t = time.perf_counter()
                ids = index.get_nns_by_vector(q, k, search_k=search_k)
                times[search_k][r].append(time.perf_counter() - t)
                cpu[search_k].append(time.thread_time() - c)
                if r == 0:
                    found[search_k].append(ids)
    rows = []
    for search_k in sweep:
        ms = np.array(times[search_k]) * 1e3
        rows.append({"search_k": search_k, "recall": [recall(found[search_k], t) for t in truth],
                     "p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
                     "p50_per_repeat": [float(np.median(row)) for row in ms],
                     # CPU time of the querying thread: what the query costs on a core of its own (the
                     # shared machine's waiting for a core left out); wall = CPU on an idle machine
                     "cpu_p50_ms": float(np.median(cpu[search_k]) * 1e3),
                     "cpu_p99_ms": float(np.percentile(cpu[search_k], 99) * 1e3)})
    return rows


def _print_sweep(rows, labels):
    print(f"  {'search_k':>9} " + " ".join(f"{label:>14}" for label in labels) + f"{'ANN p50':>10}{'ANN p99':>10}"
          + f"{'CPU p50':>10}{'CPU p99':>10}   wall p50 of each repeat")
    for row in rows:
        print(f"  {row['search_k']:>9,} " + " ".join(f"{r:>14.3f}" for r in row["recall"])
              + f"{row['p50_ms']:>8.2f}ms{row['p99_ms']:>8.2f}ms{row['cpu_p50_ms']:>8.2f}ms{row['cpu_p99_ms']:>8.2f}ms   "
              + " ".join(f"{v:.2f}" for v in row.get("p50_per_repeat", [])))


def _choose(rows, target: float):
    """The cheapest swept search_k whose (first) recall reaches the target, or None."""
    good = [row for row in rows if row["recall"][0] >= target]
    return min(good, key=lambda row: row["search_k"]) if good else None


def ours(args, workdir: pathlib.Path, queries_n: int) -> dict:
    from annoy import AnnoyIndex

    from cbir.bundle import open_bundle
    from cbir.pca import Pca
    from cbir.v1 import common_pb2, indexer_pb2, indexer_pb2_grpc
    from cbir.vectors import to_proto
    import grpc

    vectors_path, ids_path, queries = _vectors(workdir, args.items, args.dim, queries_n, args.seed)
    model = common_pb2.ModelInfo(name="synthetic", feature="gem", dimension=args.dim,
                                 fingerprint=f"synthetic-{args.dim}-s{args.seed}")
    model_path = workdir / f"model-{args.dim}.json"
    from google.protobuf import json_format

    model_path.write_text(json.dumps(json_format.MessageToDict(model, preserving_proto_field_name=True)))
    label = f"ours-{args.items}x{args.dim}-{args.metric}-t{args.trees}" + (f"-pca{args.pca}" if args.pca else "")
    root = workdir / label
    print(f"\n== {label}: `cbir index build-from-features` (child process, /usr/bin/time -v)")
    command = [PYTHON, "-m", "apps", "index", "build-from-features", str(vectors_path), "--ids", str(ids_path),
               "--model-info", str(model_path), "--out", str(root), "--metric", args.metric,
               "--trees", str(args.trees), "--pca", str(args.pca)]
    previous = workdir / f"scale-{label}.json"
    if args.reuse and (root / "current").exists() and previous.exists():
        build = json.loads(previous.read_text())["build"]
        print("  (reusing the bundle built earlier; build figures from that run)")
    else:
        build = timed_child(command)
    bundle = open_bundle(root, verify_checksums=False)
    folder = bundle.path
    sizes = folder_bytes(folder)
    manifest = bundle.manifest
    pca = Pca.load(folder / "pca.npz") if manifest.pca else None
    bundle.close()
    print(f"  build {build['seconds']:.0f} s wall (user {build.get('user_s', 0):.0f} s, sys {build.get('sys_s', 0):.0f} s), "
          f"peak RSS {mib(build['max_rss'])}")
    print("  files: " + ", ".join(f"{name} {mib(size)}" for name, size in sizes.items())
          + f"; total {mib(sum(sizes.values()))}")

    base = np.load(vectors_path, mmap_mode="r")
    start = time.perf_counter()
    truth_path = workdir / f"truth-{args.items}x{args.dim}-s{args.seed}-q{len(queries)}-k{args.k}-{args.metric}.npy"
    if truth_path.exists():
        truth = [np.load(truth_path)]
    else:
        truth = [exact_top_k(base, queries, args.k, args.metric)]
        np.save(truth_path, truth[0])
    labels = [f"recall@{args.k}"]
    if pca is not None:  # also against exact search in the space the index searches
        projected_base = _Projected(base, pca)
        truth.append(exact_top_k(projected_base, pca.transform(queries), args.k, args.metric))
        labels = [f"recall@{args.k}", f"(in {args.pca}-d)"]
    print(f"  exact search for {len(queries)} queries: {time.perf_counter() - start:.0f} s")
    queries_index = pca.transform(queries) if pca is not None else queries

    index = AnnoyIndex(manifest.index_dimension, args.metric)
    index.load(str(folder / "index.ann"))
    sweep = sorted(set(args.search_k or DEFAULT_SWEEP) | {manifest.default_search_k})
    print(f"  ANN only (Annoy get_nns_by_vector in this process, k={args.k}, {len(queries)} queries, "
          f"bundle default search_k {manifest.default_search_k:,}):")
    rows = _sweep(index, queries_index, truth, args.k, [s for s in sweep if s <= args.trees * args.items],
                  args.repeats)
    _print_sweep(rows, labels)
    index.unload()
    chosen = _choose(rows, args.recall_target)
    if chosen:
        print(f"  smallest swept search_k with recall@{args.k} >= {args.recall_target}: {chosen['search_k']:,} "
              f"(ANN p50 {chosen['p50_ms']:.2f} ms, p99 {chosen['p99_ms']:.2f} ms)")
    else:
        print(f"  no swept search_k reaches recall@{args.k} {args.recall_target}")
    if pca is not None:
        good = [row for row in rows if row["recall"][1] >= args.recall_target]
        if good:
            row = min(good, key=lambda r: r["search_k"])
            print(f"  against exact search in the {args.pca}-d PCA space (Annoy's own accuracy): search_k "
                  f"{row['search_k']:,} reaches {args.recall_target} (ANN p50 {row['p50_ms']:.2f} ms, CPU p50 "
                  f"{row['cpu_p50_ms']:.2f} ms)")

    # The real indexer process over the bundle, with its files evicted from the page cache first.
    serving = {}
    for mode, env in [("default (checksums verified)", {}),
                      ("no checksum pass", {"CBIR_INDEXER_VERIFY_CHECKSUMS": "false"}),
                      ("no checksum pass, prefault", {"CBIR_INDEXER_VERIFY_CHECKSUMS": "false",
                                                      "CBIR_INDEXER_PREFAULT": "true"})]:
        if args.quick_serving and serving:
            break
        evict_from_page_cache(folder)
        with service("indexer", {"CBIR_INDEXER_BUNDLE": str(root), "CBIR_INDEXER_LOG_LEVEL": "WARNING", **env},
                     workdir / f"indexer-{label}.log") as (proc, target, to_serving, _):
            mem_start = memory(proc.pid)
            channel = grpc.insecure_channel(target)
            stub = indexer_pb2_grpc.IndexerStub(channel)

            def query(q, search_k=0):
                t = time.perf_counter()
                response = stub.QueryVector(indexer_pb2.QueryVectorRequest(
                    vector=to_proto(q), k=args.k, search_k=search_k, model_fingerprint=model.fingerprint), timeout=60)
                return time.perf_counter() - t, response

            first, _ = query(queries[0])
            second, _ = query(queries[1])
            warm = {}
            for name, search_k in [("default", 0)] + ([("chosen", chosen["search_k"])] if chosen else []):
                times, found = [], []
                for q in queries:
                    seconds, response = query(q, search_k)
                    times.append(seconds)
                    found.append([int(h.item_id[3:]) for h in response.hits])
                warm[name] = {"search_k": search_k or manifest.default_search_k, "recall": recall(found, truth[0]),
                              "p50_ms": statistics.median(times) * 1e3, "p99_ms": percentile(times, 0.99) * 1e3}
            mem_end = memory(proc.pid)
            channel.close()
        serving[mode] = {"to_serving_s": to_serving, "first_ms": first * 1e3, "second_ms": second * 1e3,
                         "rss_serving": mem_start, "rss_after": mem_end, "warm": warm}
        print(f"  indexer process, {mode}, bundle evicted from the page cache: SERVING after {to_serving:.1f} s; "
              f"first QueryVector {first * 1e3:.1f} ms, second {second * 1e3:.1f} ms")
        print(f"    RSS at SERVING {mib(mem_start['VmRSS'])} (anon {mib(mem_start['RssAnon'])}, file {mib(mem_start['RssFile'])}); "
              f"after {2 + len(warm) * len(queries)} queries {mib(mem_end['VmRSS'])} "
              f"(anon {mib(mem_end['RssAnon'])}, file {mib(mem_end['RssFile'])}); peak {mib(mem_end['VmHWM'])}")
        for name, w in warm.items():
            print(f"    warm QueryVector over gRPC (ANN + id lookup + 2 hops), search_k {w['search_k']:,} ({name}): "
                  f"p50 {w['p50_ms']:.2f} ms, p99 {w['p99_ms']:.2f} ms, recall@{args.k} {w['recall']:.3f}")

    result = {"label": label, "items": args.items, "dim": args.dim, "metric": args.metric, "trees": args.trees,
              "pca": args.pca, "build": {k: v for k, v in build.items() if k not in ("stdout", "stderr")},
              "files": sizes, "sweep": rows, "chosen": chosen, "serving": serving,
              "default_search_k": manifest.default_search_k}
    (workdir / f"scale-{label}.json").write_text(json.dumps(result, indent=2))
    return result


class _Projected:
    """A lazily PCA-projected view of a (memmapped) matrix, sliceable in row chunks for exact_top_k."""

    def __init__(self, base, pca):
        self.base, self.pca = base, pca
        self.shape = (base.shape[0], pca.dimension)

    def __getitem__(self, rows):
        return self.pca.transform(np.asarray(self.base[rows]))


# ------------------------------------------------------------------------------------------ the original system


def baseline_build(vectors_path: str, out: str, trees: int) -> None:
    """What the original system did: a table of fc1 vectors, each row added to an in-memory Annoy
    Manhattan index one by one, then built and saved; ids stay apart from the vectors."""
    import pandas as pd
    from annoy import AnnoyIndex

    table = pd.DataFrame(np.load(vectors_path))
    index = AnnoyIndex(table.shape[1], "manhattan")
    for i, row in table.iterrows():
        index.add_item(i, row.values)
    index.build(trees)
    index.save(out)


def baseline(args, workdir: pathlib.Path, queries_n: int) -> dict:
    from annoy import AnnoyIndex

    dim, n = 4096, args.items
    vectors_path, _, queries = _vectors(workdir, n, dim, queries_n, args.seed)
    out = workdir / f"baseline-{n}x{dim}-manhattan-t30.ann"
    print(f"\n== baseline-{n}x{dim}: Annoy manhattan, 30 trees, rows added one by one from a pandas table "
          f"(child process, /usr/bin/time -v)")
    build = timed_child([PYTHON, __file__, "--baseline-build", str(vectors_path), str(out)])
    size = out.stat().st_size
    print(f"  build {build['seconds']:.0f} s wall, peak RSS {mib(build['max_rss'])}; index file {mib(size)} "
          f"(+ the vectors' table {mib(vectors_path.stat().st_size)}; no id map)")
    base = np.load(vectors_path, mmap_mode="r")
    start = time.perf_counter()
    truth = exact_top_k(base, queries, args.k, "manhattan", chunk=8192)
    print(f"  exact L1 search for {len(queries)} queries: {time.perf_counter() - start:.0f} s")
    evict_from_page_cache(out)
    start = time.perf_counter()
    index = AnnoyIndex(dim, "manhattan")
    index.load(str(out))
    load_s = time.perf_counter() - start
    t = time.perf_counter()
    index.get_nns_by_vector(queries[0], args.k)
    first_ms = (time.perf_counter() - t) * 1e3
    print(f"  load (mmap) {load_s * 1e3:.1f} ms; first query with the file evicted from the page cache {first_ms:.1f} ms")
    rows = _sweep(index, queries, [truth], args.k, [args.k * 30] + [s for s in (15000, 60000) if s <= 30 * n],
                  args.repeats)
    print(f"  ANN (k={args.k}); search_k {args.k * 30:,} = Annoy's default, what the original system used:")
    _print_sweep(rows, [f"recall@{args.k}"])
    index.unload()
    result = {"label": f"baseline-{n}x{dim}", "build": {k: v for k, v in build.items() if k not in ("stdout", "stderr")},
              "index_bytes": size, "load_ms": load_s * 1e3, "first_ms": first_ms, "sweep": rows}
    (workdir / f"scale-baseline-{n}x{dim}.json").write_text(json.dumps(result, indent=2))
    if not args.keep:
        out.unlink()
    return result


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--baseline-build":
        baseline_build(sys.argv[2], sys.argv[3], 30)
        return
    defaults = _defaults()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512, help="dimension of the stored vectors (gem: 512)")
    parser.add_argument("--pca", type=int, default=defaults["pca_dimension"], help="PCA dimension (0 = none)")
    parser.add_argument("--trees", type=int, default=defaults["trees"])
    parser.add_argument("--metric", default=defaults["metric"], choices=["angular", "euclidean", "manhattan"])
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--search-k", type=int, nargs="*", default=None, help=f"sweep (default {DEFAULT_SWEEP})")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--baseline", action="store_true", help="also the original system's index, same N, 4096-d")
    parser.add_argument("--baseline-only", action="store_true")
    parser.add_argument("--quick-serving", action="store_true", help="start the indexer once, not three times")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/cbir-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the bundles and vectors (they are large)")
    parser.add_argument("--reuse", action="store_true", help="with --keep before: measure the kept bundle again")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each query per search_k (interleaved)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{args.items:,} items; index settings: metric {args.metric}, {args.trees} trees, PCA {args.pca or 'off'}; "
          f"k={args.k}, {args.queries} queries; workdir {args.workdir}")
    if not args.baseline_only:
        result = ours(args, args.workdir, args.queries)
        if not args.keep:
            import shutil

            shutil.rmtree(args.workdir / result["label"], ignore_errors=True)
    if args.baseline or args.baseline_only:
        baseline(args, args.workdir, min(args.queries, 100))
    if not args.keep:
        for path in args.workdir.glob("vectors-*.npy"):
            path.unlink()


if __name__ == "__main__":
    main()
