"""A bundle whose index is a collection in Milvus (index_type "milvus"), served through the bundle's index
interface (`cbir.bundle.ann.AnnIndex`) by `MilvusBackend`. pymilvus is imported on first use: the project
works without it (`pip install 'cbir[milvus]'` adds it).

Where Milvus is: a URI. `http://host:19530` names a Milvus server (standalone, the proxy of a cluster, or
`milvus-lite server`); a path ending in `.db` names a milvus-lite database, which pymilvus runs inside the
process that opens it. The build takes it from write_bundle's `milvus_uri`, else the environment variable
CBIR_MILVUS_URI, else `milvus.db`: a milvus-lite database inside the new version folder, so that a version
stays self-contained and a build never waits for an indexer (milvus-lite lets one process open a database
at a time). The manifest records it (field `milvus`, with the collection and the alias). Opening uses
open_bundle's `milvus_uri`, else CBIR_MILVUS_URI, else the manifest's URI (a relative .db path is inside
the version folder): the override serves a server that the indexer reaches by another name than the build.
No credentials in the URI: it is written into the manifest.

Collections and the alias: each version writes its own collection, `cbir_<bundle>_<version>_<6 hex>`, with
the fields id (INT64 primary key: the item number, row i of features.npy), vector, item_id, url and metadata
(JSON), and an HNSW index (M 32 and efConstruction 200 by default, the faiss HNSW settings measured in
BENCHMARKS.md; index_params m, ef_construction, ef_search) with the COSINE (angular) or L2 (euclidean)
metric. The default ef is EF_SEARCH, twice faiss's: at ef 128, Milvus 2.3.5's HNSW (knowhere) gave the exact
top 10 for 92 of 100 queries far from every item of 3,000 clustered 64-d vectors, faiss's HNSW for 97, and
Milvus at ef 256 for 98 (queries near the items: 100 for each). The build inserts, flushes, waits for the index and loads the collection before the version is
published. The alias `cbir_<bundle>` names the live version's collection for other Milvus clients:
write_bundle switches it (alter_alias, atomic in Milvus) right after it points `current` at the new version,
at the end of a successful build, when the version goes live. The indexer never searches through the alias:
each opened version searches its own collection by name, so the requests in flight on the old version end
on the old collection while the indexer opens, warms and swaps in the new one, and no query of one version
is answered with another version's item numbers. Old collections stay with their versions (the indexer can
serve an older version again); `drop_collection` removes one. A milvus-lite database inside a version folder
holds that version's collection alone; its alias is made there at build time and no other client shares it.

Searches: effort = HNSW's ef (default EF_SEARCH, or the build's ef_search), at least the hits fetched, at most the collection's size.
Hidden items and metadata filters (`allowed`) go to Milvus as a filter expression on the id when it lists at
most MAX_FILTER_IDS ids (measured on the embedded Milvus 2.3.5: ~3.5 us per listed id, 8 ms for 2,000);
beyond that, more hits are fetched and filtered here (like Annoy), up to Milvus's top-k limit of 16,384. A
filter that allows fewer items than the search would inspect, a search for every remaining item, or too few
hits found are answered exactly from the bundle's features (`cbir.bundle.exact`). The hits' distances are
computed from the bundle's features too (the backends' convention, exactly; Milvus's float32 cosine is not).

Errors are sentences: a missing pymilvus, an unreachable server, a database another process holds, a missing
collection or one that does not fit the manifest are BundleErrors; a search Milvus does not answer is
UpstreamUnavailable (gRPC UNAVAILABLE).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from cbir.bundle.ann import Hits
from cbir.bundle.exact import distances as exact_distances
from cbir.bundle.exact import nearest_in
from cbir.bundle.inputs import InvalidBundleInput
from cbir.bundle.layout import MILVUS_LITE_FILE, MILVUS_METRICS, REBUILD
from cbir.bundle.manifest import MilvusSpec
from cbir.bundle.subset import ItemSubset
from cbir.errors import BundleError, UpstreamUnavailable

log = logging.getLogger(__name__)

URI_ENV = "CBIR_MILVUS_URI"
NAME_PREFIX = "cbir_"
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
EF_SEARCH = 256  # the default effort (module docstring)
MAX_TOPK = 16384  # Milvus refuses a larger limit
# ef beyond this is refused here: Milvus 2.3.5 accepts any ef and allocates for it (ef 2^31 - 1 ran it out of memory).
MAX_EF = 65536
MAX_FILTER_IDS = 2048
CONNECT_TIMEOUT_S = 10.0
SEARCH_TIMEOUT_S = 10.0
BUILD_TIMEOUT_S = 600.0  # one insert, flush or load call
INDEX_TIMEOUT_S = 6 * 3600.0  # the HNSW build of a large collection
_INSERT_BYTES = 16 * 2**20  # per insert call: well below gRPC's 64 MiB message limit
_METRIC_TYPES = {"angular": "COSINE", "euclidean": "L2"}
_PARAMS = ("m", "ef_construction")
_EFFORT_PARAM = "ef_search"
_SERVER_SCHEMES = ("http", "https", "tcp", "unix")  # what pymilvus connects to


def _pymilvus():
    """pymilvus, imported on first use; BundleError in words when it is not installed."""
    try:
        import pymilvus
    except ImportError:
        raise BundleError("this bundle's index is a Milvus collection, but pymilvus is not installed: "
                          "pip install 'cbir[milvus]'") from None
    return pymilvus


def _reason(error: BaseException) -> str:
    """What pymilvus or gRPC said, without the exception's repr."""
    text = getattr(error, "message", "") or (error.details() if hasattr(error, "details") else "") or str(error)
    return str(text).strip().splitlines()[0] if str(text).strip() else type(error).__name__


