"""`cbir index build`: list the collection, read and decode images in parallel, embed them in
batches, keep every vector with its id in resumable shards, then write an index bundle.

With `pdqhash` installed (`cbir[pdq]`), every image's PDQ hashes are made where it is read and stored
in the bundle (`pdq.npy`), for the duplicate finder.

Bad images never stop a build: they go to the rejects file with the reason. Failures that may pass
(a download that timed out, HTTP 503) are reported there too but not remembered, so the next run
tries them again; permanent ones (not an image, HTTP 404, too large) are remembered in the shards.

Exactly once: the shards map item ids to vectors, so a build killed at any point (kill -9) and
started again embeds only what is missing, and the bundle lists each source item once, in source
order. One build at a time may write into a bundle root (a lock file, released by the kernel
when the process dies).

Growing collections (`incremental`): the vectors of the live version are reused; only source items
it lacks are embedded, and the new version holds the old items plus the new ones. Items on the
bundle root's deletion list (`deleted.txt`) and in `options.deleted` are left out of every new
version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import pathlib
import shutil
import time

import numpy as np
from tqdm import tqdm

from cbir import pdq
from cbir.bundle import InvalidBundleInput, open_bundle, read_deleted, write_bundle
from cbir.bundle.ann import index_choice_problem
from cbir.bundle.faiss_index import size_problem
from cbir.errors import BadImage, BundleError
from cbir.download import Downloader, FetchError, FetchLimits, UrlPolicy
from apps.ingest import defaults
from apps.ingest.pipeline import chunked, ordered_map
from apps.ingest.shards import ShardStore
from apps.ingest.sources import SourceError, SourceItem, is_remote, list_source, read_bytes

log = logging.getLogger(__name__)

LOCK_FILE = ".build.lock"


@dataclasses.dataclass
class BuildOptions:
    metric: str = defaults.METRIC
    index_type: str = defaults.INDEX_TYPE  # annoy | hnsw | hnsw-sq8 | ivfpq
    index_params: dict[str, int] = dataclasses.field(default_factory=dict)  # a faiss index's (write_bundle)
    trees: int = defaults.TREES  # Annoy's
    pca_dimension: int = defaults.PCA_DIMENSION
    pca_whiten: bool = defaults.PCA_WHITEN
    batch_size: int = 32
    read_workers: int = 4
    shard_size: int = 1024
    max_image_bytes: int = 32 * 1024 * 1024
    fetch_timeout_s: float = 20.0
    progress: bool = True
    incremental: bool = False  # reuse the live version's vectors, embed only what it lacks
    deleted: frozenset[str] = frozenset()  # ids to leave out, besides the root's deletion list
    fetch_workers: int = 16  # downloads at once when the source has URLs
    fetch_retries: int = 3
    fetch_per_host: int = 4
    allow_private_urls: bool = True  # the manifest is the operator's own: internal hosts are fine
    fetch_content_types: tuple[str, ...] = ("image/", "application/octet-stream", "binary/octet-stream")
    ray_address: str | None = None  # embed on this Ray cluster (apps.ingest.ray_embed; needs a RayEmbedding)
    ray_actors: int = 0  # models (Ray actors) at once; 0 = one per GPU, else one per node


@dataclasses.dataclass
class BuildResult:
    bundle: pathlib.Path
    items: int
    rejected: int
    rejects_file: pathlib.Path
    seconds: float
    embedded: int = 0  # vectors computed by this run
    reused: int = 0  # vectors taken from the live version (incremental) or from shards of an interrupted run
    deleted: int = 0  # items left out because they are on a deletion list
    transient: int = 0  # failures that may pass: run the build again (incremental) to retry them

    @property
    def images_per_second(self) -> float:
        return (self.items + self.rejected) / self.seconds if self.seconds else 0.0


@contextlib.contextmanager
def build_lock(out: pathlib.Path):
    """Hold `out/.build.lock` (flock) for the build: a second build into the same root is refused."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SourceError(
                f"another `cbir index build` is writing into {out} (it holds {out / LOCK_FILE}); wait for it to finish"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def _remove_stale_scratch(out: pathlib.Path) -> None:
    """Half-written versions of a build that was killed (only builds write there, and we hold the lock)."""
    for scratch in out.glob(".building-*"):
        shutil.rmtree(scratch, ignore_errors=True)
    for tmp in out.glob(".current-*"):
        tmp.unlink(missing_ok=True)


@dataclasses.dataclass
class _Base:
    """The live version's items and vectors, for an incremental build."""

    version: str
    ids: list[str]
    urls: list[str]
    metadata: list[dict[str, str]]
    vectors: np.ndarray
    row: dict[str, int]
    local: list[bytes] | None  # per item, when the live version stores local features
    pdq: np.ndarray | None  # PDQ records per item, when the live version stores them


