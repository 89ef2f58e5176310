"""`cbir eval diff A.json B.json`: paired per-query differences of two runs of the same protocol.

Both runs must have scored the same queries (same collection, seed, families); only the queries the
two have in common are compared, and the report says how many. For each query, B's AP minus A's (and
recall@1's); the mean with a 95 % interval from a seeded bootstrap over clusters — the labelled group
of a groups query, the original of a copy — since queries of one cluster are not independent. Overall
and per dataset (groups) or per family (copies).
"""

from __future__ import annotations

import json
import pathlib

from apps.eval import metrics
from apps.eval.protocols import EvalError


def load(path) -> dict:
    try:
        data = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EvalError(f"{path}: cannot read the report: {error}") from None
    protocol = data.get("protocol")
    if protocol not in ("groups", "copies") or "per_query" not in data.get(protocol, {}):
        raise EvalError(f"{path}: not a report of `cbir eval groups` or `cbir eval copies` with per-query rows")
    return data


def paired_diff(a: dict, b: dict, *, resamples: int = 2000, seed: int = 0) -> dict:
    if a["protocol"] != b["protocol"]:
        raise EvalError(f"the reports are of different protocols ({a['protocol']} and {b['protocol']})")
    protocol = a["protocol"]
    rows_a = {r["query"]: r for r in a[protocol]["per_query"]}
    rows_b = {r["query"]: r for r in b[protocol]["per_query"]}
    common = [q for q in rows_a if q in rows_b]
    if not common:
        raise EvalError("the two reports have no query in common: were they run on the same collection and seed?")
    cluster_key, subset_key = ("group", "dataset") if protocol == "groups" else ("original", "family")

    def summarise(name: str, queries: list[str]) -> dict:
        clusters = [rows_a[q][cluster_key] for q in queries]
        ap = [rows_b[q]["ap"] - rows_a[q]["ap"] for q in queries]
        r1 = [rows_b[q]["r1"] - rows_a[q]["r1"] for q in queries]
        kw = dict(resamples=resamples, seed=seed)
        return {"subset": name, "queries": len(queries), "clusters": len(set(clusters)),
                "a_map": metrics.mean(rows_a[q]["ap"] for q in queries),
                "b_map": metrics.mean(rows_b[q]["ap"] for q in queries),
                "ap": metrics.bootstrap_interval(ap, clusters, **kw),
                "ap_groups": metrics.bootstrap_interval(ap, clusters, weighting="group", **kw),
                "r1": metrics.bootstrap_interval(r1, clusters, **kw)}

    subsets: dict[str, list[str]] = {}
    for q in common:
        subsets.setdefault(rows_a[q].get(subset_key) or "–", []).append(q)
    rows = [summarise("all", common)] + [summarise(name, qs) for name, qs in subsets.items()]
    return {"protocol": protocol, "a": a.get("model_spec"), "b": b.get("model_spec"),
            "a_index": a.get("index_spec", {}).get("label"), "b_index": b.get("index_spec", {}).get("label"),
            "common_queries": len(common), "only_a": len(rows_a) - len(common), "only_b": len(rows_b) - len(common),
            "cluster": cluster_key, "subset": subset_key, "seed": seed, "resamples": resamples, "rows": rows}
