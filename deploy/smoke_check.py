"""The checks deploy/smoke.sh runs from the host against the running container stack.

Run with the project's own environment (`.venv/bin/python deploy/smoke_check.py ...`): it talks to
the gateway through `cbir.client.GatewayClient`, reads each replica's /metrics through the
container engine (`podman exec` / `docker exec`: scaled services publish no host ports) and asks
the stack's Prometheus over its HTTP API. Every wait is bounded; every check prints what it saw
and exits non-zero when it does not hold.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def fail(message: str) -> None:
    print(f"FAIL: {message}", flush=True)
    sys.exit(1)


def ok(message: str) -> None:
    print(f"ok: {message}", flush=True)


# ------------------------------------------------------------------------------------- gateway
def gateway_status(target: str) -> dict[str, tuple[str, str]]:
    from cbir.client import GatewayClient

    with GatewayClient(target, timeout_s=10) as client:
        response = client.status()
    return {upstream.name: (upstream.state, upstream.detail) for upstream in response.upstreams}


def cmd_status(args) -> None:
    """Poll GetStatus until every `name=STATE` expectation holds (or the wait is over)."""
    expected = dict(item.split("=", 1) for item in args.expect)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            seen = gateway_status(args.gateway)
        except Exception as error:  # the gateway itself not up yet
            seen = {"gateway": ("UNREACHABLE", str(error).splitlines()[0])}
        if all(seen.get(name, ("",))[0] == state for name, state in expected.items()):
            for name, (state, detail) in sorted(seen.items()):
                print(f"  gateway GetStatus: {name} {state}" + (f" ({detail[:200]})" if detail else ""))
            ok(f"gateway reports {', '.join(f'{n} {s}' for n, s in expected.items())}")
            return
        if time.monotonic() > deadline:
            fail(f"gateway GetStatus after {args.wait:g} s: {seen}, expected {expected}")
        time.sleep(2)


class SearchRun:
    """`count` searches by image through the gateway, `concurrency` at a time."""

    def __init__(self, target: str, photos: list[Path], count: int, concurrency: int, k: int = 5):
        self.target, self.photos, self.count, self.concurrency, self.k = target, photos, count, concurrency, k
        self.results: list[dict] = []
        self._lock = threading.Lock()

    def _one(self, client, photo: Path) -> None:
        import grpc

        start = time.monotonic()
        record = {"photo": photo.name, "start": start}
        try:
            response = client.search_image(photo.read_bytes(), k=self.k)
            record.update(code="OK", top=response.hits[0].item_id if response.hits else None,
                          embed_ms=response.timings.embed_ms)
        except grpc.RpcError as error:
            record.update(code=error.code().name, detail=(error.details() or "")[:300])
        record["end"] = time.monotonic()
        with self._lock:
            self.results.append(record)

    def run(self, during=None) -> None:
        from cbir.client import GatewayClient

        rng = random.Random(0)
        chosen = [rng.choice(self.photos) for _ in range(self.count)]
        with GatewayClient(self.target, timeout_s=60) as client, \
                concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self._one, client, photo) for photo in chosen]
            if during is not None:
                during()
            for future in futures:
                future.result()

    def summary(self) -> dict:
        done = [r for r in self.results if r["code"] == "OK"]
        latencies = sorted((r["end"] - r["start"]) * 1000 for r in done)
        errors: dict[str, int] = {}
        for r in self.results:
            if r["code"] != "OK":
                errors[r["code"]] = errors.get(r["code"], 0) + 1
        return {
            "searches": len(self.results),
            "ok": len(done),
            "errors": errors,
            "self_hits": sum(1 for r in done if r["top"] == r["photo"]),
            "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
            "p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))], 1) if latencies else None,
        }


def cmd_search(args) -> None:
    photos = sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    run = SearchRun(args.gateway, photos, args.count, args.concurrency)
    killed_at: list[float] = []

    def during():
        if not args.kill:
            return
        time.sleep(args.kill_after)
        killed_at.append(time.monotonic())
        done = subprocess.run(args.kill, shell=True, capture_output=True, text=True)
        print(f"  during the run, after {args.kill_after:g} s: `{args.kill}` -> exit {done.returncode}", flush=True)
        if done.returncode != 0:
            fail(f"the kill command failed: {done.stderr.strip()}")

    started = time.monotonic()
    run.run(during)
    summary = run.summary()
    summary["seconds"] = round(time.monotonic() - started, 1)
    print(f"  {args.label}: {json.dumps(summary)}", flush=True)
    for record in run.results:
        if record["code"] != "OK":
            print(f"    {record['code']}: {record.get('detail', '')[:200]}")
    if summary["searches"] != args.count:
        fail(f"{args.label}: {summary['searches']} of {args.count} searches finished")
    if args.expect_self_hits and summary["self_hits"] < summary["ok"]:
        fail(f"{args.label}: only {summary['self_hits']} of {summary['ok']} searches found their own photo first")
    bad_codes = set(summary["errors"]) - set(args.allow_code)
    if bad_codes:
        fail(f"{args.label}: errors other than {args.allow_code or 'none'}: {summary['errors']}")
    failed = sum(summary["errors"].values())
    if failed > args.max_errors:
        fail(f"{args.label}: {failed} searches failed, more than {args.max_errors}")
    if killed_at and failed:
        # Only the requests in flight at the kill may fail: each one must have started before it.
        late = [r for r in run.results if r["code"] != "OK" and r["start"] > killed_at[0] + 1.0]
        if late:
            fail(f"{args.label}: {len(late)} searches started after the kill failed too: {late[:3]}")
    ok(f"{args.label}: {summary['ok']}/{summary['searches']} searches OK"
       + (f", {failed} failed ({summary['errors']}), at most the {args.concurrency} in flight" if failed else "")
       + (f", every one found its own photo first" if args.expect_self_hits else "")
       + f"; client p50 {summary['p50_ms']} ms, p95 {summary['p95_ms']} ms")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary))


# ------------------------------------------------------------------------------------- replicas
def scrape_in_container(engine: str, container: str, port: int) -> str:
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read().decode())"
    done = subprocess.run([engine, "exec", container, "python", "-c", code], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} exec {container}: {done.stderr.strip()[:300]}")
    return done.stdout


def handled_count(metrics_text: str, method: str) -> int:
    """RPCs of `method` this replica answered OK (cbir_grpc_server_handled_total)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if (sample.name == "cbir_grpc_server_handled_total" and sample.labels.get("grpc_method") == method
                    and sample.labels.get("grpc_code") == "OK"):
                total += sample.value
    return int(total)