# ------------------------------------------------------------------------------------------ where


def is_lite(uri: str) -> bool:
    """Whether `uri` names a milvus-lite database (a path), not a server."""
    return urlparse(uri).scheme.lower() not in _SERVER_SCHEMES


def configured_uri(given: str | None = None) -> str:
    """The URI a build writes to: `given`, else CBIR_MILVUS_URI, else milvus-lite inside the version folder."""
    return given or os.environ.get(URI_ENV, "").strip() or MILVUS_LITE_FILE


def uri_problem(uri: str) -> str:
    """Why `uri` cannot name where a bundle's collection lives, in words ("" when it can)."""
    if is_lite(uri):
        if not uri.endswith(".db"):
            return (f"the Milvus URI {uri!r} is neither a server address (like http://milvus:19530) nor a milvus-lite "
                    "database (a path ending in .db)")
        return ""
    parsed = urlparse(uri)
    if parsed.username or parsed.password:
        return ("the Milvus URI holds credentials: it is recorded in the bundle's manifest, so give a server "
                "address without them")
    if parsed.scheme != "unix" and not parsed.hostname:
        return f"the Milvus URI {uri!r} names no host (like http://milvus:19530)"
    return ""


def _address(uri: str, folder: Path) -> str:
    """What pymilvus connects to: a server URI as it is; a relative milvus-lite path inside `folder`."""
    if not is_lite(uri):
        return uri
    path = Path(uri).expanduser()
    return str(path if path.is_absolute() else folder / path)


def _in_version_folder(uri: str) -> bool:
    return is_lite(uri) and not Path(uri).expanduser().is_absolute()


