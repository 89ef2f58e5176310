"""Printing results: GitHub-flavoured Markdown tables (readable in a terminal, pasteable into docs)."""

from __future__ import annotations

import math
from typing import Any, Sequence


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, digits: int = 3,
          bold_rows: Sequence[int] = ()) -> str:
    """A Markdown table; numbers right-aligned; rows whose index is in `bold_rows` in bold."""
    cells = [[fmt(value, digits) for value in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) if rows else False
               for i in range(len(headers))]
    for index in bold_rows:
        cells[index] = [f"**{cell}**" if cell else cell for cell in cells[index]]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if numeric[i] else v.ljust(w)
                                 for i, (v, w) in enumerate(zip(values, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if numeric[i] else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule] + [line(row) for row in cells])


def groups_table(result: dict) -> str:
    """Overall: query- and group-weighted mAP, recall@1/5/10, N-S."""
    return table(
        ["queries", "groups", "mAP (queries)", "mAP (groups)", "recall@1", "recall@5", "recall@10", "N-S (max)"],
        [[result["queries"], result["groups"], result["map"], result["map_groups"], result["recall@1"],
          result["recall@5"], result["recall@10"], f"{result['ns']:.2f} ({result['ns_max']:.2f})"]],
    )


def datasets_table(result: dict) -> str:
    rows = [[name or "–", s["groups"], s["queries"], s["map_groups"], s["map"], s["recall@1"]]
            for name, s in result["per_dataset"].items()]
    return table(["dataset", "groups", "queries", "mAP (groups)", "mAP (queries)", "recall@1"], rows)


def per_group_table(result: dict) -> str:
    rows = sorted(result["per_group"].items(), key=lambda kv: (kv[1]["dataset"], kv[1]["ap"]))
    return table(["group", "dataset", "images", "AP", "recall@1"],
                 [[g, s["dataset"] or "–", s["images"], s["ap"], s["recall@1"]] for g, s in rows])


def gallery_table(rows: list[dict], protocol: str) -> str:
    """Quality at gallery size: the same queries against nested, seeded subsets of the distractors."""
    if protocol == "groups":
        return table(["distractors", "gallery", "mAP (queries)", "mAP (groups)", "recall@1", "recall@10"],
                     [[r["distractors"], r["gallery"], r["map"], r["map_groups"], r["recall@1"], r["recall@10"]]
                      for r in rows])
    return table(["other gallery images", "gallery", "recall@1", "recall@10", "mAP"],
                 [[r["distractors"], r["gallery"], r["recall@1"], r["recall@10"], r["map"]] for r in rows])


def copies_table(result: dict) -> str:
    per = result.get("per_family") or result.get("per_edit") or {}
    rows = [[name, s["queries"], s["recall@1"], s["recall@10"], s["map"], s.get("median_rank"), s.get("not_found")]
            for name, s in per.items()]
    rows.append(["all", result["queries"], result["recall@1"], result["recall@10"], result["map"],
                 result.get("median_rank"), result.get("not_found")])
    return table(["family", "queries", "recall@1", "recall@10", "mAP", "median rank", "not in top k"], rows,
                 bold_rows=[len(rows) - 1])


def ms_text(embedding: dict) -> str:
    """'N ms per image', or 'cached' when no image went through the model in this run (a figure from an
    earlier run would be stale)."""
    if embedding.get("cached"):
        return "cached (no image embedded in this run: no ms/image)"
    ms = embedding.get("ms_per_image")
    if ms is None:
        return "no image embedded"
    cached = embedding.get("from_cache") or 0
    return f"{ms:.0f} ms per image" + (f" (over the {embedding['embedded_now']:,} embedded now; {cached:,} from the cache)"
                                       if cached else "")


def diff_table(rows: list[dict]) -> str:
    """Rows of `apps.eval.diff.paired_diff`: mean paired difference [95 % interval]."""
    def cell(value):
        mean, low, high = value
        return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"

    return table(["subset", "queries", "clusters", "A mAP", "B mAP", "Δ AP (queries)", "Δ AP (groups)", "Δ recall@1"],
                 [[r["subset"], r["queries"], r["clusters"], r["a_map"], r["b_map"], cell(r["ap"]), cell(r["ap_groups"]),
                   cell(r["r1"])] for r in rows])


def ann_table(rows: list[dict]) -> str:
    return table(
        ["search_k", "candidates inspected", f"recall@{rows[0]['k'] if rows else 'k'} vs exact", "p50 ms", "p95 ms"],
        [[("0 (bundle default)" if r["is_default"] else r["search_k"]), r["effective_search_k"], r["ann_recall"],
          r["p50_ms"], r["p95_ms"]] for r in rows],
        digits=3,
    )
