"""Helpers shared by the benchmark scripts (not part of the product): synthetic vectors, exact
search, percentiles, process memory, starting a real service process and waiting for SERVING."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYTHON = sys.executable


# ------------------------------------------------------------------------------------------ statistics


def percentile(values, q: float) -> float:
    """The q-quantile (0..1) by nearest rank, as the other benchmarks print it."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def spread(values) -> str:
    """median [min..max] of repeated measurements."""
    return f"{statistics.median(values):.3f} [{min(values):.3f}..{max(values):.3f}]"


# ------------------------------------------------------------------------------------------ vectors


def centers_for(dim: int, clusters: int, seed: int) -> np.ndarray:
    """Cluster centres with uneven variance per axis (as benchmarks/indexer_recall.py makes them)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((clusters, dim)) * (rng.random(dim) ** 2)


def clustered(rng: np.random.Generator, centers: np.ndarray, n: int, noise: float = 0.35) -> np.ndarray:
    """n clustered, non-negative, L2-normalised float32 vectors (like GeM features, or fc1 after ReLU)."""
    x = np.abs(centers[rng.integers(0, len(centers), n)] + noise * rng.standard_normal((n, centers.shape[1])))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def write_clustered_npy(path: pathlib.Path, n: int, dim: int, *, clusters: int = 2000, seed: int = 0) -> np.ndarray:
    """Write n clustered vectors to an .npy in chunks (never n x d float64 in memory); returns the centres."""
    centers = centers_for(dim, clusters, seed)
    rng = np.random.default_rng(seed + 1)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    chunk = max(1024, 2**25 // dim)  # ~256 MB of float64 noise at a time
    for start in range(0, n, chunk):
        out[start:start + chunk] = clustered(rng, centers, min(chunk, n - start))
    out.flush()
    del out
    return centers


def write_ids(path: pathlib.Path, n: int, prefix: str = "img") -> None:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(f"{prefix}{i:08d}\n")


def clustered_set(workdir: pathlib.Path, items: int, dim: int, seed: int, queries: int
                  ) -> tuple[pathlib.Path, pathlib.Path, np.ndarray]:
    """(vectors .npy, ids file, held-out queries) of a synthetic set in `workdir`, written unless already there."""
    vectors_path, ids_path = workdir / f"vectors-{items}x{dim}-s{seed}.npy", workdir / f"ids-{items}.txt"
    if not vectors_path.exists():
        write_clustered_npy(vectors_path, items, dim, seed=seed)
    if not ids_path.exists():
        write_ids(ids_path, items)
    return vectors_path, ids_path, held_out_queries(dim, queries, seed)


def held_out_queries(dim: int, n: int, seed: int) -> np.ndarray:
    """n query vectors from the clusters of `write_clustered_npy(..., dim, seed=seed)`, none of them its vectors."""
    return clustered(np.random.default_rng(seed + 99), centers_for(dim, 2000, seed), n)


def synthetic_model(folder: pathlib.Path, dim: int, seed: int) -> tuple[str, pathlib.Path]:
    """The ModelInfo of synthetic vectors, written where `cbir index build-from-features --model-info` reads
    it: (its fingerprint, which a query must name, and the file)."""
    from google.protobuf import json_format

    from cbir.v1 import common_pb2

    model = common_pb2.ModelInfo(name="synthetic", feature="gem", dimension=dim, fingerprint=f"synthetic-{dim}-s{seed}")
    path = folder / "model.json"
    path.write_text(json.dumps(json_format.MessageToDict(model, preserving_proto_field_name=True)))
    return model.fingerprint, path


def queries_through(stub, queries: np.ndarray, k: int, fingerprint: str) -> tuple[list[float], list[list[int]]]:
    """Each query through a real indexer's QueryVector: (seconds, item numbers of the hits) per query."""
    from cbir.v1 import indexer_pb2
    from cbir.vectors import to_proto

    times, found = [], []
    for q in queries:
        start = time.perf_counter()
        response = stub.QueryVector(indexer_pb2.QueryVectorRequest(vector=to_proto(q), k=k, model_fingerprint=fingerprint),
                                    timeout=60)
        times.append(time.perf_counter() - start)
        found.append([int(h.item_id[3:]) for h in response.hits])
    return times, found


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int, metric: str = "angular",
                chunk: int = 65536) -> np.ndarray:
    """Row indices of the exact k nearest rows of `base` (may be a memmap) for each query, best first.

    Streams `base` in chunks and keeps a running top k, so 1M x 512 needs only a chunk in memory.
    """
    queries = np.asarray(queries, dtype=np.float32)
    if metric == "angular":
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    best_d = np.full((len(queries), k), np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), k), dtype=np.int64)
    for start in range(0, base.shape[0], chunk):
        block = np.asarray(base[start:start + chunk], dtype=np.float32)
        if metric == "angular":
            block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
            d = -(queries @ block.T)
        elif metric == "euclidean":
            d = (queries ** 2).sum(1)[:, None] - 2 * queries @ block.T + (block ** 2).sum(1)[None, :]
        else:
            d = np.stack([np.abs(block - q).sum(axis=1) for q in queries])
        all_d = np.concatenate([best_d, d], axis=1)
        all_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(block)), d.shape)], axis=1)
        keep = np.argpartition(all_d, k - 1, axis=1)[:, :k]
        best_d = np.take_along_axis(all_d, keep, axis=1)
        best_i = np.take_along_axis(all_i, keep, axis=1)
    order = np.argsort(best_d, axis=1)
    return np.take_along_axis(best_i, order, axis=1)


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t.tolist())) / k for f, t in zip(found, truth)]))