def cmd_replicas(args) -> None:
    """Print {container: OK count of --method}; with --baseline, check every replica got calls since."""
    counts = {c: handled_count(scrape_in_container(args.engine, c, args.port), args.method) for c in args.containers}
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else {}
    # A replica restarted since the baseline counts from 0 again.
    delta = {c: counts[c] - baseline.get(c, 0) if counts[c] >= baseline.get(c, 0) else counts[c] for c in counts}
    print(f"  {args.method} calls answered per replica{' since the baseline' if baseline else ''}: {json.dumps(delta)}")
    if args.save:
        Path(args.save).write_text(json.dumps(counts))
    if args.expect_each:
        idle = [c for c, n in delta.items() if n < args.expect_each]
        if idle:
            fail(f"replicas {idle} answered fewer than {args.expect_each} Embed requests: {delta}")
        total = sum(delta.values())
        ok(f"{total} {args.method} calls spread over {len(delta)} replicas: "
           + ", ".join(f"{c.rsplit('_', 1)[-1]}: {n} ({100 * n / total:.0f}%)" for c, n in delta.items()))


# ------------------------------------------------------------------------------------- prometheus
def prom_get(url: str, path: str, **params) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}{path}{query}", timeout=10) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"{path}: {body}")
    return body["data"]


def prom_value(url: str, expr: str) -> list[tuple[dict, float]]:
    data = prom_get(url, "/api/v1/query", query=expr)
    return [(item["metric"], float(item["value"][1])) for item in data["result"]]


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard panel and alert rule in deploy/."""
    found = []
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/cbir.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"dashboard '{panel['title']}'", target["expr"].replace("$__rate_interval", "1m")))
    rules = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            found.append((f"alert {rule['alert']}", rule["expr"]))
    return found


def embed_calls_per_replica(url: str) -> list[tuple[dict, float]]:
    return prom_value(url, 'sum by (instance) (cbir_grpc_server_handled_total{job="embedder", grpc_method="Embed"})')


def _per_replica_text(per_replica: list[tuple[dict, float]]) -> str:
    return ", ".join(f"{m['instance']}={int(v)}" for m, v in sorted(per_replica, key=lambda x: x[0]["instance"])) or "none"


def cmd_prometheus(args) -> None:
    expected = {job: int(n) for job, n in (item.split("=") for item in args.expect_targets)}
    deadline = time.monotonic() + args.wait
    while True:
        try:
            targets = prom_get(args.url, "/api/v1/targets", state="active")["activeTargets"]
        except Exception as error:
            targets, problem = [], f"Prometheus not answering: {error}"
        else:
            by_job: dict[str, list[dict]] = {}
            for target in targets:
                by_job.setdefault(target["labels"]["job"], []).append(target)
            up = {job: sum(t["health"] == "up" for t in ts) for job, ts in by_job.items()}
            problem = "" if all(len(by_job.get(j, [])) == n and up.get(j) == n for j, n in expected.items()) \
                else f"targets up per job: {up}, seen {({j: len(t) for j, t in by_job.items()})}, expected {expected}"
        if not problem:
            break
        if time.monotonic() > deadline:
            fail(problem + "".join(f"\n    {t['labels']['job']} {t['labels']['instance']}: {t['health']} {t.get('lastError', '')}"
                                   for t in targets))
        time.sleep(3)
    for target in sorted(targets, key=lambda t: (t["labels"]["job"], t["labels"]["instance"])):
        print(f"  prometheus target {target['labels']['job']:<10} {target['labels']['instance']:<22} {target['health']}")
    ok(f"Prometheus: all {len(targets)} targets up ({', '.join(f'{j}={n}' for j, n in expected.items())})")

    # The search latencies, as Prometheus recorded them (wait for a scrape after the searches).
    deadline = time.monotonic() + args.wait
    while True:
        counts = prom_value(args.url, 'sum(cbir_grpc_server_handling_seconds_count{job="gateway", grpc_method="SearchByImage"})')
        searches = int(counts[0][1]) if counts else 0
        if searches >= args.min_searches:
            break
        if time.monotonic() > deadline:
            fail(f"Prometheus recorded {searches} SearchByImage latencies, expected at least {args.min_searches}")
        time.sleep(3)
    quantiles = {}
    for q in (0.5, 0.95, 0.99):
        result = prom_value(args.url, f'histogram_quantile({q}, sum by (le) (cbir_grpc_server_handling_seconds_bucket{{job="gateway", grpc_method="SearchByImage"}}))')
        quantiles[f"p{int(q * 100)}"] = round(result[0][1] * 1000) if result else None
    stages = prom_value(args.url, 'histogram_quantile(0.5, sum by (service, stage, le) (cbir_stage_seconds_bucket))')
    stage_text = ", ".join(f"{m.get('service')}/{m.get('stage')} {v * 1000:.1f}" for m, v in sorted(stages, key=lambda s: (s[0].get("service", ""), s[0].get("stage", ""))))
    ok(f"Prometheus recorded {searches} gateway SearchByImage latencies: "
       + ", ".join(f"{k} <= {v} ms" for k, v in quantiles.items()) + " (histogram bucket bounds)")
    print(f"  stage p50 (ms, bucket bounds): {stage_text}")
    # Embed calls per replica. The newest replica may have had its first calls seconds ago, before
    # Prometheus' next scrape (every 10 s): poll within --wait rather than look once.
    deadline = time.monotonic() + args.wait
    while True:
        per_replica = embed_calls_per_replica(args.url)
        if len(per_replica) >= expected.get("embedder", 0) and all(v > 0 for _, v in per_replica):
            break
        if time.monotonic() > deadline:
            print("  Prometheus: Embed RPCs per embedder instance: " + _per_replica_text(per_replica))
            fail(f"Prometheus does not show Embed requests on every embedder replica within {args.wait:g} s")
        time.sleep(3)
    print("  Prometheus: Embed RPCs per embedder instance: " + _per_replica_text(per_replica))

    # Every dashboard panel and alert rule is valid PromQL for this Prometheus, and the ones that
    # should have data by now do.
    broken = []
    empty = []
    for where, expr in expressions():
        try:
            result = prom_get(args.url, "/api/v1/query", query=expr)["result"]
        except Exception as error:
            broken.append(f"{where}: {error}")
            continue
        if where.startswith("dashboard") and not result:
            empty.append(where)
    if broken:
        fail("expressions Prometheus refuses:\n    " + "\n    ".join(broken))
    ok(f"all {len(expressions())} dashboard and alert expressions evaluate"
       + (f" ({len(empty)} dashboard queries still empty: {', '.join(sorted(set(empty)))})" if empty else ""))
    rules = prom_get(args.url, "/api/v1/rules")["groups"]
    loaded = [rule["name"] for group in rules for rule in group["rules"]]
    firing = [a["labels"]["alertname"] for a in prom_get(args.url, "/api/v1/alerts")["alerts"] if a["state"] == "firing"]
    ok(f"Prometheus loaded {len(loaded)} alert rules; firing now: {firing or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("status", help="gateway GetStatus, waiting for expected upstream states")
    p.add_argument("--gateway", default="127.0.0.1:50050")
    p.add_argument("--expect", nargs="+", default=[], metavar="NAME=STATE")
    p.add_argument("--wait", type=float, default=60)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("search", help="searches through the gateway (optionally killing something during them)")
    p.add_argument("--gateway", default="127.0.0.1:50050")
    p.add_argument("--photos", default=str(REPO / "demo/photos"))
    p.add_argument("--count", type=int, default=30)
    p.add_argument("--concurrency", type=int, default=3)
    p.add_argument("--label", default="searches")
    p.add_argument("--expect-self-hits", action="store_true")
    p.add_argument("--allow-code", action="append", default=[])
    p.add_argument("--max-errors", type=int, default=0)
    p.add_argument("--kill", help="shell command run during the searches")
    p.add_argument("--kill-after", type=float, default=2.0)
    p.add_argument("--json-out")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("replicas", help="calls answered per replica, from each replica's own /metrics")
    p.add_argument("--engine", default="podman")
    p.add_argument("--method", default="Embed")
    p.add_argument("--port", type=int, default=9101)
    p.add_argument("--containers", nargs="+", required=True)
    p.add_argument("--save")
    p.add_argument("--baseline")
    p.add_argument("--expect-each", type=int, default=0)
    p.set_defaults(func=cmd_replicas)

    p = sub.add_parser("prometheus", help="targets up, search latencies recorded, expressions valid")
    p.add_argument("--url", default="http://127.0.0.1:9090")
    p.add_argument("--expect-targets", nargs="+", required=True, metavar="JOB=N")
    p.add_argument("--min-searches", type=int, default=1)
    p.add_argument("--wait", type=float, default=90)
    p.set_defaults(func=cmd_prometheus)

    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
