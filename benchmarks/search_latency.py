"""Search latency through a running stack, side by side with the embedder alone.

For each image: one `Embed` call straight to the embedder, one `SearchByImage` through the
gateway (embedder + indexer + two more gRPC hops), interleaved so both see the same machine load.
Prints p50/p95 of each and the ratio gateway/embedder (the query path's overhead).

Usage (with `./scripts/demo.sh` running):
  .venv/bin/python benchmarks/search_latency.py --images demo/photos --rounds 2
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import grpc

from cbir.client import GatewayClient
from cbir.v1 import embedder_pb2, embedder_pb2_grpc


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default="127.0.0.1:50050")
    parser.add_argument("--embedder", default="127.0.0.1:50051")
    parser.add_argument("--images", type=pathlib.Path, default=pathlib.Path("demo/photos"))
    parser.add_argument("--rounds", type=int, default=1, help="passes over the images")
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()

    images = [p.read_bytes() for p in sorted(args.images.glob("*.jpg"))]
    channel = grpc.insecure_channel(args.embedder, options=[("grpc.max_send_message_length", 64 << 20)])
    embedder = embedder_pb2_grpc.EmbedderStub(channel)
    embed_ms, search_ms, index_ms = [], [], []
    with GatewayClient(args.gateway) as gateway:
        gateway.search_image(images[0], k=args.k)  # one warm-up call each
        embedder.Embed(embedder_pb2.EmbedRequest(images=[images[0]]))
        for _ in range(args.rounds):
            for data in images:
                start = time.perf_counter()
                embedder.Embed(embedder_pb2.EmbedRequest(images=[data]), timeout=60)
                embed_ms.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                response = gateway.search_image(data, k=args.k)
                search_ms.append((time.perf_counter() - start) * 1000)
                index_ms.append(response.timings.index_ms)
    channel.close()
    print(f"{len(search_ms)} searches of {len(images)} images (k={args.k}), one at a time")
    print(f"{'':28}{'p50 ms':>9}{'p95 ms':>9}")
    for name, values in [("embedder Embed (direct)", embed_ms), ("gateway SearchByImage", search_ms),
                         ("  of which indexer query", index_ms)]:
        print(f"{name:28}{statistics.median(values):9.1f}{percentile(values, 0.95):9.1f}")
    print(f"ratio gateway / embedder (p50): {statistics.median(search_ms) / statistics.median(embed_ms):.3f}")


if __name__ == "__main__":
    main()
