"""The duplicate finder at scale: `cbir duplicates` over a bundle of N synthetic vectors with planted pairs.

N clustered, L2-normalised 512-d vectors like GeM features (`_common.write_clustered_npy`), in which
`--pairs` rows are overwritten with a near copy of another row: half at cosine 0.99 (what the indexer
calls the same image, >= 0.97), half at 0.96 (a copy, unverified: >= 0.95). The bundle is built with
`cbir index build-from-features` (Annoy, 30 trees, angular), then `cbir duplicates BUNDLE --json` runs as a
child process under GNU time (its tqdm bar, with items/s, on this terminal): wall time, peak RSS, and
the planted pairs it found (recall) against the pairs it found that were not planted. Synthetic vectors
have no images: no local features, no PDQ (`--no-pdq`), so pairs are judged on the global score.

    nice -n 19 .venv/bin/python benchmarks/duplicates_scale.py --items 1000000 --workdir /tmp/cbir-dupscale

Results also go to WORKDIR/duplicates-scale-N.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import PYTHON, ROOT, folder_bytes, mib, write_clustered_npy, write_ids  # noqa: E402

DIMENSION = 512
COSINES = (0.99, 0.96)  # the planted pairs: half of each


def plant(vectors: np.ndarray, pairs: int, seed: int) -> list[tuple[int, int, float]]:
    """Overwrite `pairs` rows with near copies of other rows, in place: (original row, copy row, cosine)."""
    rng = np.random.default_rng(seed + 7)
    rows = rng.choice(len(vectors), size=2 * pairs, replace=False)
    planted = []
    for n, (original, copy) in enumerate(zip(rows[:pairs], rows[pairs:])):
        cosine = COSINES[n % len(COSINES)]
        x = np.asarray(vectors[original], dtype=np.float64)
        noise = rng.standard_normal(len(x))
        noise -= (noise @ x) * x  # orthogonal to x: the copy's cosine is exactly `cosine`
        vectors[copy] = (cosine * x + np.sqrt(1 - cosine ** 2) * noise / np.linalg.norm(noise)).astype(np.float32)
        planted.append((int(original), int(copy), cosine))
    return planted


def timed(command: list[str], log: pathlib.Path) -> dict:
    """Run under GNU time -v (its report to a file; the command's own output stays on this terminal)."""
    import subprocess

    report = log.with_suffix(".time")
    started = time.perf_counter()
    code = subprocess.call(["/usr/bin/time", "-v", "-o", str(report), *command], cwd=ROOT)
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code})")
    stats = {"seconds": seconds}
    for line in report.read_text().splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key == "Maximum resident set size (kbytes)":
            stats["max_rss"] = int(value) * 1024
        elif key in ("User time (seconds)", "System time (seconds)"):
            stats[key.split()[0].lower() + "_s"] = float(value)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--pairs", type=int, default=1000, help="planted near-duplicate pairs")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/cbir-dupscale"))
    parser.add_argument("--workers", type=int, default=2, help="`cbir duplicates --workers`")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--duplicates-args", default="", help="more `cbir duplicates` options, e.g. '--k 5'")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    n = args.items
    vectors_path, ids_path, model_path = work / f"vectors-{n}.npy", work / f"ids-{n}.txt", work / "model.json"
    bundle = work / f"bundle-{n}"
    truth_path = work / f"planted-{n}.json"
    result: dict = {"items": n, "pairs_planted": args.pairs, "workers": args.workers}

    if not bundle.exists():
        started = time.perf_counter()
        write_clustered_npy(vectors_path, n, DIMENSION, seed=args.seed)
        vectors = np.load(vectors_path, mmap_mode="r+")
        planted = plant(vectors, args.pairs, args.seed)
        vectors.flush()
        del vectors
        write_ids(ids_path, n)
        truth_path.write_text(json.dumps(planted))
        model_path.write_text(json.dumps({"name": "synthetic", "feature": "gem", "dimension": DIMENSION,
                                          "fingerprint": f"synthetic-{DIMENSION}"}))
        print(f"wrote {n:,} vectors with {args.pairs} planted pairs in {time.perf_counter() - started:.0f} s")
        result["build"] = timed([PYTHON, "-m", "apps", "index", "build-from-features", str(vectors_path),
                                 "--ids", str(ids_path), "--model-info", str(model_path), "--out", str(bundle)],
                                work / "build.log")
        vectors_path.unlink()
        print(f"built the bundle in {result['build']['seconds']:.0f} s, peak RSS {mib(result['build']['max_rss'])}")
    planted = [(f"img{a:08d}", f"img{b:08d}", c) for a, b, c in json.loads(truth_path.read_text())]
    version = next(p for p in bundle.iterdir() if p.is_dir() and not p.name.startswith("."))
    result["bundle_mib"] = {name: round(size / 2**20, 1) for name, size in folder_bytes(version).items()}

    out = work / f"duplicates-{n}.json"
    command = [PYTHON, "-m", "apps", "duplicates", str(bundle), "--json", "--out", str(out), "--no-pdq",
               "--workers", str(args.workers), *args.duplicates_args.split()]
    result["command"] = " ".join(["cbir", *command[3:]])
    result["duplicates"] = timed(command, work / "duplicates.log")
    found = json.loads(out.read_text())
    pairs = {frozenset(p[:2]) for g in found["groups"] for p in g["pairs"]}
    hits = {cosine: sum(frozenset((a, b)) in pairs for a, b, c in planted if c == cosine) for cosine in COSINES}
    planted_set = {frozenset((a, b)) for a, b, _ in planted}
    result["summary"] = found["summary"]
    result["recall"] = {f"cos {c}": hits[c] / sum(1 for *_, x in planted if x == c) for c in COSINES}
    result["pairs_found"] = len(pairs)
    result["not_planted"] = len(pairs - planted_set)
    (work / f"duplicates-scale-{n}.json").write_text(json.dumps(result, indent=2) + "\n")
    d = result["duplicates"]
    print(f"{n:,} items: cbir duplicates in {d['seconds'] / 60:.1f} min ({n / d['seconds']:.0f} items/s), "
          f"peak RSS {mib(d['max_rss'])}; planted pairs found {result['recall']}, "
          f"{result['not_planted']} other pairs")


if __name__ == "__main__":
    main()