def _load_base(out: pathlib.Path, fingerprint: str) -> _Base:
    try:
        bundle = open_bundle(out)
    except BundleError as error:
        raise SourceError(f"--incremental needs a bundle to add to: {error}") from None
    try:
        if bundle.model_fingerprint != fingerprint:
            raise SourceError(
                f"--incremental: the live version {bundle.version} was built with model {bundle.model_fingerprint}, "
                f"this build embeds with {fingerprint}; vectors of two models cannot share an index. "
                "Build without --incremental (embeds everything again)"
            )
        records = list(bundle.iter_items())
        vectors = bundle.features()  # memory-mapped: only the rows kept are copied, once
        local = [bundle.local.get(i) for i in range(len(records))] if bundle.local is not None else None
        hashes = np.array(bundle.pdq) if bundle.pdq is not None else None
        return _Base(
            bundle.version, [r.item_id for r in records], [r.url for r in records], [r.metadata for r in records],
            vectors, {r.item_id: i for i, r in enumerate(records)}, local, hashes,
        )
    finally:
        bundle.close()


def build_index(source, out: pathlib.Path, embedding, options: BuildOptions = BuildOptions()) -> BuildResult:
    """Build a new bundle version under `out` from `source` with `embedding` (Local/RemoteEmbedding)."""
    out = pathlib.Path(out)
    with build_lock(out):
        _remove_stale_scratch(out)
        return _build(source, out, embedding, options)


def _build(source, out: pathlib.Path, embedding, options: BuildOptions) -> BuildResult:
    started = time.perf_counter()
    problem = index_choice_problem(options.index_type, options.metric)
    if problem:
        raise InvalidBundleInput(problem)
    listed = list_source(source)
    if not listed:
        raise SourceError(f"{source}: no images found")
    deleted = read_deleted(out) | frozenset(options.deleted)
    items = [item for item in listed if item.item_id not in deleted]
    if not options.incremental and (problem := size_problem(options.index_type, len(items), options.index_params)):
        raise InvalidBundleInput(problem)  # before embedding anything (write_bundle checks the final count)
    left_out = len(listed) - len(items)
    if left_out:
        log.info("leaving out %d items on the deletion list", left_out)

    base = _load_base(out, embedding.info.fingerprint) if options.incremental else None
    store = ShardStore(out / ".work" / embedding.info.fingerprint, options.shard_size)
    vectors, rejects, local, hashes = store.load()
    from_shards = len(vectors)
    known = base.row if base is not None else {}
    todo = [item for item in items if item.item_id not in vectors and item.item_id not in rejects
            and item.item_id not in known]
    if len(todo) < len(items):
        log.info("%d of %d items already embedded or rejected; embedding %d", len(items) - len(todo), len(items), len(todo))

    transient: dict[str, str] = {}
    downloader = make_downloader(options) if any(is_remote(item.location) for item in todo) else None
    pdqhash = pdq.load_pdqhash()
    embed_all = _embed_all
    if options.ray_address is not None:
        from apps.ingest.ray_embed import embed_all  # Ray Data feeds the same shards (Ray is an optional extra)
    try:
        with tqdm(total=len(items), initial=len(items) - len(todo), unit="img", desc="embedding",
                  disable=not options.progress, dynamic_ncols=True) as bar:
            for item, result, reason, passing in embed_all(todo, embedding, options, downloader, pdqhash):
                if reason is None:
                    embedded, record = result
                    vectors[item.item_id] = embedded.vector
                    local[item.item_id] = embedded.local
                    hashes[item.item_id] = record
                    store.add(item.item_id, embedded.vector, embedded.local, record)
                elif passing:
                    transient[item.item_id] = reason
                else:
                    rejects[item.item_id] = reason
                    store.add_reject(item.item_id, reason)
                bar.update(1)
        store.flush()
    finally:
        if downloader is not None:
            downloader.close()

    ids, urls, metadata, base_rows, new_rows, local_rows, pdq_rows = [], [], [], [], [], [], []
    if base is not None:  # old items first, in their order; a source row may update url/metadata
        source_items = {item.item_id: item for item in items}
        for i, item_id in enumerate(base.ids):
            if item_id in deleted:
                continue
            item = source_items.get(item_id)
            ids.append(item_id)
            urls.append(item.url if item else base.urls[i])
            metadata.append(item.metadata if item else base.metadata[i])
            base_rows.append(i)
            local_rows.append(base.local[i] if base.local is not None else b"")
            pdq_rows.append(base.pdq[i] if base.pdq is not None else pdq.empty(1)[0])
    for item in items:
        if item.item_id in vectors and item.item_id not in known:
            ids.append(item.item_id)
            urls.append(item.url)
            metadata.append(item.metadata)
            new_rows.append(vectors[item.item_id])
            local_rows.append(local.get(item.item_id, b""))
            pdq_rows.append(hashes.get(item.item_id, pdq.empty(1)[0]))
    parts = []
    if base_rows:
        parts.append(np.asarray(base.vectors[np.asarray(base_rows)], dtype=np.float32))
    if new_rows:
        parts.append(np.stack(new_rows).astype(np.float32))
    rejects_file = _write_rejects(out, items, rejects, transient)
    if not ids:
        raise SourceError(f"none of the {len(items)} images could be embedded; see {rejects_file}")
    bundle = write_bundle(
        out,
        ids=ids,
        urls=urls,
        metadata=metadata,
        vectors=np.concatenate(parts) if len(parts) > 1 else parts[0],
        model=embedding.info,
        metric=options.metric,
        trees=options.trees,
        index_type=options.index_type,
        index_params=options.index_params or None,
        pca_dimension=options.pca_dimension,
        pca_whiten=options.pca_whiten,
        source=str(source) + (f" (added to {base.version})" if base is not None else ""),
        **_local_features(embedding.info, base, local_rows),
        pdq=np.array(pdq_rows, dtype=pdq.RECORD) if pdqhash is not None else None,
    )
    store.remove()
    embedded = len(vectors) - from_shards
    reused = from_shards + (len(set(known) - deleted) if base is not None else 0)
    return BuildResult(
        bundle, len(ids), len(rejects) + len(transient), rejects_file, time.perf_counter() - started,
        embedded=embedded, reused=reused, deleted=left_out, transient=len(transient),
    )