def _milvus_name(text: str) -> str:
    """`text` as Milvus allows in a name: letters, digits and underscores."""
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def new_location(uri: str | None, bundle_name: str, version: str | None) -> MilvusSpec:
    """Where a new version's collection goes: the URI (`configured_uri`), a collection name of its own and the
    bundle's alias; InvalidBundleInput for a URI that cannot work."""
    uri = configured_uri(uri)
    problem = uri_problem(uri)
    if problem:
        raise InvalidBundleInput(problem)
    stem = _milvus_name(bundle_name)[:100]
    when = _milvus_name(version or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ"))[:100]
    return MilvusSpec(uri=uri, collection=f"{NAME_PREFIX}{stem}_{when}_{secrets.token_hex(3)}",
                      alias=f"{NAME_PREFIX}{stem}")


def describe(spec: MilvusSpec, address: str | None = None) -> str:
    """The collection and where it is (its server, or its milvus-lite database's path), for messages."""
    return f"Milvus collection {spec.collection} at {address or spec.uri}"


# ------------------------------------------------------------------------------------------ plan


def metric_problem(metric: str) -> str:
    """Why a Milvus collection cannot serve this metric, in words ("" when it can)."""
    if metric in MILVUS_METRICS:
        return ""
    return (f"the {metric} metric is only available with the annoy index: a Milvus collection compares vectors by "
            f"{' or '.join(MILVUS_METRICS)} distance. Build with --index annoy, or choose --metric angular")


def plan(given: Mapping[str, Any] | None) -> tuple[dict[str, int], int]:
    """The HNSW parameters to build with (recorded in the manifest's index_params) and the default ef (its
    default_search_k); InvalidBundleInput, in words, for a parameter that does not apply or cannot work."""
    given = dict(given or {})
    allowed = _PARAMS + (_EFFORT_PARAM,)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise InvalidBundleInput(f"index_params {', '.join(map(repr, unknown))} do not apply to index type 'milvus' "
                                 f"(it takes {', '.join(allowed)})")
    for name, value in given.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise InvalidBundleInput(f"index_params[{name!r}] must be an integer >= 1, got {value!r}")
    if not 2 <= given.get("m", HNSW_M) <= 2048:
        raise InvalidBundleInput(f"index_params['m'] must be between 2 and 2048 (Milvus's HNSW), got {given['m']}")
    params = {"m": int(given.get("m", HNSW_M)), "ef_construction": int(given.get("ef_construction", HNSW_EF_CONSTRUCTION))}
    return params, int(min(given.get(_EFFORT_PARAM, EF_SEARCH), MAX_EF))


def missing_params(params: Mapping[str, int]) -> list[str]:
    """The build parameters a milvus manifest must record but does not."""
    return [name for name in _PARAMS if name not in params]


# ------------------------------------------------------------------------------------------ connections

_lite_lock = threading.Lock()
_lite_users: dict[str, int] = {}  # milvus-lite databases this process has open, and how many clients use each


def _check_lite_free(path: Path) -> None:
    """milvus-lite lets one process open a database (an advisory flock on its LOCK file): say so in words when
    another process holds it (pymilvus would only say "Open local milvus failed")."""
    import fcntl

    lock = path / "LOCK"
    if not lock.is_file():
        return
    with open(lock, "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BundleError(
                f"the milvus-lite database {path} is open in another process (an indexer or a build): milvus-lite "
                f"lets one process use a database at a time. Stop that process, or serve the collection from a Milvus "
                f"server (set {URI_ENV}=http://host:19530 for the build)") from None
        fcntl.flock(handle, fcntl.LOCK_UN)


def connect(address: str):
    """A MilvusClient on `address` (a server URI, or a milvus-lite path that pymilvus runs in this process);
    BundleError in words when it cannot be reached. Close it with `disconnect`."""
    pymilvus = _pymilvus()
    lite = is_lite(address)
    key = _lite_key(address) if lite else ""
    if lite:
        if not Path(address).parent.is_dir():
            raise BundleError(f"the milvus-lite database {address} cannot be opened: the folder {Path(address).parent} "
                              "does not exist")
        with _lite_lock:
            if not _lite_users.get(key):
                _check_lite_free(Path(address))
            _lite_users[key] = _lite_users.get(key, 0) + 1
    try:
        # dedicated: a milvus-lite server stops when its last client closes, so no shared channel may outlive it
        return pymilvus.MilvusClient(uri=address, timeout=CONNECT_TIMEOUT_S, dedicated=lite)
    except pymilvus.exceptions.MilvusException as error:
        if lite:
            _release_lite(key)
            raise BundleError(f"cannot open the milvus-lite database {address}: {_reason(error)}") from None
        raise BundleError(
            f"cannot reach the Milvus server at {address}: {_reason(error)}. Start it (`docker compose --profile milvus "
            f"up -d` runs one), or point {URI_ENV} at the server that holds the collection") from None


def disconnect(client, address: str) -> None:
    """Close a client of `connect`; the last one of a milvus-lite database stops its server in this process."""
    client.close()
    if is_lite(address):
        _release_lite(_lite_key(address))


def _lite_key(address: str) -> str:
    return os.path.abspath(address)  # as milvus_lite's server manager names its servers


def _release_lite(key: str) -> None:
    with _lite_lock:
        users = _lite_users.get(key, 0) - 1
        if users > 0:
            _lite_users[key] = users
            return
        _lite_users.pop(key, None)
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(key)


@contextmanager
def _connected(address: str):
    client = connect(address)
    try:
        yield client
    finally:
        disconnect(client, address)


def _call(what: str, where: str, function: Callable[[], Any]) -> Any:
    """`function()`, its Milvus error turned into a BundleError saying what failed where."""
    try:
        return function()
    except BundleError:
        raise
    except Exception as error:
        if type(error).__module__.startswith(("pymilvus", "grpc", "milvus_lite")):
            raise BundleError(f"Milvus could not {what} ({where}): {_reason(error)}") from None
        raise


# ------------------------------------------------------------------------------------------ build


def write_milvus(spec: MilvusSpec, folder: Path, *, ids: Sequence[str], urls: Sequence[str],
                 metadata_rows: Sequence[str | None], vectors: np.ndarray, metric: str, params: Mapping[str, int]) -> None:
    """Write the collection `spec` names (a milvus-lite database path relative to `folder`): every item with its
    index vector, item id, URL and metadata; an HNSW index built; loaded, ready to search. A Milvus that cannot
    be reached or refuses is an InvalidBundleInput (the build's milvus_uri cannot be used), in words."""
    try:
        _write(spec, folder, ids, urls, metadata_rows, vectors, metric, params)
    except InvalidBundleInput:
        raise
    except BundleError as error:
        raise InvalidBundleInput(str(error)) from None


def _write(spec: MilvusSpec, folder: Path, ids: Sequence[str], urls: Sequence[str],
           metadata_rows: Sequence[str | None], vectors: np.ndarray, metric: str, params: Mapping[str, int]) -> None:
    pymilvus = _pymilvus()
    address, name = _address(spec.uri, folder), spec.collection
    where = describe(spec, address)
    dimension = vectors.shape[1]
    with _connected(address) as client:
        if _call("list its collections", where, lambda: client.has_collection(name)):
            raise BundleError(f"{where} exists already: a build never writes into an existing collection")
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=int(dimension))
        schema.add_field("item_id", pymilvus.DataType.VARCHAR, max_length=65535)
        schema.add_field("url", pymilvus.DataType.VARCHAR, max_length=65535)
        schema.add_field("metadata", pymilvus.DataType.JSON)
        _call("create the collection", where, lambda: client.create_collection(
            name, schema=schema, consistency_level="Bounded", timeout=BUILD_TIMEOUT_S))
        try:
            _fill(client, spec, where, ids, urls, metadata_rows, vectors, metric, params)
        except BaseException:
            if not _in_version_folder(spec.uri):  # (a database in the scratch folder goes with it)
                try:
                    _call("drop the collection", where, partial(client.drop_collection, name))
                except BundleError as error:
                    log.warning("could not drop %s after the failed build: %s", where, error)
            raise


