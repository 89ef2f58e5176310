"""`cbir index build`: list the collection, read and decode images in parallel, embed them in
batches, keep every vector with its id in resumable shards, then write an index bundle.

Bad images never stop a build: they go to the rejects file with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

import numpy as np
from tqdm import tqdm

from cbir.bundle import write_bundle
from cbir.errors import BadImage
from cbir.ingest.fetch import FetchError, read_bytes
from cbir.ingest.pipeline import chunked, ordered_map
from cbir.ingest.shards import ShardStore
from cbir.ingest.sources import SourceError, SourceItem, list_source

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildOptions:
    metric: str = "angular"
    trees: int = 30
    pca_dimension: int = 0
    pca_whiten: bool = False
    batch_size: int = 32
    read_workers: int = 4
    shard_size: int = 1024
    max_image_bytes: int = 32 * 1024 * 1024
    fetch_timeout_s: float = 20.0
    progress: bool = True


@dataclasses.dataclass
class BuildResult:
    bundle: pathlib.Path
    items: int
    rejected: int
    rejects_file: pathlib.Path
    seconds: float

    @property
    def images_per_second(self) -> float:
        return (self.items + self.rejected) / self.seconds if self.seconds else 0.0


def build_index(source, out: pathlib.Path, embedding, options: BuildOptions = BuildOptions()) -> BuildResult:
    """Build a new bundle version under `out` from `source` with `embedding` (Local/RemoteEmbedding)."""
    started = time.perf_counter()
    out = pathlib.Path(out)
    items = list_source(source)
    if not items:
        raise SourceError(f"{source}: no images found")
    store = ShardStore(out / ".work" / embedding.info.fingerprint, options.shard_size)
    vectors, rejects = store.load()
    todo = [item for item in items if item.item_id not in vectors and item.item_id not in rejects]
    if len(todo) < len(items):
        log.info("resuming: %d of %d items already embedded or rejected", len(items) - len(todo), len(items))

    with tqdm(total=len(items), initial=len(items) - len(todo), unit="img", desc="embedding",
              disable=not options.progress, dynamic_ncols=True) as bar:
        for item, vector, reason in _embed_all(todo, embedding, options):
            if reason is None:
                vectors[item.item_id] = vector
                store.add(item.item_id, vector)
            else:
                rejects[item.item_id] = reason
                store.add_reject(item.item_id, reason)
            bar.update(1)
    store.flush()

    kept = [item for item in items if item.item_id in vectors]
    rejects_file = _write_rejects(out, items, rejects)
    if not kept:
        raise SourceError(f"none of the {len(items)} images could be embedded; see {rejects_file}")
    bundle = write_bundle(
        out,
        ids=[item.item_id for item in kept],
        urls=[item.url for item in kept],
        metadata=[item.metadata for item in kept],
        vectors=np.stack([vectors[item.item_id] for item in kept]).astype(np.float32),
        model=embedding.info,
        metric=options.metric,
        trees=options.trees,
        pca_dimension=options.pca_dimension,
        pca_whiten=options.pca_whiten,
        source=str(source),
    )
    store.remove()
    return BuildResult(bundle, len(kept), len(items) - len(kept), rejects_file, time.perf_counter() - started)


def _embed_all(items: list[SourceItem], embedding, options: BuildOptions):
    """Yield (item, vector, None) or (item, None, reason) for every item, in order."""

    def prepare(item: SourceItem):
        try:
            data = read_bytes(item, max_bytes=options.max_image_bytes, timeout_s=options.fetch_timeout_s)
            return item, embedding.prepare(data), None
        except (FetchError, BadImage) as error:
            return item, None, str(error)

    def embed(batch):
        good = [(item, payload) for item, payload, reason in batch if reason is None]
        results = iter(embedding.embed([payload for _, payload in good]) if good else [])
        out = []
        for item, payload, reason in batch:
            if reason is None:
                result = next(results)
                reason = result if isinstance(result, str) else None
                out.append((item, None if reason else result, reason))
            else:
                out.append((item, None, reason))
        return out

    prepared = ordered_map(prepare, items, workers=options.read_workers, lookahead=4 * options.batch_size)
    batches = chunked(prepared, options.batch_size)
    lanes = embedding.parallel_batches
    for results in ordered_map(embed, batches, workers=lanes, lookahead=lanes + 1):
        yield from results


def _write_rejects(out: pathlib.Path, items: list[SourceItem], rejects: dict[str, str]) -> pathlib.Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "rejects.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for item in items:
            if item.item_id in rejects:
                record = {"item_id": item.item_id, "location": item.location, "reason": rejects[item.item_id]}
                handle.write(json.dumps(record) + "\n")
    return path
