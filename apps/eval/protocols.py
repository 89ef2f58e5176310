"""The two evaluation protocols, run through the real pipeline.

Vectors come from the embedder's own code (`services.embedder.Embedder` in this process, or the
embedder service with `--embedder TARGET`), the index is a real bundle written by
`cbir.bundle.write_bundle` (PCA, Annoy, item table) and searched with the indexer's
`services.indexer.index.SearchIndex`, so the numbers are what users of that configuration get.

- **labelled groups** (UKBench-style): a folder with one sub-folder per group (`group/xxx.jpg`), or
  one sub-folder per dataset holding one per group (`dataset/group/xxx.jpg`, devbench's layout), or
  a CSV/JSONL manifest with a group (and optional dataset) column. Every image queries the rest of
  the collection; distractors (`--distractors`) join the index, never as queries.
  A collection without groups (the demo photos) can be given groups made of each image and
  seeded edits of it (`groups_from_edits`).
- **copy detection** (DISC21-style): queries are seeded augly copies (`apps.eval.copies`), or the
  older Pillow edits (`apps.eval.edits`), of sampled originals, never indexed themselves; the
  original is the one relevant hit, and gallery images labelled with the original's group (other
  views of the same object) are left out of its ranking rather than counted as misses.

Bad input does not stop a run: unreadable images are reported (`rejects`) and left out, groups
left with one image become distractors (indexed, never queried), with a warning that says so.
Each image is embedded once per model; `VectorCache` keeps vectors on disk between runs.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
from typing import Sequence

import numpy as np

from cbir.errors import BadImage
from apps.eval import copies as copies_module
from apps.eval import edits as edits_module
from apps.eval import metrics
from apps.eval.embedding import Job
from apps.eval.indexes import BuiltIndex, search_queries
from apps.ingest.sources import read_bytes
from apps.ingest.sources import SourceError, SourceItem, list_source

MAX_IMAGE_BYTES = 32 * 1024 * 1024
EDIT_SEPARATOR = "#"
DISTRACTOR_PREFIX = "distractor:"


class EvalError(ValueError):
    """The evaluation cannot run at all (nothing to evaluate); the message says what to fix."""


# ------------------------------------------------------------------------------------- collections


def list_collection(source: str | pathlib.Path) -> list[SourceItem]:
    """The items of a folder or manifest; EvalError when there are none."""
    try:
        items = list_source(source)
    except SourceError as error:
        raise EvalError(str(error)) from None
    if not items:
        kind = "folder" if pathlib.Path(source).is_dir() else "manifest"
        raise EvalError(f"{source}: the {kind} lists no images; nothing to evaluate")
    return items


def file_job(item: SourceItem, key: str | None = None, query: bool = False) -> Job:
    return Job(key or item.item_id, lambda: read_bytes(item, max_bytes=MAX_IMAGE_BYTES), query)


def edit_job(item: SourceItem, edit: str, seed: int, params: dict[str, dict]) -> Job:
    """The job of one edited query; the drawn edit parameters land in `params[key]`."""
    key = f"{item.item_id}{EDIT_SEPARATOR}{edit}"

    def load() -> bytes:
        original = read_bytes(item, max_bytes=MAX_IMAGE_BYTES)
        try:
            result = edits_module.edited_bytes(original, edit, seed=seed, key=item.item_id)
        except (OSError, ValueError, SyntaxError) as error:  # what Pillow raises on bad data
            raise BadImage(f"cannot make the {edit} edit: {type(error).__name__}: {error}") from None
        params[key] = result.params
        return result.data

    return Job(key, load, query=True)


def copy_job(item: SourceItem, family: str, seed: int, params: dict[str, dict], backgrounds=()) -> Job:
    """The job of one augly copy (`apps.eval.copies`); the drawn parameters land in `params[key]`."""
    key = f"{item.item_id}{EDIT_SEPARATOR}{family}"

    def load() -> bytes:
        original = read_bytes(item, max_bytes=MAX_IMAGE_BYTES)
        try:
            copy = copies_module.make_copy(edits_module.open_rgb(original), family, seed=seed, key=item.item_id,
                                           backgrounds=backgrounds)
        except (OSError, ValueError, SyntaxError) as error:
            raise BadImage(f"cannot make the {family} copy: {type(error).__name__}: {error}") from None
        params[key] = copy.params
        return copy.data

    return Job(key, load, query=True)


def background_loader(item: SourceItem, max_side: int = 640):
    """A loader of one overlay/collage photo (reduced to `max_side`, decoded once, thread-safe enough:
    a race decodes it twice)."""
    cache: list = []

    def load():
        if not cache:
            image = edits_module.open_rgb(read_bytes(item, max_bytes=MAX_IMAGE_BYTES))
            image.thumbnail((max_side, max_side))
            cache.append(image)
        return cache[0]

    return load


def sample(items: list[SourceItem], count: int | None, seed: int) -> list[SourceItem]:
    """A seeded sample of `count` items (all when None or >= len), in the original order."""
    if not count or count >= len(items):
        return items
    chosen = np.random.default_rng(seed).choice(len(items), size=count, replace=False)
    return [items[i] for i in sorted(chosen)]


@dataclasses.dataclass
class Groups:
    """A labelled-groups collection: every indexed key, and the group of each (None: distractor)."""

    keys: list[str]
    group_of: dict[str, str | None]
    jobs: list[Job]
    warnings: list[str] = dataclasses.field(default_factory=list)
    dataset_of: dict[str, str] = dataclasses.field(default_factory=dict)  # group -> dataset


def folder_layout(item_ids: list[str]) -> str:
    """'nested' when every image in a sub-folder is two levels deep (dataset/group/x.jpg), else 'flat'
    (the group is the image's folder)."""
    depths = {item_id.count("/") for item_id in item_ids if "/" in item_id}
    return "nested" if depths == {2} else "flat"


def groups_from_source(source: str | pathlib.Path, group_column: str = "group",
                       dataset_column: str = "dataset") -> Groups:
    """Folder: the group of `a/b/x.jpg` is `a/b` (images at the top level have none); when every grouped
    image is two levels deep (`dataset/group/x.jpg`) the first level is the group's dataset, otherwise
    the folder's name is. Manifest: the `group_column` column (rows without one have none) and the
    optional `dataset_column`. Images without a group are distractors."""
    items = list_collection(source)
    is_folder = pathlib.Path(source).is_dir()
    nested = is_folder and folder_layout([item.item_id for item in items]) == "nested"
    default_dataset = pathlib.Path(source).resolve().name if is_folder else pathlib.Path(source).stem
    group_of: dict[str, str | None] = {}
    dataset_of: dict[str, str] = {}
    for item in items:
        if is_folder:
            group = item.item_id.rpartition("/")[0] or None
            dataset = group.split("/", 1)[0] if nested and group else default_dataset
        else:
            group = item.metadata.get(group_column) or None
            dataset = item.metadata.get(dataset_column) or default_dataset
        group_of[item.item_id] = group
        if group is not None:
            dataset_of.setdefault(group, dataset)
    warnings = []
    ungrouped = sum(1 for g in group_of.values() if g is None)
    if ungrouped:
        where = ("at the top level of the folder (put each group in its own sub-folder)" if is_folder
                 else f"without a value in column {group_column!r}")
        warnings.append(f"{ungrouped} of {len(items)} images are {where}: they are indexed as distractors, "
                        f"never queried")
    jobs = [file_job(item, query=group_of[item.item_id] is not None) for item in items]
    return Groups([item.item_id for item in items], group_of, jobs, warnings, dataset_of)


def groups_from_edits(items: list[SourceItem], size: int, edits: Sequence[str], seed: int,
                      params: dict[str, dict] | None = None) -> Groups:
    """Groups for a collection that has none: each image plus `size - 1` seeded edits of it (drawn
    from `edits` without repeats). The edited images are the copy-detection queries of the same
    seed, so one embedding serves both protocols."""
    if size < 2:
        raise EvalError(f"a group needs at least 2 images, got size {size}")
    if size - 1 > len(edits):
        raise EvalError(f"groups of {size} need {size - 1} different edits, only {len(edits)} chosen")
    params = {} if params is None else params
    keys, group_of, jobs = [], {}, []
    for item in items:
        rng = edits_module.edit_rng(seed, item.item_id, "groups")
        chosen = sorted(rng.choice(len(edits), size=size - 1, replace=False))
        keys.append(item.item_id)
        group_of[item.item_id] = item.item_id
        jobs.append(file_job(item, query=True))
        for index in chosen:
            job = edit_job(item, edits[index], seed, params)
            keys.append(job.key)
            group_of[job.key] = item.item_id
            jobs.append(job)
    return Groups(keys, group_of, jobs, dataset_of={item.item_id: "edits" for item in items})


def effective_groups(groups: Groups, embedded: set[str]) -> tuple[dict[str, list[str]], list[str]]:
    """The groups with 2+ embedded images (group -> keys) and warnings about the rest."""
    members: dict[str, list[str]] = {}
    for key in groups.keys:
        group = groups.group_of.get(key)
        if group is not None and key in embedded:
            members.setdefault(group, []).append(key)
    single = sorted(g for g, keys in members.items() if len(keys) == 1)
    warnings = []
    if single:
        shown = ", ".join(repr(g) for g in single[:5]) + (f" and {len(single) - 5} more" if len(single) > 5 else "")
        warnings.append(f"{len(single)} groups have a single usable image ({shown}): nothing can be found for "
                        f"them, so they are indexed as distractors, never queried")
    return {g: keys for g, keys in members.items() if len(keys) > 1}, warnings


# ------------------------------------------------------------------------------------- protocols


def evaluate_groups(built: BuiltIndex, vectors: dict[str, np.ndarray], members: dict[str, list[str]],
                    *, depth: int = 100, search_k: int = 0, dataset_of: dict[str, str] | None = None,
                    details: bool = True) -> dict:
    """Every grouped image queries the index (itself left out of its ranking); positives are the rest of
    its group. mAP both query-weighted (`map`) and group-weighted (`map_groups`: every group counts
    once); per dataset and (with `details`) per group and per query, each query with its top hit."""
    dataset_of = dataset_of or {}
    queries = [(group, key) for group, keys in members.items() for key in keys]
    if not queries:
        raise EvalError("no group has two or more usable images: nothing to evaluate")
    ranked, seconds = search_queries(built, np.stack([vectors[key] for _, key in queries]), depth + 1, search_k,
                                     keys=[key for _, key in queries])
    rows = []
    for (group, key), ranking, hits in zip(queries, ranked, built.last_hits):
        rest = [item for item in ranking if item != key][:depth]
        mates = set(members[group]) - {key}
        rows.append({
            "query": key, "group": group, "dataset": dataset_of.get(group, ""),
            "ap": metrics.average_precision(rest, mates),
            "r1": metrics.recall_at(rest, mates, 1), "r5": metrics.recall_at(rest, mates, 5),
            "r10": metrics.recall_at(rest, mates, 10), "ns": metrics.ns_score(rest, mates),
            "first_rank": metrics.first_rank(rest, mates),
            "top1": rest[0] if rest else None, "top1_relevant": bool(rest) and rest[0] in mates,
            "top": _top_hits(hits, key, mates),
        })
    result = groups_summary(rows) | {
        "ns": metrics.mean(r["ns"] for r in rows),
        "ns_max": metrics.mean(min(4, len(members[r["group"]])) for r in rows),
        "query_p50_ms": metrics.percentile_ms(seconds, 50),
    }
    by_dataset: dict[str, list[dict]] = {}
    for row in rows:
        by_dataset.setdefault(row["dataset"], []).append(row)
    result["per_dataset"] = {name: groups_summary(selected) for name, selected in sorted(by_dataset.items())}
    if details:
        by_group: dict[str, list[dict]] = {}
        for row in rows:
            by_group.setdefault(row["group"], []).append(row)
        result["per_group"] = {group: {"dataset": selected[0]["dataset"], "images": len(members[group]),
                                       "ap": metrics.mean(r["ap"] for r in selected),
                                       "recall@1": metrics.mean(r["r1"] for r in selected)}
                               for group, selected in by_group.items()}
        result["per_query"] = rows
    return result


TOP_HITS = 20  # hits per query kept in the report with their score, inliers and match class (calibration)


def _top_hits(hits, query: str, relevant: set[str], skip: set[str] = frozenset()) -> list[list]:
    """[item id, score, inliers, match class, relevant] of the first TOP_HITS hits (the query itself and
    ignored items left out): what the match-class thresholds are calibrated on."""
    kept = [h for h in hits if h.item_id != query and h.item_id not in skip][:TOP_HITS]
    return [[h.item_id, round(h.score, 5), h.inliers, h.match, h.item_id in relevant] for h in kept]


def groups_summary(rows: list[dict]) -> dict:
    """Query- and group-weighted mAP, recall@1/5/10 of some per-query rows of `evaluate_groups`."""
    aps, groups = [r["ap"] for r in rows], [r["group"] for r in rows]
    return {
        "queries": len(rows), "groups": len(set(groups)),
        "map": metrics.mean(aps), "map_stderr": metrics.stderr(aps),
        "map_groups": metrics.group_weighted_mean(aps, groups),
        "recall@1": metrics.mean(r["r1"] for r in rows), "recall@5": metrics.mean(r["r5"] for r in rows),
        "recall@10": metrics.mean(r["r10"] for r in rows),
    }


def copies_summary(rows: list[dict]) -> dict:
    ranks = [r["rank"] for r in rows]
    found = [rank for rank in ranks if rank is not None]
    return {"queries": len(rows), "recall@1": metrics.mean(r["r1"] for r in rows),
            "recall@10": metrics.mean(r["r10"] for r in rows), "map": metrics.mean(r["ap"] for r in rows),
            "median_rank": float(np.median(found)) if len(found) == len(ranks) and ranks else None,
            "not_found": len(ranks) - len(found)}


def evaluate_copies(built: BuiltIndex, vectors: dict[str, np.ndarray], queries: list[tuple[str, str, str]],
                    *, depth: int = 100, search_k: int = 0, ignore: dict[str, set[str]] | None = None,
                    families: Sequence[str] = (), details: bool = True) -> dict:
    """`queries`: (query key, original's key, family). The original is the one relevant hit; the gallery
    images in `ignore[original]` (other views of the same object) are left out of that query's ranking,
    neither hits nor misses. Per family and overall: recall@1/@10, mAP, the rank of the original."""
    if not queries:
        raise EvalError("no copy-detection queries could be made: nothing to evaluate")
    ignore = ignore or {}
    most_ignored = max((len(v) for v in ignore.values()), default=0)
    ranked, seconds = search_queries(built, np.stack([vectors[key] for key, _, _ in queries]), depth + most_ignored,
                                     search_k, keys=[key for key, _, _ in queries])
    rows = []
    for (key, original, family), ranking, hits in zip(queries, ranked, built.last_hits):
        skip = ignore.get(original, set()) - {original}
        kept = [item for item in ranking if item not in skip][:depth]
        rank = metrics.first_rank(kept, {original})
        rows.append({"query": key, "original": original, "family": family, "rank": rank,
                     "ap": metrics.average_precision(kept, {original}),
                     "r1": float(rank == 1), "r10": float(rank is not None and rank <= 10),
                     "top1": kept[0] if kept else None, "top1_relevant": bool(kept) and kept[0] == original,
                     "top": _top_hits(hits, key, {original}, skip),
                     "ignored": sum(1 for item in ranking[:len(kept) + len(skip)] if item in skip)})
    per_family: dict[str, list[dict]] = {}
    for row in rows:
        per_family.setdefault(row["family"], []).append(row)
    order = [f for f in families if f in per_family] + [f for f in per_family if f not in families]
    result = {
        **copies_summary(rows),
        "map_stderr": metrics.stderr(r["ap"] for r in rows),
        "per_family": {family: copies_summary(per_family[family]) for family in order},
        "query_p50_ms": metrics.percentile_ms(seconds, 50),
    }
    if details:
        result["per_query"] = rows
    return result


def copy_queries(items: list[SourceItem], names: Sequence[str], seed: int, params: dict[str, dict],
                 backgrounds=None) -> tuple[list[Job], list[tuple[str, str, str]]]:
    """One query per item and name: augly copies (`apps.eval.copies`) when `backgrounds` is given (a
    list of loaders of photos outside the gallery, possibly empty), else the Pillow edits (`apps.eval.edits`)."""
    jobs, queries = [], []
    for item in items:
        for name in names:
            job = (edit_job(item, name, seed, params) if backgrounds is None
                   else copy_job(item, name, seed, params, backgrounds))
            jobs.append(job)
            queries.append((job.key, item.item_id, name))
    return jobs, queries


def scratch_dir(prefix: str = "cbir-eval-") -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)


def to_json(data, path: pathlib.Path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=_json_default) + "\n", encoding="utf-8")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, pathlib.Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