def _fill(client, spec: MilvusSpec, where: str, ids: Sequence[str], urls: Sequence[str],
          metadata_rows: Sequence[str | None], vectors: np.ndarray, metric: str, params: Mapping[str, int]) -> None:
    """Insert the items into the new collection, index and load it."""
    name = spec.collection
    n, dimension = vectors.shape
    log.info("writing %d vectors into %s", n, where)
    batch = max(1, _INSERT_BYTES // (4 * int(dimension) + 256))
    for start in range(0, n, batch):
        rows = [{"id": i, "vector": vectors[i].tolist(), "item_id": ids[i], "url": urls[i],
                 "metadata": json.loads(metadata_rows[i]) if metadata_rows[i] else {}}
                for i in range(start, min(n, start + batch))]
        _call("insert the items", where, partial(client.insert, name, rows, timeout=BUILD_TIMEOUT_S))
    _call("flush the collection", where, lambda: client.flush(name, timeout=BUILD_TIMEOUT_S))
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type="HNSW", metric_type=_METRIC_TYPES[metric],
                    params={"M": params["m"], "efConstruction": params["ef_construction"]})
    _call("create the HNSW index", where, lambda: client.create_index(name, index, timeout=BUILD_TIMEOUT_S))
    _wait_for_index(client, name, n, where)
    _call("load the collection", where, lambda: client.load_collection(name, timeout=BUILD_TIMEOUT_S))
    if _in_version_folder(spec.uri):  # its own database: the alias is made here (module docstring)
        _call("create the alias", where, lambda: client.create_alias(name, spec.alias))


