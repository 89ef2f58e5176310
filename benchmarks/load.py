"""Load and fault runs through the gateway: N concurrent clients for T seconds, with faults injected.

Scenarios (each against a fresh stack unless noted):

- `steady`: N clients, fewer than the gateway's concurrency limit: throughput, p50/p99, errors (target 0);
- `overload`: more clients than the limit: what is refused is refused with RESOURCE_EXHAUSTED, at once;
- `kill-embedder` / `kill-indexer`: SIGKILL one upstream during the run, start it again;
- `reload`: a new bundle version is made `current` during the run (target: 0 failed requests);
- `bad-reload`: a truncated and a wrong-model version are offered (ReloadBundle and `current`) during the
  run (target: 0 failed requests, the live version stays).

Every request is recorded (start, end, kind, status code, bundle version, hits); the report gives, per
phase (before, during and after a fault), the counts by code and kind, and which requests failed.
After each run every item of the live version is looked up (SearchById k=1): items lost must be 0.

The stack runs as real processes (`python -m services.embedder|indexer|gateway`, VGG-16 with seeded
random weights, a bundle of demo photos built once into var/load/) on 127.0.0.1; `InProcessStack`
runs the same servers in this process for the quick test in tests/test_reliability_load.py.

Usage:
  .venv/bin/python benchmarks/load.py --scenario all --seconds 20 --json var/load/report.json
  .venv/bin/python benchmarks/load.py --scenario steady --clients 8 --seconds 30 --image-share 0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Callable

import grpc
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cbir.bundle import INDEX_FILE, open_bundle, read_current, set_current, write_bundle  # noqa: E402
from cbir.client import GatewayClient  # noqa: E402
from cbir.health import wait_until_serving  # noqa: E402
from cbir.v1 import indexer_pb2, indexer_pb2_grpc  # noqa: E402

DEMO = REPO / "demo" / "photos"


# ------------------------------------------------------------------------------------------ records


@dataclasses.dataclass
class Record:
    start: float  # seconds since the run began
    end: float
    kind: str  # "image" or "id"
    code: str  # "OK" or a status code name
    client: int = 0
    version: str = ""
    hits: int = 0
    detail: str = ""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@dataclasses.dataclass
class Run:
    records: list[Record]
    seconds: float
    clients: int
    events: dict[str, float]  # name -> seconds since the start

    def summary(self, start: float = 0.0, end: float | None = None) -> dict:
        """Requests whose answer came between `start` and `end` (a request in flight when a process was
        killed counts where it ended: during the fault)."""
        end = self.seconds + 1e9 if end is None else end
        chosen = [r for r in self.records if start <= r.end < end]
        ok = [r for r in chosen if r.code == "OK"]
        latencies = [1000 * (r.end - r.start) for r in ok]
        by_kind = {
            kind: dict(Counter(r.code for r in chosen if r.kind == kind))
            for kind in sorted({r.kind for r in chosen})
        }
        span = max(1e-9, min(end, self.seconds) - start)  # throughput over the phase's own length
        return {
            "requests": len(chosen), "ok": len(ok), "errors": len(chosen) - len(ok),
            "throughput_per_s": round(len(ok) / span, 2),
            "p50_ms": round(percentile(latencies, 0.5), 1), "p99_ms": round(percentile(latencies, 0.99), 1),
            "codes": dict(Counter(r.code for r in chosen)), "by_kind": by_kind,
        }

    def failures(self) -> list[dict]:
        return [
            {"start_s": round(r.start, 3), "end_s": round(r.end, 3), "kind": r.kind, "code": r.code,
             "detail": r.detail[:160]}
            for r in self.records if r.code != "OK"
        ]


def run_load(
    target: str, *, clients: int, seconds: float, images: list[bytes], ids: list[str], image_share: float = 0.5,
    k: int = 5, events: list[tuple[float, str, Callable[[], None]]] = (), timeout_s: float = 60.0,
    retry_pause_s: float = 0.02, seed: int = 0, after_events_s: float | None = None,
) -> Run:
    """`clients` threads, each with its own channel, search without pause for `seconds`; `events`
    (at, name, action) run in another thread at their time, and the run goes on for at least
    `after_events_s` (default: a quarter of `seconds`) after the last one is done (a restarted process
    may take long to come back). A client pauses `retry_pause_s` after a failure."""
    if after_events_s is None:
        after_events_s = seconds / 4
    records: list[Record] = []
    lock = threading.Lock()
    stop = threading.Event()
    origin = time.monotonic()
    event_times: dict[str, float] = {}

    def client(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        with GatewayClient(target, timeout_s=timeout_s) as gateway:
            while not stop.is_set():
                kind = "image" if rng.random() < image_share else "id"
                started = time.monotonic()
                try:
                    if kind == "image":
                        response = gateway.search_image(rng.choice(images), k=k)
                    else:
                        response = gateway.search_id(rng.choice(ids), k=k)
                    record = Record(started - origin, time.monotonic() - origin, kind, "OK", number,
                                    response.bundle_version, len(response.hits))
                except grpc.RpcError as error:
                    record = Record(started - origin, time.monotonic() - origin, kind, error.code().name, number,
                                    detail=error.details() or "")
                with lock:
                    records.append(record)
                if record.code != "OK":
                    stop.wait(retry_pause_s)

    def scheduler() -> None:
        for at, name, action in sorted(events, key=lambda e: e[0]):
            if stop.wait(max(0.0, at - (time.monotonic() - origin))):
                return
            event_times[name] = time.monotonic() - origin
            action()
            event_times[name + " done"] = time.monotonic() - origin

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    timer = threading.Thread(target=scheduler, daemon=True)
    for thread in threads:
        thread.start()
    timer.start()
    time.sleep(seconds)
    if events:
        timer.join(600)
        done = max(event_times.values(), default=0.0)
        time.sleep(max(0.0, done + after_events_s - (time.monotonic() - origin)))
    stop.set()
    for thread in threads:
        thread.join(timeout_s + 5)
    timer.join(120)
    return Run(sorted(records, key=lambda r: r.start), time.monotonic() - origin, clients, event_times)


def old_after_new(records: list[Record]) -> int:
    """Answers from an older version that a client got after one from a newer version (must be 0)."""
    seen: dict[int, str] = {}
    count = 0
    for record in sorted(records, key=lambda r: r.end):
        if record.code != "OK":
            continue
        latest = seen.get(record.client)
        if latest is not None and record.version < latest:
            count += 1
        seen[record.client] = max(latest or "", record.version)
    return count


def items_lost(gateway: str, expected_ids: list[str]) -> list[str]:
    """Ids of the live version that SearchById cannot find (must be none)."""
    lost = []
    with GatewayClient(gateway, timeout_s=30) as client:
        for item_id in expected_ids:
            try:
                response = client.search_id(item_id, k=1)
                if not response.hits:
                    lost.append(item_id)
            except grpc.RpcError:
                lost.append(item_id)
    return lost


def wait_serving(target: str, timeout_s: float = 300.0) -> float:
    """Block until grpc.health.v1 says SERVING; returns when (time.monotonic())."""
    wait_until_serving(target, timeout_s=timeout_s, interval_s=0.05)
    return time.monotonic()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------ bundles


def bundle_ids(root: pathlib.Path) -> list[str]:
    with open_bundle(root) as bundle:
        return [r.item_id for r in bundle.iter_items()]


def grown_version(root: pathlib.Path, extra: int, version: str, *, fingerprint: str | None = None,
                  make_current: bool = True) -> pathlib.Path:
    """A new version of the live bundle: its items plus `extra` near-copies (a growing collection);
    `fingerprint` pretends another model built it."""
    with open_bundle(root) as bundle:
        records = list(bundle.iter_items())
        vectors = np.array(bundle.features())
        model = bundle.manifest.model_info()
        metric, trees = bundle.manifest.metric, bundle.manifest.trees
    rng = np.random.default_rng(len(records))
    picks = rng.integers(0, len(records), extra)
    more = vectors[picks] + rng.normal(scale=0.01, size=(extra, vectors.shape[1])).astype(np.float32)
    if fingerprint:
        model.fingerprint = fingerprint
    return write_bundle(
        root, ids=[r.item_id for r in records] + [f"added-{i}" for i in range(extra)],
        urls=[r.url for r in records] + [records[p].url for p in picks],
        vectors=np.concatenate([vectors, more]).astype(np.float32), model=model, metric=metric, trees=trees,
        version=version, make_current=make_current,
    )


def truncated_version(root: pathlib.Path, version: str) -> pathlib.Path:
    path = grown_version(root, 3, version, make_current=False)
    with open(path / INDEX_FILE, "r+b") as f:
        f.truncate((path / INDEX_FILE).stat().st_size // 2)
    return path


def reload_rpc(indexer: str, version: str = "") -> str:
    """ReloadBundle; returns "OK <version>" or the refusal's code and message."""
    with grpc.insecure_channel(indexer) as channel:
        try:
            reply = indexer_pb2_grpc.IndexerStub(channel).ReloadBundle(
                indexer_pb2.ReloadBundleRequest(version=version), timeout=120)
            return f"OK {reply.bundle_version}"
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()[:200]}"


