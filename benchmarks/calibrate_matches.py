"""Calibrate the match classes (same image / copy / similar) on `cbir eval` reports.

    .venv/bin/python benchmarks/calibrate_matches.py var/eval/groups.json var/eval/copies.json

Both reports keep, per query, its first 20 hits with score, inliers and whether each is relevant
(`top` in `per_query`). Pairs:
- copies: the original among a copy query's top 20 is a positive, every other hit a negative;
- groups: another photo of the query's group is a positive ("similar"), any other hit a negative.
For each threshold the tables give the share of positives reached (recall of the top-20 pairs) and
the precision among the pairs reached. Precision is over top-20 candidate pairs (about one positive
per 20 for copies): it depends on that base rate, and the negatives grow with the gallery.
"""

from __future__ import annotations

import json
import sys


def pairs(report: dict) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    """(score, inliers) of the positive and the negative top-20 pairs of one report."""
    section = report.get("copies") or report.get("groups")
    positives, negatives = [], []
    for row in section["per_query"]:
        for _, score, inliers, _, relevant in row.get("top", []):
            (positives if relevant else negatives).append((score, inliers))
    return positives, negatives


def table(name: str, positives, negatives, thresholds, key) -> None:
    print(f"\n{name}: {len(positives)} positive and {len(negatives)} negative top-20 pairs\n")
    print("| threshold | positives reaching it | negatives reaching it | precision |")
    print("|---|--:|--:|--:|")
    for threshold in thresholds:
        hit = sum(1 for pair in positives if key(pair) >= threshold)
        wrong = sum(1 for pair in negatives if key(pair) >= threshold)
        precision = hit / (hit + wrong) if hit + wrong else float("nan")
        print(f"| {threshold:g} | {hit / max(1, len(positives)):.3f} | {wrong} ({wrong / max(1, len(negatives)):.4f}) "
              f"| {precision:.3f} |")


def main() -> None:
    groups, copies = (json.load(open(path)) for path in sys.argv[1:3])
    copy_pos, copy_neg = pairs(copies)
    group_pos, group_neg = pairs(groups)
    scores = (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.93, 0.95, 0.97)
    table("copies, score (cosine)", copy_pos, copy_neg, scores, lambda p: p[0])
    table("copies, inliers (verified)", copy_pos, copy_neg, (4, 6, 8, 10, 12, 15, 20, 30), lambda p: p[1])
    table("groups (other photos of the same place or object), score", group_pos, group_neg, scores, lambda p: p[0])
    table("groups, inliers", group_pos, group_neg, (8, 10, 12, 15, 20, 30), lambda p: p[1])


if __name__ == "__main__":
    main()