# ------------------------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon, RssFile of a process, in bytes (Linux /proc)."""
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def wait_serving(target: str, timeout_s: float = 600.0, proc: subprocess.Popen | None = None) -> float:
    """Block until the gRPC health check at `target` says SERVING; returns the seconds waited."""
    from cbir.health import wait_until_serving

    return wait_until_serving(target, timeout_s=timeout_s, interval_s=0.02,
                              still_starting=lambda: proc is None or proc.poll() is None)


@contextlib.contextmanager
def service(name: str, env: dict[str, str], log_path: pathlib.Path | None = None):
    """Run `python -m services.<name>` with `env` (CBIR_* settings) on a free port; yields (proc, target, seconds to SERVING)."""
    prefix = f"CBIR_{name.upper()}_"
    port = free_port()
    full_env = {**os.environ, f"{prefix}PORT": str(port), f"{prefix}METRICS_PORT": str(free_port()), **env}
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    start = time.perf_counter()
    proc = subprocess.Popen([PYTHON, "-m", f"services.{name}"], cwd=ROOT, env=full_env, stdout=log, stderr=log)
    try:
        wait_serving(f"127.0.0.1:{port}", proc=proc)
        yield proc, f"127.0.0.1:{port}", time.perf_counter() - start, full_env[f"{prefix}METRICS_PORT"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            log.close()


def evict_from_page_cache(*paths: pathlib.Path) -> None:
    """Drop these files' clean pages from the page cache (posix_fadvise DONTNEED): a 'cold' start
    for them without touching the rest of the machine's cache."""
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd) if os.access(path, os.W_OK) else None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed_child(command: list[str], env: dict | None = None) -> dict:
    """Run a command under /usr/bin/time -v; its wall seconds, peak RSS (bytes) and return code."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], cwd=ROOT, env={**os.environ, **(env or {})},
                            capture_output=True, text=True)
    stats = {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr[-4000:]}
    for line in result.stderr.splitlines():
        line = line.strip()
        if line.startswith("Maximum resident set size"):
            stats["max_rss"] = int(line.rsplit(":", 1)[1]) * 1024
        elif line.startswith("Elapsed (wall clock) time"):
            clock = line.split("):", 1)[1].strip().split(":")
            stats["seconds"] = sum(float(part) * 60 ** i for i, part in enumerate(reversed(clock)))
        elif line.startswith("User time"):
            stats["user_s"] = float(line.rsplit(":", 1)[1])
        elif line.startswith("System time"):
            stats["sys_s"] = float(line.rsplit(":", 1)[1])
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return stats


def folder_bytes(path: pathlib.Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