def _local_features(info, base: _Base | None, rows: list[bytes]) -> dict:
    """write_bundle's local feature arguments: stored when the model makes them (and, for an incremental
    build, the live version has them too: else its items would have none)."""
    if not info.local_features or (base is not None and base.local is None):
        return {}
    return dict(local_features=rows, local_features_kind=info.local_features)


def make_downloader(options: BuildOptions) -> Downloader:
    """The URL downloader with the build's limits (the in-process build's, and each Ray read task's)."""
    return Downloader(
        UrlPolicy(allow_private=options.allow_private_urls),
        FetchLimits(
            max_bytes=options.max_image_bytes, timeout_s=options.fetch_timeout_s, retries=options.fetch_retries,
            per_host=options.fetch_per_host, content_types=options.fetch_content_types,
        ),
    )


def _embed_all(items: list[SourceItem], embedding, options: BuildOptions, downloader: Downloader | None,
               pdqhash=None):
    """Yield (item, (Embedded, PDQ record), None, False) or (item, None, reason, transient) for every item, in
    order; the record is made while the image is read (one without a hash when `pdqhash` is None)."""

    def prepare(item: SourceItem):
        try:
            data = read_bytes(item, max_bytes=options.max_image_bytes, timeout_s=options.fetch_timeout_s,
                              downloader=downloader)
            payload = embedding.prepare(data)
            return item, (payload, pdq.hash_bytes(pdqhash, data) if pdqhash else pdq.empty(1)[0]), None, False
        except FetchError as error:
            return item, None, str(error), error.transient
        except BadImage as error:
            return item, None, str(error), False

    def embed(batch):
        good = [(item, prepared) for item, prepared, reason, _ in batch if reason is None]
        results = iter(embedding.embed([payload for _, (payload, _) in good]) if good else [])
        out = []
        for item, prepared, reason, passing in batch:
            if reason is None:
                result = next(results)
                reason = result if isinstance(result, str) else None
                out.append((item, None if reason else (result, prepared[1]), reason, False))
            else:
                out.append((item, None, reason, passing))
        return out

    workers = max(options.read_workers, options.fetch_workers) if downloader is not None else options.read_workers
    prepared = ordered_map(prepare, items, workers=workers, lookahead=max(4 * options.batch_size, 2 * workers))
    batches = chunked(prepared, options.batch_size)
    lanes = embedding.parallel_batches
    for results in ordered_map(embed, batches, workers=lanes, lookahead=lanes + 1):
        yield from results


def _write_rejects(out: pathlib.Path, items: list[SourceItem], rejects: dict[str, str],
                   transient: dict[str, str]) -> pathlib.Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "rejects.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for item in items:
            if item.item_id in rejects or item.item_id in transient:
                passing = item.item_id in transient
                record = {"item_id": item.item_id, "location": item.location,
                          "reason": transient[item.item_id] if passing else rejects[item.item_id]}
                if passing:
                    record["transient"] = True
                handle.write(json.dumps(record) + "\n")
    return path
