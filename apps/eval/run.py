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
from apps.eval import edits as edits_module
from apps.eval.embedding import Embedded, ModelSpec, VectorCache, embed_jobs, make_embedding
from apps.eval.indexes import BuiltIndex, IndexSpec, ann_recall_rows
from apps.eval.protocols import (
    DISTRACTOR_PREFIX,
    EvalError,
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
        self.cache = VectorCache(options.cache_dir, self.info.fingerprint) if options.cache_dir else None
        self.vectors: dict[str, np.ndarray] = {}
        self.rejects: dict[str, str] = {}
        self.embedded = 0
        self.model_seconds = 0.0

    def embed(self, jobs, desc: str) -> Embedded:
        jobs = [job for job in jobs if job.key not in self.vectors and job.key not in self.rejects]
        result = embed_jobs(jobs, self.embedding, cache=self.cache, batch_size=self.options.batch_size,
                            progress=self.options.progress, desc=desc)
        self.vectors.update(result.vectors)
        self.rejects.update(result.rejects)
        self.embedded += result.embedded
        self.model_seconds += result.model_seconds
        return result

    def close(self) -> None:
        """Close the embedder service's channel (when this object opened it)."""
        if self._own and hasattr(self.embedding, "close"):
            self.embedding.close()

    def summary(self) -> dict:
        return {
            "model": model_to_dict(self.info),
            "embedded_now": self.embedded,
            "ms_per_image": 1000.0 * self.model_seconds / self.embedded if self.embedded else (
                self.cache.ms_per_image if self.cache else None),
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
            f"(group/xxx.jpg), or give a manifest a '{group_column}' column; a collection without groups can be "
            f"evaluated with --from-edits 4 or with `cbir eval copies`")


def run_copies(source, options: EvalOptions, *, edits: Sequence[str] = edits_module.EDIT_NAMES,
               distractors=None, max_images: int | None = None, embedding=None) -> dict:
    """Copy detection: edited copies of the collection's images query an index of the originals.

    `embedding`: a `apps.ingest.embedding` Local/RemoteEmbedding to use instead of building one
    from `options.model`.
    """
    items = sample(list_collection(source), max_images, options.seed)
    distractor_items = list_collection(distractors) if distractors else []
    vectors = _Vectors(options, embedding)
    vectors.embed([file_job(item) for item in items], "originals")
    vectors.embed([file_job(item, DISTRACTOR_PREFIX + item.item_id) for item in distractor_items], "distractors")
    good = [item for item in items if item.item_id in vectors.vectors]
    if not good:
        raise EvalError(f"none of the {len(items)} images of {source} could be read; see the reasons above")
    params: dict[str, dict] = {}
    jobs, queries = copy_queries(good, edits, options.seed, params)
    vectors.embed(jobs, "edited queries")
    queries = [q for q in queries if q[0] in vectors.vectors]
    indexed = [item.item_id for item in good] + [DISTRACTOR_PREFIX + d.item_id for d in distractor_items
                                                 if DISTRACTOR_PREFIX + d.item_id in vectors.vectors]
    result = _header("copies", source, options) | {
        "collection": {"images": len(items), "usable": len(good), "distractors": len(indexed) - len(good),
                       "indexed": len(indexed), "edits": list(edits), "queries": len(queries)},
        "rejects": _rejects(vectors.rejects),
        "warnings": [],
    }
    with scratch_dir() as scratch:
        built = BuiltIndex(pathlib.Path(scratch) / "bundle", indexed, np.stack([vectors.vectors[k] for k in indexed]),
                           vectors.info, options.index)
        try:
            copies = evaluate_copies(built, vectors.vectors, queries, depth=options.depth)
            for row in copies["per_query"]:
                row["params"] = params.get(row["query"], {})
            result |= {"copies": copies, "index": _index_summary(built),
                       "ann": _ann(built, np.stack([vectors.vectors[q[0]] for q in queries]), options)}
        finally:
            built.close()
    result["embedding"] = vectors.summary()
    vectors.close()
    return result


def run_groups(source, options: EvalOptions, *, from_edits: int = 0, group_column: str = "group",
               edits: Sequence[str] = edits_module.EDIT_NAMES, max_images: int | None = None, embedding=None) -> dict:
    """Labelled groups: every image of a group queries the rest of the collection.

    `from_edits=N`: the collection has no groups; make each image and N-1 seeded edits of it a group.
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
    indexed = [key for key in groups.keys if key in vectors.vectors]
    if not indexed:
        raise EvalError(f"none of the {listed} images of {source} could be read; see the reasons above")
    members, more = effective_groups(groups, set(indexed))
    warnings += more
    if not members:
        raise EvalError(_no_groups_message(source, group_column, "no group has two or more usable images"))
    result = _header("groups", source, options) | {
        "collection": {"images": listed, "indexed": len(indexed), "groups": len(members),
                       "queries": sum(len(keys) for keys in members.values()),
                       "from_edits": from_edits, "edits": list(edits) if from_edits else []},
        "rejects": _rejects(vectors.rejects),
        "warnings": warnings,
    }
    with scratch_dir() as scratch:
        built = BuiltIndex(pathlib.Path(scratch) / "bundle", indexed, np.stack([vectors.vectors[k] for k in indexed]),
                           vectors.info, options.index)
        try:
            evaluated = evaluate_groups(built, vectors.vectors, members, depth=options.depth)
            queries = np.stack([vectors.vectors[key] for keys in members.values() for key in keys])
            result |= {"groups": evaluated, "index": _index_summary(built), "ann": _ann(built, queries, options)}
        finally:
            built.close()
    result["embedding"] = vectors.summary()
    vectors.close()
    return result
