"""`cbir eval compare`: feature x pooling x PCA x metric x trees x search effort, both protocols.

Every image and query is embedded once per model (and cached on disk); every index variant is a
real bundle over those vectors, searched with the indexer's `SearchIndex`. The stages:

1. **models** — each model with the index as `cbir index build` makes it by default (angular,
   30 trees, no PCA); fc1 models also with the original system's index (manhattan, 30 trees);
2. **PCA** — each model with real weights with PCA to each dimension, plain and whitened (fitted
   on the indexed collection, as `cbir index build --pca N [--pca-whiten]` does);
3. **metric x trees** — the best model + PCA of stage 2 with each metric and number of trees;
4. **search effort** — the chosen configuration: recall@k of the index against exact search and
   the query latency at each search_k; copy detection per edit.

The choice: quality first — the mean of the two protocols' mAP — then, among configurations
within `tolerance` of the best, the fastest embedding, then the smallest index, then the fewest
trees. With `groups_source` (`--groups DIR`) the groups protocol runs on those labelled groups
(+ the distractors) and its quality is the group-weighted mAP; without it, groups are made from
edits of SOURCE (`groups_from_edits`), so both protocols share the vectors. Without SOURCE only the
labelled groups are compared.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import logging
import pathlib
from typing import Sequence

import numpy as np

from cbir.bundle import model_to_dict
from apps.eval import edits as edits_module
from apps.eval import metrics, report
from apps.eval.indexes import BuiltIndex, IndexSpec, ann_recall_rows
from apps.eval.embedding import Job, ModelSpec
from apps.eval.protocols import (
    DISTRACTOR_PREFIX,
    EvalError,
    Groups,
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
from apps.eval.run import EvalOptions, _rejects, _Vectors, default_search_ks

log = logging.getLogger(__name__)

ORIGINAL_INDEX = IndexSpec(metric="manhattan", trees=30)  # the seed system's Annoy index (with fc1, 4096-d)


@dataclasses.dataclass
class CompareOptions:
    models: Sequence[ModelSpec]
    pca_dims: Sequence[int] = (32, 64, 96)
    metrics: Sequence[str] = ("angular", "euclidean", "manhattan")
    trees: Sequence[int] = (10, 30, 100)
    search_ks: Sequence[int] | None = None
    group_size: int = 4
    edits: Sequence[str] = edits_module.EDIT_NAMES
    seed: int = 0
    depth: int = 100
    recall_k: int = 50
    tolerance: float = 0.002
    max_images: int | None = None
    cache_dir: pathlib.Path | None = None
    embedder_target: str | None = None
    progress: bool = True
    groups_source: pathlib.Path | None = None  # labelled groups (cbir eval groups' layouts) instead of edit groups


@dataclasses.dataclass
class ModelData:
    spec: ModelSpec
    info: object  # ModelInfo
    vectors: dict[str, np.ndarray]
    local: dict[str, tuple[bytes, ...]]  # an item's local features, then a query's and its mirror's
    regions: dict[str, np.ndarray]
    ms_per_image: float | None
    originals: list[str]
    distractors: list[str]
    queries: list[tuple[str, str, str]]
    group_members: dict[str, list[str]]
    group_keys: list[str]
    dataset_of: dict[str, str] = dataclasses.field(default_factory=dict)
    labelled: bool = False


def _embed_model(spec: ModelSpec, items, distractor_items, options: CompareOptions, rejects: dict) -> ModelData:
    eval_options = EvalOptions(model=spec, seed=options.seed, cache_dir=options.cache_dir,
                               embedder_target=options.embedder_target, progress=options.progress)
    vectors = _Vectors(eval_options)
    label = spec.label
    vectors.embed([file_job(item) for item in items], f"{label}: originals")
    vectors.embed([file_job(d, DISTRACTOR_PREFIX + d.item_id) for d in distractor_items], f"{label}: distractors")
    good = [item for item in items if item.item_id in vectors.vectors]
    jobs, queries = copy_queries(good, options.edits, options.seed, {})
    vectors.embed(jobs, f"{label}: edited queries")
    if options.groups_source is not None:
        groups = _prefixed(groups_from_source(options.groups_source), "groups:")  # never a key of SOURCE's
        vectors.embed(groups.jobs, f"{label}: labelled groups")
    else:
        groups = groups_from_edits(good, options.group_size, options.edits, options.seed)
        vectors.embed(groups.jobs, f"{label}: groups")  # all already embedded above: same keys, same bytes
    rejects.update(vectors.rejects)
    group_keys = [key for key in groups.keys if key in vectors.vectors]
    members, _ = effective_groups(groups, set(group_keys))
    summary = vectors.summary()
    data = ModelData(
        spec=spec, info=vectors.info, vectors=vectors.vectors, local=vectors.local, regions=vectors.regions, ms_per_image=summary["ms_per_image"],
        originals=[item.item_id for item in good],
        distractors=[DISTRACTOR_PREFIX + d.item_id for d in distractor_items if DISTRACTOR_PREFIX + d.item_id in vectors.vectors],
        queries=[q for q in queries if q[0] in vectors.vectors], group_members=members, group_keys=group_keys,
        dataset_of=groups.dataset_of, labelled=options.groups_source is not None,
    )
    vectors.close()
    return data


def _prefixed(groups: Groups, prefix: str) -> Groups:
    return Groups([prefix + k for k in groups.keys], {prefix + k: g for k, g in groups.group_of.items()},
                  [Job(prefix + job.key, job.load, job.query) for job in groups.jobs], groups.warnings, groups.dataset_of)


def _release_model() -> None:
    try:
        import keras

        keras.backend.clear_session()
    except Exception:  # pragma: no cover - best effort
        pass
    gc.collect()


def evaluate_config(data: ModelData, spec: IndexSpec, scratch: pathlib.Path, options: CompareOptions,
                    *, ann: bool = False) -> dict:
    """Both protocols on one model + index configuration (two real bundles)."""
    row: dict = {"model": data.spec.label, "fingerprint": data.info.fingerprint, "pooling": data.info.pooling,
                 "feature": data.spec.feature, "weights": data.spec.weights, "input_dimension": int(data.info.dimension),
                 "index": dataclasses.asdict(spec), "index_label": spec.label, "ms_per_image": data.ms_per_image,
                 "relative_cost": sum(scale * scale for scale in data.spec.scales)}
    copies_ids = data.originals + data.distractors
    groups_ids = data.group_keys + data.distractors
    for name, ids in (("copies", copies_ids if data.queries else []), ("groups", groups_ids)):
        if ids and spec.pca and spec.pca > len(ids):
            row["skipped"] = f"PCA {spec.pca} needs at least {spec.pca} indexed images ({name}: {len(ids)})"
            return row
    folder = scratch / f"{len(list(scratch.iterdir()))}"
    row["index_bytes_per_item"] = 0.0
    if data.queries:
        _copies_part(row, data, spec, folder, copies_ids, options, ann)
    built = BuiltIndex(folder / "groups", groups_ids, np.stack([data.vectors[k] for k in groups_ids]), data.info, spec, data.local, data.regions)
    try:
        groups = evaluate_groups(built, data.vectors, data.group_members, depth=options.depth,
                                 dataset_of=data.dataset_of)
        row["groups"] = {key: value for key, value in groups.items() if key not in ("per_query", "per_group")}
        row["groups_ap"] = [round(r["ap"], 6) for r in groups["per_query"]]
        row["groups_clusters"] = [r["group"] for r in groups["per_query"]]
        row["query_p50_ms"] = groups["query_p50_ms"]
        row["groups_index_bytes"] = built.index_bytes
        row["dimension"] = built.bundle.manifest.index_dimension
        row["index_bytes_per_item"] = max(row["index_bytes_per_item"], built.index_bytes / built.item_count)
        if ann:
            queries = np.stack([data.vectors[key] for keys in data.group_members.values() for key in keys])
            row["groups_ann"] = ann_recall_rows(
                built, queries, k=options.recall_k,
                search_ks=options.search_ks or default_search_ks(spec.trees, options.recall_k))
    finally:
        built.close()
    # labelled groups: every group counts once (most groups hold 2 images, a few 10-14)
    groups_quality = row["groups"]["map_groups"] if data.labelled else row["groups"]["map"]
    row["quality"] = groups_quality if "copies" not in row else (groups_quality + row["copies"]["map"]) / 2
    return row


def _copies_part(row, data, spec, folder, copies_ids, options, ann) -> None:
    built = BuiltIndex(folder / "copies", copies_ids, np.stack([data.vectors[k] for k in copies_ids]), data.info, spec, data.local, data.regions)
    try:
        copies = evaluate_copies(built, data.vectors, data.queries, depth=options.depth, families=options.edits)
        row["copies"] = {key: value for key, value in copies.items() if key != "per_query"}
        row["copies_ap"] = [round(r["ap"], 6) for r in copies["per_query"]]  # for paired comparisons
        row["copies_index_bytes"] = built.index_bytes
        row["dimension"] = built.bundle.manifest.index_dimension
        if ann:
            row["copies_ann"] = ann_recall_rows(
                built, np.stack([data.vectors[q[0]] for q in data.queries]), k=options.recall_k,
                search_ks=options.search_ks or default_search_ks(spec.trees, options.recall_k))
            row["copies_per_query"] = copies["per_query"]
        row["index_bytes_per_item"] = built.index_bytes / built.item_count
    finally:
        built.close()


def _key(row: dict, best: float, tolerance: float):
    """Sort key of the choice: within tolerance of the best quality first, then cheaper, then better.

    The embedding cost is the pixels VGG-16 processes per image relative to one 224x224 pass
    (sum of squared scales): the measured ms/image of models with the same network differ only by
    the noise of a shared machine.
    """
    # Trees come before size: on a collection this small Annoy searches (nearly) exhaustively, so fewer
    # trees look free here; their cost in recall shows only at scale (see the index-recall tables).
    return (row["quality"] < best - tolerance, row["relative_cost"], row["index"]["trees"] != IndexSpec().trees,
            row["index_bytes_per_item"], -row["quality"])


def choose(rows: list[dict], tolerance: float) -> dict:
    usable = [r for r in rows if "quality" in r and r["weights"] != "random"] or [r for r in rows if "quality" in r]
    if not usable:
        raise EvalError("no configuration could be evaluated")
    best = max(r["quality"] for r in usable)
    return min(usable, key=lambda r: _key(r, best, tolerance))


def _pca_models(models: list[ModelData]) -> list[ModelData]:
    """The models of the PCA stage: those with real weights (random weights are reference rows only: a
    PCA of meaningless vectors says nothing, and fc1's 4096x4096 eigendecomposition costs ~1 min per
    variant on 2 cores). With no real weights at all (tests, smoke runs): the conv models."""
    real = [m for m in models if m.spec.weights != "random"]
    return real or [m for m in models if m.spec.feature == "gem"]


def run_compare(source, options: CompareOptions, distractors=None) -> dict:
    if source is None and options.groups_source is None:
        raise EvalError("nothing to compare on: give a collection (SOURCE) and/or labelled groups (--groups DIR)")
    items = sample(list_collection(source), options.max_images, options.seed) if source is not None else []
    warnings = []
    if source is not None and options.groups_source is None and pathlib.Path(source).is_dir() and \
            any("/" in item.item_id for item in items):
        warnings.append(f"{source} has sub-folders, but its groups are NOT used: the groups protocol is made of "
                        f"edits of its images; pass --groups {source} to compare on the labelled groups")
    distractor_items = list_collection(distractors) if distractors else []
    rejects: dict[str, str] = {}
    skipped: dict[str, str] = {}
    models: list[ModelData] = []
    for spec in options.models:
        try:
            models.append(_embed_model(spec, items, distractor_items, options, rejects))
        except Exception as error:  # WeightsError (fc1 without the full weights), a model that cannot load
            log.warning("skipping model %s: %s", spec.label, error)
            skipped[spec.label] = f"{type(error).__name__}: {error}"
        finally:
            _release_model()
    if not models:
        raise EvalError("no model could be loaded: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))

    result: dict = {
        "created_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "source": str(source), "seed": options.seed, "depth": options.depth, "recall_k": options.recall_k,
        "edits": list(options.edits), "group_size": options.group_size,
        "collection": {"images": len(items), "distractors": len(distractor_items)},
        "models": [{"spec": m.spec.label, "model": model_to_dict(m.info), "ms_per_image": m.ms_per_image,
                    "originals": len(m.originals), "queries": len(m.queries),
                    "groups": len(m.group_members), "group_images": len(m.group_keys)} for m in models],
        "skipped_models": skipped,
        "rejects": _rejects(rejects),
        "warnings": warnings,
        "groups_source": str(options.groups_source or ""),
    }
    base = IndexSpec()
    with scratch_dir() as scratch_name:
        scratch = pathlib.Path(scratch_name)
        stage1 = []
        for data in models:
            stage1.append(evaluate_config(data, base, scratch, options))
            if data.spec.feature == "fc1":
                stage1.append(evaluate_config(data, ORIGINAL_INDEX, scratch, options))
        result["stage_models"] = stage1

        stage2 = []
        for data in _pca_models(models):
            for dim in options.pca_dims:
                for whiten in (False, True):
                    stage2.append(evaluate_config(data, dataclasses.replace(base, pca=dim, whiten=whiten), scratch, options))
        result["stage_pca"] = stage2

        candidates = [r for r in stage1 + stage2 if "quality" in r]
        best = choose(candidates, options.tolerance)
        best_model = next(m for m in models if m.spec.label == best["model"])
        best_index = IndexSpec(**best["index"])
        stage3 = []
        for metric in options.metrics:
            for trees in options.trees:
                spec = dataclasses.replace(best_index, metric=metric, trees=trees)
                stage3.append(evaluate_config(best_model, spec, scratch, options))
        result["stage_metric_trees"] = stage3

        chosen = choose(candidates + stage3, options.tolerance)
        chosen_model = next(m for m in models if m.spec.label == chosen["model"])
        final = evaluate_config(chosen_model, IndexSpec(**chosen["index"]), scratch, options, ann=True)
        result["chosen"] = final
        original = [m for m in models if m.spec.feature == "fc1"]
        if original:
            result["original"] = evaluate_config(original[0], ORIGINAL_INDEX, scratch, options, ann=True)
    result["rule"] = (f"quality = mean of groups mAP and copy-detection mAP; among configurations within "
                      f"{options.tolerance} of the best (real weights only), the cheapest embedding (pixels through VGG-16), "
                      f"then the default number of trees (30: fewer trees cannot be judged on a small collection), "
                      f"then the smallest index per item")
    return result


# ------------------------------------------------------------------------------------- tables


def paired_delta(row: dict, baseline: dict) -> tuple[float, float] | None:
    """Quality difference to `baseline` over the same queries, and its standard error (paired per query):
    the mean of the two protocols' per-query AP differences."""
    if "quality" not in row or "quality" not in baseline or len(row["groups_ap"]) != len(baseline["groups_ap"]) \
            or len(row.get("copies_ap", [])) != len(baseline.get("copies_ap", [])):
        return None
    groups = np.subtract(row["groups_ap"], baseline["groups_ap"])
    if not row.get("copies_ap"):
        return float(groups.mean()), metrics.stderr(groups)
    copies = np.subtract(row["copies_ap"], baseline["copies_ap"])
    delta = (groups.mean() + copies.mean()) / 2
    se = np.sqrt(metrics.stderr(groups) ** 2 + metrics.stderr(copies) ** 2) / 2
    return float(delta), float(se)