def _wait_for_index(client, name: str, count: int, where: str) -> None:
    """Until Milvus has indexed every row (it builds the index in the background)."""
    deadline = time.monotonic() + INDEX_TIMEOUT_S
    while True:
        state = _call("describe the index", where, lambda: client.describe_index(name, "vector"))
        if str(state.get("state", "")).lower() == "failed":
            raise BundleError(f"Milvus failed to build the HNSW index of {where}: {state.get('index_state_fail_reason', '')}")
        if int(state.get("indexed_rows", 0)) >= count:
            return
        if time.monotonic() > deadline:
            raise BundleError(f"Milvus has indexed {state.get('indexed_rows')} of {count} rows of {where} after "
                              f"{INDEX_TIMEOUT_S:.0f} s")
        time.sleep(0.2)


def point_alias(spec: MilvusSpec, folder: Path, uri: str | None = None) -> None:
    """Point the bundle's alias at this version's collection (create it, or alter it atomically): what other
    Milvus clients follow. Nothing to do for a milvus-lite database inside the version folder (made at build)."""
    uri = uri or spec.uri
    if _in_version_folder(uri):
        return
    address = _address(uri, folder)
    where = describe(spec, address)
    with _connected(address) as client:
        aliases = _call("list its aliases", where, lambda: client.list_aliases()).get("aliases", [])
        if spec.alias in aliases:
            _call(f"point the alias {spec.alias} at it", where, lambda: client.alter_alias(spec.collection, spec.alias))
        else:
            _call(f"create the alias {spec.alias}", where, lambda: client.create_alias(spec.collection, spec.alias))
    log.info("Milvus alias %s now names %s", spec.alias, where)


def drop_collection(spec: MilvusSpec, folder: Path) -> None:
    """Remove the collection (a failed build's, or a removed version's). A milvus-lite database inside the
    version folder goes with the folder."""
    if _in_version_folder(spec.uri):
        return
    address = _address(spec.uri, folder)
    where = describe(spec, address)
    with _connected(address) as client:
        if _call("list its collections", where, partial(client.has_collection, spec.collection)):
            _call("drop the collection", where, partial(client.drop_collection, spec.collection))


# ------------------------------------------------------------------------------------------ serve


def serving_uri(spec: MilvusSpec, override: str | None = None) -> str:
    """The URI a bundle is served from: `override`, else CBIR_MILVUS_URI, else the one the manifest records."""
    return override or os.environ.get(URI_ENV, "").strip() or spec.uri


def load_milvus(spec: MilvusSpec, folder: Path, *, metric: str, dimension: int, default_effort: int,
                params: Mapping[str, int], reference: Callable[[np.ndarray], np.ndarray],
                uri: str | None = None) -> MilvusBackend:
    """The collection `spec` names, checked (it exists, holds `dimension`-d vectors compared by the manifest's
    metric) and loaded for search; BundleError in words when it is not there or does not fit."""
    uri = serving_uri(spec, uri)
    problem = uri_problem(uri)
    if problem:
        raise BundleError(f"{problem} ({URI_ENV} or the manifest)")
    address, name = _address(uri, folder), spec.collection
    where = describe(spec, address)
    client = connect(address)
    try:
        if not _call("list its collections", where, lambda: client.has_collection(name)):
            raise BundleError(
                f"the Milvus at {address} has no collection {name}, which holds the index of bundle version "
                f"{folder.name}: it was dropped, or this is not the server the bundle was built on (set {URI_ENV} to "
                f"that one); {REBUILD}")
        fields = _call("describe the collection", where, lambda: client.describe_collection(name)).get("fields", [])
        vector = next((f for f in fields if f.get("name") == "vector"), {})
        stored = int(vector.get("params", {}).get("dim", 0))
        index = _call("describe the index", where, lambda: client.describe_index(name, "vector")) or {}
        if stored != dimension or index.get("metric_type") != _METRIC_TYPES[metric]:
            raise BundleError(
                f"{where} holds {stored}-d vectors compared by {index.get('metric_type') or 'no index'}, but the "
                f"manifest says {dimension}-d {metric} ({_METRIC_TYPES[metric]}): the collection does not belong to "
                f"this manifest; {REBUILD}")
        _call("load the collection", where, lambda: client.load_collection(name, timeout=BUILD_TIMEOUT_S))
        rows = _call("count the collection", where, lambda: client.query(
            name, filter="", output_fields=["count(*)"], consistency_level="Strong", timeout=BUILD_TIMEOUT_S))
        count = int(rows[0]["count(*)"]) if rows else 0
    except BaseException:
        disconnect(client, address)
        raise
    return MilvusBackend(client, address=address, collection=name, where=where, metric=metric, params=params,
                         default_effort=default_effort, count=count, reference=reference)


