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


def mb(num_bytes: int | float | None) -> float | None:
    return None if num_bytes is None else num_bytes / 1e6


def groups_table(result: dict) -> str:
    return table(
        ["queries", "groups", "mAP", "recall@1", "recall@5", "recall@10", "N-S (max)"],
        [[result["queries"], result["groups"], result["map"], result["recall@1"], result["recall@5"],
          result["recall@10"], f"{result['ns']:.2f} ({result['ns_max']:.2f})"]],
    )


def copies_table(result: dict) -> str:
    rows = [[edit, s["queries"], s["recall@1"], s["recall@10"], s["map"]] for edit, s in result["per_edit"].items()]
    rows.append(["all", result["queries"], result["recall@1"], result["recall@10"], result["map"]])
    return table(["edit", "queries", "recall@1", "recall@10", "mAP"], rows, bold_rows=[len(rows) - 1])


def ann_table(rows: list[dict]) -> str:
    return table(
        ["search_k", "candidates inspected", f"recall@{rows[0]['k'] if rows else 'k'} vs exact", "p50 ms", "p95 ms"],
        [[("0 (bundle default)" if r["is_default"] else r["search_k"]), r["effective_search_k"], r["ann_recall"],
          r["p50_ms"], r["p95_ms"]] for r in rows],
        digits=3,
    )