def baseline_row(result: dict) -> dict | None:
    """The configuration `cbir index build` shipped before this comparison: gem p=3, one scale, angular,
    30 trees, no PCA (the first such row with real weights)."""
    for r in result["stage_models"]:
        if (r["pooling"] == "gem(p=3)" and r["index"] == dataclasses.asdict(IndexSpec()) and r["weights"] != "random"
                and "quality" in r):
            return r
    return None


def _quality_row(r: dict, baseline: dict | None = None) -> list:
    if "skipped" in r:
        return [r["model"], r["index_label"]] + [None] * 12
    delta = paired_delta(r, baseline) if baseline else None
    copies = r.get("copies", {})
    return [r["model"], r["index_label"], r.get("dimension"),
            None if delta is None else f"{delta[0]:+.3f} ± {2 * delta[1]:.3f}",
            r["groups"]["map"], r["groups"]["map_groups"], r["groups"]["recall@1"],
            r["groups"]["recall@10"], r["groups"]["ns"], copies.get("recall@1"), copies.get("recall@10"),
            copies.get("map"), f"{r['relative_cost']:.1f}x",
            "cached" if r["ms_per_image"] is None else round(r["ms_per_image"])]


QUALITY_HEADERS = ["model [weights]", "index", "dim", "Δ quality ± 2 SE", "groups mAP", "groups mAP (gw)", "groups R@1",
                   "groups R@10", "N-S",
                   "copies R@1", "copies R@10", "copies mAP", "VGG cost", "embed ms/img"]