class MilvusBackend:
    """A Milvus collection behind the bundle's index interface (`cbir.bundle.ann.AnnIndex`). Many threads
    search through one client (a gRPC channel) at once."""

    index_type = "milvus"

    def __init__(self, client, *, address: str, collection: str, where: str, metric: str, params: Mapping[str, int],
                 default_effort: int, count: int, reference: Callable[[np.ndarray], np.ndarray]):
        self.client = client
        self._address = address
        self._collection = collection
        self.where = where  # the collection and where it is, for messages
        self._metric = metric
        self._metric_type = _METRIC_TYPES[metric]
        self._links = int(params.get("m", HNSW_M))
        self._default = int(default_effort)
        self._count = int(count)
        self._reference = reference
        self._hidden_filter: tuple[frozenset[int], str] = (frozenset(), "")

    @property
    def count(self) -> int:
        return self._count

    @property
    def collection(self) -> str:
        return self._collection

    def effort(self, n: int, requested: int) -> int:
        """ef: the bundle's default for 0, at least the hits fetched, at most the collection's size and MAX_EF."""
        level = int(requested) or self._default
        fetched = min(n, self._count, MAX_TOPK)
        return int(max(fetched, min(level, max(self._count, fetched), MAX_EF)))

    # -- queries
    def search(self, vector: np.ndarray, n: int, effort: int = 0, hidden: frozenset[int] = frozenset(),
               allowed: ItemSubset | None = None) -> Hits:
        return self._search(np.asarray(vector, dtype=np.float32).reshape(-1), n, effort, hidden, None, allowed)

    def search_by_item(self, item: int, n: int, effort: int = 0, hidden: frozenset[int] = frozenset(),
                       exclude_self: bool = False, allowed: ItemSubset | None = None) -> Hits:
        query = np.asarray(self._reference(np.array([item])), dtype=np.float32)[0]
        return self._search(query, n, effort, hidden, item if exclude_self else None, allowed)

    def _search(self, query: np.ndarray, n: int, effort: int, hidden: frozenset[int], drop: int | None,
                allowed: ItemSubset | None) -> Hits:
        wanted = n + (drop is not None)
        available = self._count - len(hidden) if allowed is None else len(allowed)
        fraction = 1.0 if allowed is None else max(allowed.fraction, 1e-12)
        # among allowed items, HNSW inspects ~1 / fraction more nodes to find as many: its ef grows alike
        level = min(self.effort(self._count, 0), math.ceil(self.effort(wanted, effort) / fraction))
        inspected = self.effort(wanted, effort) * self._links  # about the vectors an unfiltered search compares
        ids: list[int] = []
        if wanted < available and not (allowed is not None and available <= inspected / fraction):
            expression = self._filter(hidden, allowed)
            if expression is not None:
                ids = self._ann(query, min(wanted, MAX_TOPK), max(level, min(wanted, MAX_TOPK)), expression)
            else:
                ids = self._fetch_more(query, wanted, level, hidden, allowed, available)
        if len(ids) < wanted:  # few allowed items, all of them asked for, or too few found: exact
            subset = allowed if allowed is not None else ItemSubset.of(np.ones(self._count, dtype=bool), hidden)
            ids, _ = nearest_in(query, subset, self._reference, self._metric, wanted)
        ids, distances = self._exact_order(query, ids)
        if drop is not None:
            kept = [(i, d) for i, d in zip(ids, distances) if i != drop]
            ids, distances = [i for i, _ in kept], [d for _, d in kept]
        return ids[:n], distances[:n]

    def _filter(self, hidden: frozenset[int], allowed: ItemSubset | None) -> str | None:
        """The Milvus filter expression that leaves out the hidden items or keeps the allowed ones ("" for none);
        None when it would list more than MAX_FILTER_IDS ids."""
        if allowed is not None:
            if len(allowed) <= MAX_FILTER_IDS:
                return _id_expression("in", allowed.ids)
            if self._count - len(allowed) <= MAX_FILTER_IDS:
                return _id_expression("not in", np.flatnonzero(~allowed.mask))
            return None
        if not hidden:
            return ""
        if len(hidden) > MAX_FILTER_IDS:
            return None
        cached = self._hidden_filter  # one deletion list serves many queries: its expression is made once
        if cached[0] is hidden or cached[0] == hidden:
            return cached[1]
        expression = _id_expression("not in", sorted(hidden))
        self._hidden_filter = (hidden, expression)
        return expression

    def _fetch_more(self, query: np.ndarray, wanted: int, level: int, hidden: frozenset[int],
                    allowed: ItemSubset | None, available: int) -> list[int]:
        """The first `wanted` hits that are allowed and not hidden among more hits (twice as many again while too
        few are left), as Annoy does: for filters too long to send to Milvus."""
        share = available / max(1, self._count)
        most = min(self._count, MAX_TOPK)
        limit = min(most, math.ceil(2 * wanted / max(share, 1e-12)))
        while True:
            found = self._ann(query, limit, max(level, limit), "")
            if allowed is not None:
                keep = allowed.allows(found) if found else np.zeros(0, dtype=bool)
                kept = [i for i, k in zip(found, keep) if k]
            else:
                kept = [i for i in found if i not in hidden]
            if len(kept) >= wanted or limit >= most:
                return kept[:wanted]
            limit = min(most, 2 * limit)

    def _ann(self, query: np.ndarray, limit: int, ef: int, expression: str) -> list[int]:
        """The ids of Milvus's `limit` nearest hits (within `expression`), best first."""
        client = self.client
        try:
            result = client.search(
                self._collection, data=[query.tolist()], limit=int(limit), filter=expression, output_fields=["id"],
                search_params={"metric_type": self._metric_type, "params": {"ef": int(min(ef, MAX_EF))}},
                timeout=SEARCH_TIMEOUT_S)
        except Exception as error:
            if client is None or type(error).__module__.startswith(("pymilvus", "grpc", "milvus_lite")):
                raise UpstreamUnavailable(f"{self.where} did not answer a search: {_reason(error)}") from None
            raise
        return [int(hit["id"]) for hit in result[0]]

    def _exact_order(self, query: np.ndarray, ids: Sequence[int]) -> tuple[list[int], list[float]]:
        """`ids` by their exact distance to `query`, from the bundle's features (the backends' convention)."""
        if not len(ids):
            return [], []
        array = np.asarray(ids, dtype=np.int64)
        distances = exact_distances(query, np.asarray(self._reference(array), dtype=np.float32), self._metric)
        order = np.argsort(distances, kind="stable")
        return [int(i) for i in array[order]], [float(d) for d in distances[order]]

    # -- stored vectors
    def item_vector(self, item: int) -> np.ndarray | None:
        rows = _call("read a stored vector", self.where, lambda: self.client.get(
            self._collection, ids=[int(item)], output_fields=["vector"], timeout=SEARCH_TIMEOUT_S))
        return np.asarray(rows[0]["vector"], dtype=np.float32) if rows else None

    def holds(self, item: int, expected: np.ndarray) -> bool:
        stored = self.item_vector(item)
        if stored is None or stored.shape != np.shape(expected):
            return False
        want = np.asarray(expected, dtype=np.float32)
        if self._metric == "angular":
            stored = stored / max(float(np.linalg.norm(stored)), 1e-12)
            want = want / max(float(np.linalg.norm(want)), 1e-12)
        return bool(np.allclose(stored, want, rtol=1e-4, atol=1e-5))

    def close(self) -> None:
        """Close the client (a milvus-lite database's server stops with its last client in this process)."""
        client, self.client = self.client, None
        if client is not None:
            disconnect(client, self._address)
        self._reference = None


def _id_expression(operator: str, ids) -> str:
    return f"id {operator} [{','.join(str(int(i)) for i in ids)}]"