def live_version(indexer: str) -> tuple[str, int]:
    with grpc.insecure_channel(indexer) as channel:
        info = indexer_pb2_grpc.IndexerStub(channel).GetIndexInfo(indexer_pb2.GetIndexInfoRequest(), timeout=10).index
        return info.bundle_version, info.item_count


# ------------------------------------------------------------------------------------------ stacks


class ProcessStack:
    """Embedder, indexer and gateway as `python -m services.*` processes on 127.0.0.1."""

    def __init__(self, bundle: pathlib.Path, workdir: pathlib.Path, *, gateway_limit: int = 16,
                 log_dir: pathlib.Path | None = None):
        self.bundle = bundle
        self.workdir = workdir
        self.log_dir = log_dir or workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in ("embedder", "indexer", "gateway")}
        self.targets = {name: f"127.0.0.1:{port}" for name, port in self.ports.items()}
        self.gateway_limit = gateway_limit
        self.processes: dict[str, subprocess.Popen] = {}
        self.events: list[tuple[str, float]] = []

    @property
    def gateway(self) -> str:
        return self.targets["gateway"]

    @property
    def indexer(self) -> str:
        return self.targets["indexer"]

    def _env(self, name: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CBIR_")}
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        prefix = f"CBIR_{name.upper()}_"
        env.update({prefix + "PORT": str(self.ports[name]), prefix + "METRICS_PORT": "0",
                    prefix + "GRACE_SECONDS": "1"})
        if name == "embedder":
            env.update({prefix + "WEIGHTS": "random", prefix + "RANDOM_SEED": "7"})
        elif name == "indexer":
            env.update({prefix + "BUNDLE": str(self.bundle), prefix + "WATCH_SECONDS": "0.2",
                        prefix + "POLL_SECONDS": "0.5"})
        else:
            env.update({prefix + "EMBEDDER_TARGET": self.targets["embedder"],
                        prefix + "INDEXER_TARGET": self.targets["indexer"],
                        prefix + "MAX_CONCURRENT_RPCS": str(self.gateway_limit),
                        prefix + "MAX_WORKERS": str(self.gateway_limit)})
        return env

    def start(self, name: str) -> None:
        log = open(self.log_dir / f"{name}.log", "a")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"], cwd=REPO, env=self._env(name), stdout=log, stderr=log,
        )
        log.close()

    def start_all(self) -> None:
        for name in ("embedder", "indexer", "gateway"):
            self.start(name)
        for name in ("embedder", "indexer", "gateway"):
            wait_serving(self.targets[name])

    def kill(self, name: str) -> None:
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(30)

    def restart(self, name: str) -> float:
        self.start(name)
        return wait_serving(self.targets[name])

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class InProcessStack:
    """The same three servers inside this process (a fault is `stop(0)` + a new server on the same port)."""

    def __init__(self, bundle: pathlib.Path, embedder_model, *, gateway_limit: int = 16):
        self.bundle = bundle
        self.model = embedder_model
        self.gateway_limit = gateway_limit
        self.ports = {name: free_port() for name in ("embedder", "indexer", "gateway")}
        self.targets = {name: f"127.0.0.1:{port}" for name, port in self.ports.items()}
        self.servers: dict[str, object] = {}

    @property
    def gateway(self) -> str:
        return self.targets["gateway"]

    @property
    def indexer(self) -> str:
        return self.targets["indexer"]

    def start(self, name: str) -> None:
        if name == "embedder":
            from services.embedder.server import EmbedderServer
            from services.embedder.settings import EmbedderSettings

            server = EmbedderServer(EmbedderSettings(port=self.ports[name], metrics_port=None, weights="random",
                                                     random_seed=7, grace_seconds=0))
            server.start()
            server.load(self.model)
        elif name == "indexer":
            from services.indexer.server import IndexerServer
            from services.indexer.settings import IndexerSettings

            server = IndexerServer(IndexerSettings(port=self.ports[name], metrics_port=None, bundle=self.bundle,
                                                   watch_seconds=0.1, poll_seconds=0.2, grace_seconds=0))
            server.start_serving()
        else:
            from services.gateway.server import GatewayServer
            from services.gateway.settings import GatewaySettings

            server = GatewayServer(GatewaySettings(
                port=self.ports[name], metrics_port=None, embedder_target=self.targets["embedder"],
                indexer_target=self.targets["indexer"], max_concurrent_rpcs=self.gateway_limit,
                max_workers=self.gateway_limit, grace_seconds=0,
            ))
            server.start_serving()
        self.servers[name] = server

    def start_all(self) -> None:
        for name in ("embedder", "indexer", "gateway"):
            self.start(name)
        for name in ("embedder", "indexer", "gateway"):
            wait_serving(self.targets[name], 60)

    def kill(self, name: str) -> None:
        self.servers.pop(name).stop(0)

    def restart(self, name: str) -> float:
        self.start(name)
        return wait_serving(self.targets[name], 60)

    def stop(self) -> None:
        for name in ("gateway", "indexer", "embedder"):
            server = self.servers.pop(name, None)
            if server is not None:
                server.stop(0)


