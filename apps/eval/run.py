"""`cbir eval groups` and `cbir eval copies`: one model, one index configuration, one report.

Each returns a JSON-ready dict: the configuration, the collection (counts, rejects, warnings), the
protocol's metrics (with per-query rows), the index (size, default search effort) and the ANN
recall table (recall@k of the index against exact search, latency per search effort).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import pathlib
import re
from typing import Sequence

import numpy as np

from cbir.bundle import model_to_dict
from apps.eval import copies as copies_module
from apps.eval import edits as edits_module
from apps.eval.embedding import Embedded, ModelSpec, VectorCache, cache_name, embed_jobs, make_embedding
from apps.eval.indexes import BuiltIndex, IndexSpec, ann_recall_rows, gallery_levels
from apps.eval.protocols import (
    DISTRACTOR_PREFIX,
    EvalError,
    background_loader,
    copy_queries,
    effective_groups,
    evaluate_copies,
    evaluate_groups,
    file_job,
    groups_from_edits,
    groups_from_source,
    list_collection,
    sample,
    scratch_dir,
)


@dataclasses.dataclass
class EvalOptions:
    model: ModelSpec = ModelSpec()
    index: IndexSpec = IndexSpec()
    embedder_target: str | None = None  # use the embedder service instead of VGG-16 in this process
    depth: int = 100  # results retrieved per query (AP counts relevant items beyond it as missed)
    recall_k: int = 50  # k of the ANN recall against exact search
    search_ks: Sequence[int] | None = None  # search efforts tried for ANN recall (None: see default_search_ks)
    seed: int = 0
    cache_dir: pathlib.Path | None = None
    batch_size: int = 32
    progress: bool = True


def default_search_ks(trees: int, k: int) -> list[int]:
    """Annoy's own default (trees * k), a tenth of it, and the bundle default (0)."""
    return [max(1, trees * k // 10), trees * k, 0]


class _Vectors:
    """Embeds jobs with one model, remembering every vector and reject of the run."""

    def __init__(self, options: EvalOptions, embedding=None):
        self.options = options
        self._own = embedding is None
        self.embedding = embedding or make_embedding(options.model, options.embedder_target)
        self.info = self.embedding.info
        self.cache = VectorCache(options.cache_dir, cache_name(self.info)) if options.cache_dir else None
        self.vectors: dict[str, np.ndarray] = {}
        self.local: dict[str, tuple[bytes, ...]] = {}
        self.regions: dict[str, np.ndarray] = {}
        self.rejects: dict[str, str] = {}
        self.embedded = 0
        self.model_seconds = 0.0

    def embed(self, jobs, desc: str) -> Embedded:
        jobs = [job for job in jobs if job.key not in self.vectors and job.key not in self.rejects]
        result = embed_jobs(jobs, self.embedding, cache=self.cache, batch_size=self.options.batch_size,
                            progress=self.options.progress, desc=desc)
        self.vectors.update(result.vectors)
        self.local.update(result.local)
        self.regions.update(result.regions)
        self.rejects.update(result.rejects)
        self.embedded += result.embedded
        self.model_seconds += result.model_seconds
        return result

    def close(self) -> None:
        """Close the embedder service's channel (when this object opened it)."""
        if self._own and hasattr(self.embedding, "close"):
            self.embedding.close()

    def summary(self) -> dict:
        """ms_per_image is measured on the images embedded in this run only; when every vector came from
        the cache it is None and `cached` says so (a figure from an earlier run would be stale: another
        machine, another load)."""
        total = len(self.vectors)
        return {
            "model": model_to_dict(self.info),
            "embedded_now": self.embedded,
            "from_cache": total - self.embedded,
            "cached": total > 0 and self.embedded == 0,
            "ms_per_image": 1000.0 * self.model_seconds / self.embedded if self.embedded else None,
        }


_OBJECT_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _rejects(rejects: dict[str, str]) -> list[dict]:
    # Pillow's messages name the in-memory file object ("<_io.BytesIO object at 0x7f...>"): noise, and never
    # the same twice.
    return [{"image": key, "reason": _OBJECT_REPR.sub("", reason)} for key, reason in sorted(rejects.items())]


def _header(protocol: str, source, options: EvalOptions) -> dict:
    return {
        "protocol": protocol,
        "source": str(source),
        "created_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "model_spec": options.model.label,
        "index_spec": dataclasses.asdict(options.index) | {"label": options.index.label},
        "seed": options.seed,
        "depth": options.depth,
    }


def _ann(built: BuiltIndex, queries: np.ndarray, options: EvalOptions) -> list[dict]:
    search_ks = options.search_ks if options.search_ks else default_search_ks(options.index.trees, options.recall_k)
    return ann_recall_rows(built, queries, k=options.recall_k, search_ks=search_ks)


def _index_summary(built: BuiltIndex) -> dict:
    return {"items": built.item_count, "index_bytes": built.index_bytes, "default_search_k": built.default_search_k,
            "build_seconds": built.build_seconds, "dimension": built.bundle.manifest.index_dimension}


def _no_groups_message(source, group_column: str, what: str) -> str:
    return (f"{source}: {what}, so no query has anything to find. Put each group's images in a sub-folder "
            f"(group/xxx.jpg or dataset/group/xxx.jpg), or give a manifest a '{group_column}' column; a collection "
            f"without groups can be evaluated with --from-edits 4 or with `cbir eval copies`")


DEFAULT_GALLERY_SIZES = (100, 1000, "all")


def _distractor_keys(distractors, vectors: "_Vectors", desc: str = "distractors") -> list[str]:
    """Embed a distractor tree (keys prefixed, so they never collide with the collection's) -> the usable keys."""
    if not distractors:
        return []
    items = list_collection(distractors)
    vectors.embed([file_job(item, DISTRACTOR_PREFIX + item.item_id) for item in items], desc)
    return [DISTRACTOR_PREFIX + item.item_id for item in items if DISTRACTOR_PREFIX + item.item_id in vectors.vectors]


def _at_gallery_sizes(core: list[str], extra: list[str], sizes, options: EvalOptions, vectors: "_Vectors",
                      scratch: pathlib.Path, evaluate) -> list[dict]:
    """The protocol (`evaluate(built) -> summary`) over nested galleries: `core` + seeded subsets of `extra`."""
    rows = []
    for label, count, ids in gallery_levels(core, extra, sizes, options.seed):
        built = BuiltIndex(scratch / f"gallery-{count}", ids, np.stack([vectors.vectors[k] for k in ids]),
                           vectors.info, options.index, vectors.local, vectors.regions)
        try:
            rows.append({"distractors": label, "distractor_count": count, "gallery": len(ids)} | evaluate(built))
        finally:
            built.close()
    return rows


def run_copies(source, options: EvalOptions, *, families: Sequence[str] | None = copies_module.FAMILIES,
               edits: Sequence[str] | None = None, distractors=None, originals: int | None = 100,
               labelled: bool = False, backgrounds=None, background_count: int = 50,
               gallery_sizes=DEFAULT_GALLERY_SIZES, embedding=None, max_images: int | None = None) -> dict:
    """Copy detection: per original one seeded copy per augly family (`families`), or per Pillow edit
    (`edits`, the older protocol), query a gallery of every image of SOURCE (the originals included)
    and the `distractors`.

    originals: a seeded sample of this many images of SOURCE (None: all). The overlay and collage
    families paste onto photos outside the gallery: `backgrounds` (a folder), or else
    `background_count` seeded images of SOURCE held out of the gallery. `labelled`: SOURCE is a
    labelled-groups folder; gallery images of an original's group are other views of it, left out of
    its ranking. `max_images`: the older name of `originals`. `embedding`: a LocalEmbedding or
    RemoteEmbedding to use instead of building one from `options.model`.
    """
    if edits is not None:
        names, mode = tuple(edits), "edits"
    else:
        names, mode = tuple(families or copies_module.FAMILIES), "families"
    if max_images is not None:
        originals = max_images
    pool = list_collection(source)
    chosen = sample(pool, originals, options.seed)
    chosen_ids = {item.item_id for item in chosen}
    rest = [item for item in pool if item.item_id not in chosen_ids]
    background_items: list = []
    needs_backgrounds = mode == "families" and any(n in copies_module.NEEDS_BACKGROUNDS for n in names)
    if mode == "families" and backgrounds:
        background_items = list_collection(backgrounds)
    elif needs_backgrounds:
        count = min(background_count, max(len(rest) // 2, min(3, len(rest) - 1)))  # most of a small pool stays
        background_items = sample(rest, count, options.seed + 1)
        held = {item.item_id for item in background_items}
        rest = [item for item in rest if item.item_id not in held]
    if needs_backgrounds and len(background_items) < 3:
        raise EvalError(f"the overlay and collage copies paste onto photos outside the gallery: {source} leaves "
                        f"{len(background_items)} of them (3 needed); give --backgrounds DIR, more images, or "
                        f"--families without overlay,collage")
    group_of: dict[str, str | None] = {}
    if labelled:
        group_of = groups_from_source(source).group_of
    vectors = _Vectors(options, embedding)
    vectors.embed([file_job(item) for item in chosen], "originals")
    vectors.embed([file_job(item) for item in rest], "gallery")
    distractor_keys = _distractor_keys(distractors, vectors)
    good = [item for item in chosen if item.item_id in vectors.vectors]
    if not good:
        raise EvalError(f"none of the {len(chosen)} images of {source} could be read; see the reasons above")
    params: dict[str, dict] = {}
    loaders = [background_loader(item) for item in background_items] if mode == "families" else None
    jobs, queries = copy_queries(good, names, options.seed, params, loaders)
    vectors.embed(jobs, "copies")
    queries = [q for q in queries if q[0] in vectors.vectors]
    core = [item.item_id for item in good]
    others = [item.item_id for item in rest if item.item_id in vectors.vectors] + distractor_keys
    ignore: dict[str, set[str]] = {}
    if labelled:
        members: dict[str, set[str]] = {}
        for key in core + others:
            if group_of.get(key):
                members.setdefault(group_of[key], set()).add(key)
        ignore = {key: members[group_of[key]] - {key} for key in core if group_of.get(key)}
    indexed = core + others
    result = _header("copies", source, options) | {
        "collection": {"mode": mode, "pool": len(pool), "originals": len(chosen), "usable": len(good),
                       "gallery_others": len(others) - len(distractor_keys), "distractors": len(distractor_keys),
                       "backgrounds": len(background_items), "indexed": len(indexed), "families": list(names),
                       "queries": len(queries), "labelled": labelled,
                       "ignored_views": sum(len(v) for v in ignore.values())},
        "rejects": _rejects(vectors.rejects),
        "warnings": [],
    }
    if not queries:
        raise EvalError("no copy could be made of any original; see the reasons above")
    with scratch_dir() as scratch:
        scratch = pathlib.Path(scratch)

        def evaluate(built, details=False):
            return evaluate_copies(built, vectors.vectors, queries, depth=options.depth, ignore=ignore,
                                   families=names, details=details)

        built = BuiltIndex(scratch / "bundle", indexed, np.stack([vectors.vectors[k] for k in indexed]),
                           vectors.info, options.index, vectors.local, vectors.regions)
        try:
            copies = evaluate(built, details=True)
            for row in copies["per_query"]:
                row["params"] = params.get(row["query"], {})
            result |= {"copies": copies, "index": _index_summary(built),
                       "ann": _ann(built, np.stack([vectors.vectors[q[0]] for q in queries]), options)}
        finally:
            built.close()
        sizes = [s for s in gallery_sizes if s != "all" and int(s) < len(others)]
        result["gallery_sizes"] = _at_gallery_sizes(
            core, others, sizes, options, vectors, scratch,
            lambda built: {k: v for k, v in evaluate(built).items() if k != "per_family"}) + [
            {"distractors": "all", "distractor_count": len(others), "gallery": len(indexed)}
            | {k: v for k, v in copies.items() if k not in ("per_family", "per_query")}]
    result["embedding"] = vectors.summary()
    vectors.close()
    return result


def run_groups(source, options: EvalOptions, *, from_edits: int = 0, group_column: str = "group",
               edits: Sequence[str] = edits_module.EDIT_NAMES, max_images: int | None = None, embedding=None,
               distractors=None, gallery_sizes=DEFAULT_GALLERY_SIZES) -> dict:
    """Labelled groups: every image of a group queries the rest of the collection and the distractors.

    `from_edits=N`: the collection has no groups; make each image and N-1 seeded edits of it a group.
    `distractors`: a folder (any tree) or manifest of images indexed too, never queried; the quality is
    also measured with seeded nested subsets of them (`gallery_sizes`: counts, or "all").
    `embedding`: as for `run_copies`.
    """
    warnings: list[str] = []
    params: dict[str, dict] = {}
    if from_edits:
        items = sample(list_collection(source), max_images, options.seed)
        if from_edits - 1 > len(edits):
            raise EvalError(f"groups of {from_edits} need {from_edits - 1} different edits, only {len(edits)} chosen")
        vectors = _Vectors(options, embedding)
        vectors.embed([file_job(item) for item in items], "originals")
        good = [item for item in items if item.item_id in vectors.vectors]
        if not good:
            raise EvalError(f"none of the {len(items)} images of {source} could be read; see the reasons above")
        groups = groups_from_edits(good, from_edits, edits, options.seed, params)
        vectors.embed(groups.jobs, "edited images")
        listed = len(items)
    else:
        if max_images:
            raise EvalError("--max-images applies to --from-edits only: a sample would break the groups")
        groups = groups_from_source(source, group_column)
        if not any(group is not None for group in groups.group_of.values()):
            raise EvalError(_no_groups_message(source, group_column, "no image has a group"))
        warnings += groups.warnings
        vectors = _Vectors(options, embedding)
        vectors.embed(groups.jobs, "images")
        listed = len(groups.keys)
    collection_keys = [key for key in groups.keys if key in vectors.vectors]
    if not collection_keys:
        raise EvalError(f"none of the {listed} images of {source} could be read; see the reasons above")
    distractor_keys = _distractor_keys(distractors, vectors)
    indexed = collection_keys + distractor_keys
    members, more = effective_groups(groups, set(collection_keys))
    warnings += more
    if not members:
        raise EvalError(_no_groups_message(source, group_column, "no group has two or more usable images"))
    datasets = sorted({groups.dataset_of.get(g, "") for g in members})
    result = _header("groups", source, options) | {
        "collection": {"images": listed, "indexed": len(indexed), "groups": len(members), "datasets": datasets,
                       "queries": sum(len(keys) for keys in members.values()),
                       "distractors": len(distractor_keys), "distractor_source": str(distractors or ""),
                       "from_edits": from_edits, "edits": list(edits) if from_edits else []},
        "rejects": _rejects(vectors.rejects),
        "warnings": warnings,
    }
    with scratch_dir() as scratch:
        scratch = pathlib.Path(scratch)

        def evaluate(built, details=False):
            return evaluate_groups(built, vectors.vectors, members, depth=options.depth,
                                   dataset_of=groups.dataset_of, details=details)

        built = BuiltIndex(scratch / "bundle", indexed, np.stack([vectors.vectors[k] for k in indexed]),
                           vectors.info, options.index, vectors.local, vectors.regions)
        try:
            evaluated = evaluate(built, details=True)
            queries = np.stack([vectors.vectors[key] for keys in members.values() for key in keys])
            result |= {"groups": evaluated, "index": _index_summary(built), "ann": _ann(built, queries, options)}
        finally:
            built.close()
        summary_keys = ("queries", "groups", "map", "map_stderr", "map_groups", "recall@1", "recall@5", "recall@10")
        if distractor_keys:
            sizes = [0] + [s for s in gallery_sizes if s != "all" and int(s) < len(distractor_keys)]
            result["gallery_sizes"] = _at_gallery_sizes(
                collection_keys, distractor_keys, sizes, options, vectors, scratch,
                lambda built: {k: v for k, v in evaluate(built).items() if k in summary_keys}) + [
                {"distractors": "all", "distractor_count": len(distractor_keys), "gallery": len(indexed)}
                | {k: evaluated[k] for k in summary_keys}]
        else:
            result["gallery_sizes"] = []
    result["embedding"] = vectors.summary()
    vectors.close()
    return result