def tables(result: dict) -> str:
    """The Markdown tables of a comparison (what BENCHMARKS.md shows)."""
    out = [f"warning: {w}" for w in result.get("warnings", [])]
    chosen = result["chosen"]
    base = baseline_row(result)
    if result["skipped_models"]:
        out.append("Skipped models (the JSON report has the full messages):\n" + "\n".join(
            f"- {k}: {v.splitlines()[0]}" for k, v in result["skipped_models"].items()))
    out.append("### Models (index: angular, 30 trees, no PCA; fc1 also with the original manhattan index)\n\n"
               + report.table(QUALITY_HEADERS, [_quality_row(r, base) for r in result["stage_models"]]))
    out.append("### PCA (fitted on the indexed collection), angular, 30 trees\n\n"
               + report.table(QUALITY_HEADERS, [_quality_row(r, base) for r in result["stage_pca"]]))
    rows = result["stage_metric_trees"]
    out.append("### Metric x trees (best model + PCA of the stages above)\n\n" + report.table(
        ["model [weights]", "index", "groups mAP", "copies R@1", "copies mAP", "index bytes/item", "query p50 ms"],
        [[r["model"], r["index_label"], r["groups"]["map"], r.get("copies", {}).get("recall@1"),
          r.get("copies", {}).get("map"),
          round(r["index_bytes_per_item"]), r["query_p50_ms"]] for r in rows if "quality" in r]))
    out.append(f"### Best trade-off on this collection: {chosen['model']}, {chosen['index_label']}\n\n"
               f"Rule: {result['rule']}.\n\n"
               + report.table(QUALITY_HEADERS, [_quality_row(chosen, base)])
               + f"\n\nUKBench N-S of the groups: {chosen['groups']['ns']:.2f} of {chosen['groups']['ns_max']:.2f}")
    if "copies" in chosen:
        out.append("#### Copy detection per edit (best trade-off)\n\n" + report.copies_table(chosen["copies"]))
        out.append(f"#### Index against exact search (best trade-off; copy-detection queries, "
                   f"{chosen['copies_ann'][0]['k']}-NN over {chosen['copies']['queries']} queries)\n\n"
                   + report.ann_table(chosen["copies_ann"]))
    if chosen["groups"].get("per_dataset"):
        out.append("#### Groups per dataset (best trade-off)\n\n" + report.datasets_table(chosen["groups"]))
    out.append(f"#### Index against exact search (best trade-off; groups collection, every image a query)\n\n"
               + report.ann_table(chosen["groups_ann"]))
    if "original" in result:
        original = result["original"]
        text = (f"### Original setup: {original['model']}, {original['index_label']}\n\n"
                + report.table(QUALITY_HEADERS, [_quality_row(original, base)]))
        if "copies" in original:
            text += "\n\n" + report.copies_table(original["copies"]) + "\n\n" + report.ann_table(original["copies_ann"])
        out.append(text)
    per_edit_rows = []
    for r in result["stage_models"]:
        if "copies" in r:
            per_edit_rows.append([r["model"], r["index_label"]] + [r["copies"]["per_family"].get(e, {}).get("recall@1")
                                                                   for e in result["edits"]])
    if per_edit_rows:
        out.append("### Copy detection recall@1 per edit, per model\n\n"
                   + report.table(["model [weights]", "index"] + list(result["edits"]), per_edit_rows))
    return "\n\n".join(out) + "\n"