# ------------------------------------------------------------------------------------------ scenarios


def load_inputs(bundle: pathlib.Path, photos: pathlib.Path = DEMO, count: int = 24) -> tuple[list[bytes], list[str]]:
    images = [p.read_bytes() for p in sorted(photos.glob("*.jpg"))[:count]]
    return images, bundle_ids(bundle)


def scenario(stack, name: str, *, clients: int, seconds: float, images: list[bytes], ids: list[str],
             image_share: float = 0.5) -> dict:
    """Run one scenario on a started `stack`; returns its report (and raises nothing on failures)."""
    root = stack.bundle
    events: list[tuple[float, str, Callable[[], None]]] = []
    notes: dict[str, object] = {}
    fault_at = seconds / 4
    if name in ("kill-embedder", "kill-indexer"):
        upstream = name.split("-")[1]
        events.append((fault_at, f"kill {upstream}", lambda: stack.kill(upstream)))
        # "restart ... done" is when the new process reports SERVING
        events.append((fault_at + seconds / 8, f"restart {upstream}", lambda: stack.restart(upstream)))
    elif name == "reload":
        def reload() -> None:
            grown_version(root, 5, "load-v2")
        events.append((fault_at, "new version made current", reload))
    elif name == "bad-reload":
        def offer_broken() -> None:
            truncated_version(root, "load-truncated")
            notes["reload truncated (RPC)"] = reload_rpc(stack.indexer, "load-truncated")
            grown_version(root, 3, "load-other-model", fingerprint="another-model", make_current=False)
            notes["reload other model (RPC)"] = reload_rpc(stack.indexer, "load-other-model")
            set_current(root, "load-truncated")
            time.sleep(1.0)
            set_current(root, "load-other-model")
            time.sleep(1.0)
            notes["live version after"] = live_version(stack.indexer)
        events.append((fault_at, "broken versions offered", offer_broken))
    before_version = live_version(stack.indexer)
    run = run_load(stack.gateway, clients=clients, seconds=seconds, images=images, ids=ids, events=events,
                   image_share=image_share)
    report = {
        "scenario": name, "clients": clients, "seconds": round(run.seconds, 1), "image_share": image_share,
        "events": {k: round(v, 2) for k, v in run.events.items()}, "notes": notes,
        "live_version_before": before_version, "total": run.summary(),
    }
    if run.events:
        first = min(run.events.values())
        last = max(run.events.values())
        report["before_fault"] = run.summary(0, first)
        report["during_fault"] = run.summary(first, last)
        report["after_fault"] = run.summary(last)
    failures = run.failures()
    report["failures"] = failures[:50]
    report["failed_requests"] = len(failures)
    if failures:
        fault = min(run.events.values()) if run.events else 0.0
        report["failure_summary"] = {
            "first_end_s": min(f["end_s"] for f in failures), "last_end_s": max(f["end_s"] for f in failures),
            "codes": dict(Counter(f["code"] for f in failures)), "kinds": dict(Counter(f["kind"] for f in failures)),
            "in_flight_at_fault": sum(1 for f in failures if f["start_s"] < fault),
            "ended_before_fault": sum(1 for f in failures if f["end_s"] < fault),
        }
    report["short_answers"] = sum(1 for r in run.records if r.code == "OK" and r.hits < 5)
    report["versions_seen"] = dict(Counter(r.version for r in run.records if r.code == "OK"))
    report["old_version_after_new"] = old_after_new(run.records)
    if name == "reload":  # per client, no answer from the old version after one from the new
        report["live_version_after"] = live_version(stack.indexer)
    live, count = live_version(stack.indexer)
    report["items_lost"] = items_lost(stack.gateway, bundle_ids(root / live) if (root / live).is_dir() else ids)
    report["live_items"] = count
    return report


def ensure_bundle(workdir: pathlib.Path, photos: pathlib.Path = DEMO, count: int = 40) -> pathlib.Path:
    """var/load/bundle: `count` demo photos embedded with the random-weights VGG-16 (built once, copied per run)."""
    master = workdir / "master"
    if not (master / "current").exists():
        source = workdir / "photos"
        source.mkdir(parents=True, exist_ok=True)
        for path in sorted(photos.glob("*.jpg"))[:count]:
            shutil.copy(path, source / path.name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CBIR_")}
        env["CBIR_EMBEDDER_RANDOM_SEED"] = "7"
        subprocess.run([sys.executable, "-m", "apps", "index", "build", str(source), "--out", str(master),
                        "--weights", "random", "--no-progress", "--trees", "10"], cwd=REPO, env=env, check=True)
    return master


def fresh_bundle(master: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """A private copy of the master bundle (scenarios add versions to it)."""
    if target.exists():
        shutil.rmtree(target)
    version = read_current(master)
    target.mkdir(parents=True)
    shutil.copytree(master / version, target / version)
    set_current(target, version)
    return target


SCENARIOS = ("steady", "overload", "kill-embedder", "kill-indexer", "reload", "bad-reload")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="all", help=f"one of {', '.join(SCENARIOS)}, or all")
    parser.add_argument("--clients", type=int, default=None, help="[default: 8, overload: 4 x the limit]")
    parser.add_argument("--limit", type=int, default=16, help="the gateway's max concurrent RPCs")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--image-share", type=float, default=0.5, help="share of SearchByImage (rest SearchById)")
    parser.add_argument("--workdir", type=pathlib.Path, default=REPO / "var" / "load")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()
    names = SCENARIOS if args.scenario == "all" else tuple(args.scenario.split(","))
    master = ensure_bundle(args.workdir)
    reports = []
    for name in names:
        bundle = fresh_bundle(master, args.workdir / "run" / "bundle")
        stack = ProcessStack(bundle, args.workdir / "run", gateway_limit=args.limit)
        images, ids = load_inputs(bundle)
        clients = args.clients or (4 * args.limit if name == "overload" else 8)
        try:
            stack.start_all()
            report = scenario(stack, name, clients=clients, seconds=args.seconds, images=images, ids=ids,
                              image_share=args.image_share)
        finally:
            stack.stop()
        report["gateway_limit"] = args.limit
        reports.append(report)
        total = report["total"]
        print(f"{name:14} clients {clients:3}  {total['throughput_per_s']:7.1f} req/s  p50 {total['p50_ms']:7.1f} ms  "
              f"p99 {total['p99_ms']:7.1f} ms  codes {total['codes']}  items lost {len(report['items_lost'])}",
              flush=True)
        for phase in ("before_fault", "during_fault", "after_fault"):
            if phase in report:
                print(f"  {phase:13} {report[phase]['by_kind']}", flush=True)
        if report["notes"]:
            print(f"  notes {report['notes']}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(reports, indent=2))
        print(f"report: {args.json}")


if __name__ == "__main__":
    main()
