"""The index bundle format: write_bundle / open_bundle on real files, real Annoy indexes."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from cbir.bundle import (
    CURRENT_FILE,
    FEATURES_FILE,
    INDEX_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    PCA_FILE,
    InvalidBundleInput,
    default_search_k,
    list_versions,
    open_bundle,
    read_current,
    set_current,
    write_bundle,
    writing,
)
from cbir.bundle.files import sha256_of
from cbir.errors import BundleError
from cbir.v1 import common_pb2

DIM = 24
N = 300


def model(dimension: int = DIM, fingerprint: str = "fp-test") -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        name="vgg16", feature="gem", dimension=dimension, weights_source="random:0",
        weights_fingerprint="random-seed-0", preprocessing="caffe", fingerprint=fingerprint, pooling="gem(p=3)",
    )


def clustered(n: int = N, d: int = DIM, seed: int = 0, clusters: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d)) * 3
    return (centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, d))).astype(np.float32)


def items(n: int = N, prefix: str = "img"):
    ids = [f"{prefix}-{i:04d}" for i in range(n)]
    urls = [f"https://example.org/{i}.jpg" for i in ids]
    metadata = [{"label": f"c{i % 3}", "n": i} if i % 4 else None for i in range(n)]
    return ids, urls, metadata


def build(root: Path, *, n: int = N, d: int = DIM, metric: str = "angular", seed: int = 0, **kwargs) -> Path:
    ids, urls, metadata = items(n)
    kwargs.setdefault("trees", 5)
    return write_bundle(
        root, ids=ids, urls=urls, vectors=clustered(n, d, seed), model=model(d), metric=metric,
        metadata=metadata, **kwargs,
    )


def error_message(excinfo) -> str:
    return str(excinfo.value)


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "metric,pca_dimension,whiten",
    [("angular", 0, False), ("euclidean", 0, False), ("manhattan", 0, False), ("angular", 8, False),
     ("euclidean", 8, True), ("manhattan", 8, True)],
)
def test_round_trip_returns_what_was_written(tmp_path, metric, pca_dimension, whiten):
    """Everything written comes back from open_bundle: ids, urls, metadata, vectors, manifest, PCA; a stored
    vector's query finds its own Annoy id first at distance ~0."""
    ids, urls, metadata = items()
    vectors = clustered()
    path = write_bundle(
        tmp_path / "b", ids=ids, urls=urls, vectors=vectors, model=model(), metric=metric, trees=4,
        pca_dimension=pca_dimension, pca_whiten=whiten, metadata=metadata, source="unit test",
    )
    with open_bundle(tmp_path / "b") as b:
        assert b.path == path
        m = b.manifest
        assert (m.format_version, m.metric, m.trees, m.item_count, m.source) == (1, metric, 4, N, "unit test")
        assert m.input_dimension == DIM
        assert m.index_dimension == (pca_dimension or DIM)
        assert m.model_info() == model()
        assert m.name == "b" and m.version == path.name and m.created_at.endswith("Z")
        assert m.default_search_k == default_search_k(4, N)
        expected_files = {INDEX_FILE, ITEMS_FILE, FEATURES_FILE} | ({PCA_FILE} if pca_dimension else set())
        assert set(m.files) == expected_files
        assert (m.pca is None) == (pca_dimension == 0)
        if pca_dimension:
            assert (m.pca.dimension, m.pca.whiten) == (pca_dimension, whiten)
            assert (b.pca.dimension, b.pca.whiten) == (pca_dimension, whiten)
        np.testing.assert_array_equal(b.features(), vectors)
        records = list(b.iter_items())
        assert [r.item_id for r in records] == ids
        assert [r.url for r in records] == urls
        assert [r.annoy_id for r in records] == list(range(N))
        assert [r.metadata for r in records] == [{k: str(v) for k, v in (x or {}).items()} for x in metadata]
        for i in (0, 17, N - 1):
            got, distances = b.index.search(b.project(vectors[i]), 3)
            assert got[0] == i
            assert distances[0] == pytest.approx(0.0, abs=1e-3)
            assert distances == sorted(distances)


def test_lookups_by_item_id_and_annoy_id_keep_the_order_asked(tmp_path):
    """find_items / items_by_annoy_ids answer in request order, None for unknown item ids."""
    build(tmp_path / "b")
    with open_bundle(tmp_path / "b") as b:
        found = b.find_items(["img-0010", "nope", "img-0002", "img-0010"])
        assert [r and r.annoy_id for r in found] == [10, None, 2, 10]
        assert [r.item_id for r in b.items_by_annoy_ids([5, 1, 5])] == ["img-0005", "img-0001", "img-0005"]
        with pytest.raises(KeyError):
            b.items_by_annoy_ids([N + 5])


def test_item_reads_from_many_threads(tmp_path):
    """Item lookups from concurrent threads (one SQLite connection each) all return the right rows."""
    build(tmp_path / "b")
    errors: list[BaseException] = []
    with open_bundle(tmp_path / "b") as b:

        def work(offset: int) -> None:
            try:
                for i in range(offset, N, 7):
                    (r,) = b.find_items([f"img-{i:04d}"])
                    assert r.annoy_id == i
                    assert b.items_by_annoy_ids([i])[0].item_id == f"img-{i:04d}"
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(7)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert b._items.connection_count >= 2
    assert errors == []
    assert b.closed


def test_open_a_version_folder_directly(tmp_path):
    """A version folder (no `current`) opens as well as its root."""
    path = build(tmp_path / "b")
    with open_bundle(path) as b:
        assert b.path == path and b.root is None
    with open_bundle(tmp_path / "b") as b:
        assert b.root == tmp_path / "b"


# ---------------------------------------------------------------- versions and `current`


def test_current_names_the_newest_and_a_second_build_adds_a_version(tmp_path):
    """Each build adds a version; `current` follows the newest unless make_current=False."""
    root = tmp_path / "b"
    first = build(root)
    assert read_current(root) == first.name
    second = build(root, n=50, seed=1)
    assert second != first and first.exists()
    assert list_versions(root) == sorted([first.name, second.name])
    assert second.name > first.name  # sortable by time
    assert read_current(root) == second.name
    with open_bundle(root) as b:
        assert b.manifest.item_count == 50
    third = build(root, n=60, seed=2, make_current=False)
    assert read_current(root) == second.name
    set_current(root, third.name)
    with open_bundle(root) as b:
        assert b.manifest.item_count == 60
    assert (root / CURRENT_FILE).read_text() == third.name + "\n"
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []


def test_explicit_version_is_used_and_never_overwritten(tmp_path):
    """version= names the folder; reusing a name is refused (versions are immutable)."""
    root = tmp_path / "b"
    path = build(root, version="v1")
    assert path == root / "v1"
    with pytest.raises(InvalidBundleInput, match="already exists"):
        build(root, version="v1")
    with pytest.raises(InvalidBundleInput, match="not a valid name"):
        build(root, version="../escape")


def test_a_failed_build_leaves_no_version_and_keeps_current(tmp_path, monkeypatch):
    """A crash while building leaves no folder under a version name, no scratch folder, `current` unchanged."""
    root = tmp_path / "b"
    good = build(root)

    def explode(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(writing, "write_annoy", explode)
    with pytest.raises(RuntimeError, match="simulated"):
        build(root, seed=3)
    assert sorted(p.name for p in root.iterdir()) == sorted([good.name, CURRENT_FILE])
    assert read_current(root) == good.name


# ---------------------------------------------------------------- write_bundle validation


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(ids=["a", "b", "a"]), "not unique"),
        (dict(ids=["a", "", "c"]), "non-empty string"),
        (dict(ids=[]), "no items"),
        (dict(urls=["u1", "u2"]), "lengths differ"),
        (dict(vectors=np.zeros((3, DIM + 1), np.float32)), f"dimension {DIM + 1}"),
        (dict(vectors=np.zeros((3,), np.float32)), "2-d"),
        (dict(vectors=np.array([[np.nan] * DIM] * 3, np.float32)), "NaN"),
        (dict(vectors=np.zeros((3, DIM), np.int64)), "floating point"),
        (dict(metric="cosine"), "metric 'cosine'"),
        (dict(trees=0), "trees"),
        (dict(pca_dimension=DIM), "smaller than the input dimension"),
        (dict(pca_dimension=4), "larger than the number of items"),
        (dict(metadata=[{"a": 1}]), "metadata has 1 entries"),
        (dict(model=common_pb2.ModelInfo(dimension=DIM)), "fingerprint"),
    ],
)
def test_write_bundle_rejects_bad_input(tmp_path, change, message):
    """Each malformed argument is refused with a message naming the problem, and nothing is written."""
    args = dict(
        ids=["a", "b", "c"], urls=["u1", "u2", "u3"], vectors=np.ones((3, DIM), np.float32), model=model(),
        metric="angular", trees=2,
    )
    args.update(change)
    with pytest.raises(InvalidBundleInput) as excinfo:
        write_bundle(tmp_path / "b", **args)
    assert message in error_message(excinfo)
    assert isinstance(excinfo.value, ValueError) and isinstance(excinfo.value, BundleError)
    assert list_versions(tmp_path / "b") == []


# ---------------------------------------------------------------- open_bundle refusals


def rewrite_manifest(folder: Path, **changes) -> None:
    path = folder / MANIFEST_FILE
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_refuses_a_missing_folder(tmp_path):
    """A path that does not exist: says so and how to build a bundle."""
    with pytest.raises(BundleError) as excinfo:
        open_bundle(tmp_path / "nothing-here")
    assert "does not exist" in error_message(excinfo)
    assert "cbir index build" in error_message(excinfo)


def test_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    """An empty folder is neither a root nor a version; a root without `current` lists its versions."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="neither a current file"):
        open_bundle(tmp_path / "empty")
    path = build(tmp_path / "b")
    (tmp_path / "b" / CURRENT_FILE).unlink()
    with pytest.raises(BundleError) as excinfo:
        open_bundle(tmp_path / "b")
    assert path.name in error_message(excinfo) and "no current file" in error_message(excinfo)


def test_refuses_current_naming_a_missing_version(tmp_path):
    """`current` naming a version that is not there: names it and the versions that are."""
    path = build(tmp_path / "b")
    (tmp_path / "b" / CURRENT_FILE).write_text("20990101T000000Z\n")
    with pytest.raises(BundleError) as excinfo:
        open_bundle(tmp_path / "b")
    assert "20990101T000000Z" in error_message(excinfo) and path.name in error_message(excinfo)


@pytest.mark.parametrize("name", [INDEX_FILE, ITEMS_FILE, FEATURES_FILE, PCA_FILE])
def test_refuses_a_missing_file(tmp_path, name):
    """Any file the manifest lists, gone: the message names it and says the bundle is incomplete."""
    path = build(tmp_path / "b", pca_dimension=6)
    (path / name).unlink()
    with pytest.raises(BundleError) as excinfo:
        open_bundle(tmp_path / "b")
    assert str(path / name) in error_message(excinfo) and "missing" in error_message(excinfo)


def test_refuses_a_truncated_index(tmp_path):
    """index.ann cut short (a copy interrupted): size differs from the manifest; even without checksums."""
    path = build(tmp_path / "b")
    size = (path / INDEX_FILE).stat().st_size
    with open(path / INDEX_FILE, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(BundleError) as excinfo:
        open_bundle(tmp_path / "b", verify_checksums=False)
    message = error_message(excinfo)
    assert INDEX_FILE in message and "truncated" in message and str(size) in message


def test_refuses_a_checksum_mismatch_unless_checksums_are_skipped(tmp_path):
    """A flipped byte (same size) fails sha256 verification; verify_checksums=False skips that check."""
    path = build(tmp_path / "b")
    target = path / FEATURES_FILE
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError) as excinfo:
        open_bundle(tmp_path / "b")
    assert FEATURES_FILE in error_message(excinfo) and "checksum" in error_message(excinfo)
    open_bundle(tmp_path / "b", verify_checksums=False).close()


def test_refuses_an_unknown_format_version(tmp_path):
    """format_version 2: says which version it reads."""
    path = build(tmp_path / "b")
    rewrite_manifest(path, format_version=2)
    with pytest.raises(BundleError) as excinfo:
        open_bundle(tmp_path / "b")
    assert "format_version 2" in error_message(excinfo) and "reads format_version 1" in error_message(excinfo)


def test_refuses_a_corrupt_manifest(tmp_path):
    """A manifest that is not JSON, or lacks a field, is refused naming the file or field."""
    path = build(tmp_path / "b")
    (path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match=MANIFEST_FILE):
        open_bundle(tmp_path / "b")
    path = build(tmp_path / "c")
    data = json.loads((path / MANIFEST_FILE).read_text())
    del data["metric"]
    (path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="'metric' is missing"):
        open_bundle(tmp_path / "c")


MANIFEST_KEYS = [
    "format_version", "name", "version", "created_at", "model", "input_dimension", "index_dimension", "metric",
    "trees", "item_count", "default_search_k", "pca", "source", "files",
]


def test_the_manifest_keeps_its_keys_and_reads_back_to_the_same_text(tmp_path):
    """manifest.json has the format's keys in their order, and reading then writing it gives the same bytes."""
    path = build(tmp_path / "b", pca_dimension=6)
    text = (path / MANIFEST_FILE).read_text(encoding="utf-8")
    assert list(json.loads(text)) == MANIFEST_KEYS
    with open_bundle(tmp_path / "b") as b:
        assert b.manifest.to_json() == text


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(trees="5"), "field 'trees' must be an integer, found str '5'"),
        (dict(item_count=True), "field 'item_count' must be an integer, found bool True"),
        (dict(trees=0), "field 'trees' must be >= 1, found 0"),
        (dict(metric="cosine"), "field 'metric' must be one of 'angular', 'euclidean' or 'manhattan', found 'cosine'"),
        (dict(name=3), "field 'name' must be a string, found int 3"),
        (dict(model="vgg16"), "field 'model' must be a JSON object, found str 'vgg16'"),
        (dict(pca={"dimension": 6}), "field pca['whiten'] is missing"),
        (dict(files={INDEX_FILE: {"sha256": "00", "bytes": "12"}}),
         "field files['index.ann']['bytes'] must be an integer, found str '12'"),
        (dict(source=None), "field 'source' must be a string, found NoneType None"),
    ],
)
def test_a_manifest_field_of_the_wrong_type_is_named_in_plain_words(tmp_path, change, message):
    """A wrong type or value is a BundleError naming the file, the field, what it must be and what it holds;
    no pydantic error dump."""
    path = build(tmp_path / "b", n=20)
    rewrite_manifest(path, **change)
    with pytest.raises(BundleError) as excinfo:
        open_bundle(tmp_path / "b")
    text = error_message(excinfo)
    assert text.startswith(f"{path / MANIFEST_FILE} is not a valid manifest: {message}; rebuild it")
    assert "validation error" not in text and "pydantic" not in text and "\n" not in text


@pytest.mark.parametrize("key", MANIFEST_KEYS[1:])
def test_a_missing_manifest_key_is_named(tmp_path, key):
    """Every key but `pca` (absent = no PCA) must be there; the message names the one missing."""
    path = build(tmp_path / "b", n=20)
    data = json.loads((path / MANIFEST_FILE).read_text())
    del data[key]
    (path / MANIFEST_FILE).write_text(json.dumps(data))
    if key == "pca":
        open_bundle(tmp_path / "b").close()
        return
    with pytest.raises(BundleError, match=f"is not a valid manifest: field '{key}' is missing; rebuild it"):
        open_bundle(tmp_path / "b")


def test_refuses_a_manifest_dimension_that_is_not_the_index_dimension(tmp_path):
    """The manifest claims another dimension than index.ann / features.npy hold."""
    path = build(tmp_path / "b")
    rewrite_manifest(path, index_dimension=DIM * 2)
    with pytest.raises(BundleError, match="index_dimension 48 does not match input_dimension 24"):
        open_bundle(tmp_path / "b")
    rewrite_manifest(path, index_dimension=DIM * 2, input_dimension=DIM * 2)
    with pytest.raises(BundleError, match="model.dimension 24 does not match input_dimension 48"):
        open_bundle(tmp_path / "b")
    data = json.loads((path / MANIFEST_FILE).read_text())
    rewrite_manifest(path, model={**data["model"], "dimension": DIM * 2})
    with pytest.raises(BundleError) as excinfo:
        open_bundle(tmp_path / "b")
    assert FEATURES_FILE in error_message(excinfo) and f"{N}, {DIM * 2}" in error_message(excinfo)


def test_refuses_an_index_of_another_dimension(tmp_path):
    """index.ann replaced by an index of another dimension (checksums updated to match): the Annoy checks catch it."""
    path = build(tmp_path / "b", d=DIM)
    other = build(tmp_path / "other", d=DIM // 2)
    os.replace(other / INDEX_FILE, path / INDEX_FILE)
    data = json.loads((path / MANIFEST_FILE).read_text())
    data["files"][INDEX_FILE] = {
        "sha256": sha256_of(path / INDEX_FILE), "bytes": (path / INDEX_FILE).stat().st_size,
    }
    (path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(BundleError) as excinfo:
        open_bundle(tmp_path / "b")
    assert INDEX_FILE in error_message(excinfo)
    assert "dimension" in error_message(excinfo)


def test_refuses_an_index_built_from_other_vectors(tmp_path):
    """index.ann of the same shape but from other vectors (checksums updated): the stored vectors no longer
    match features.npy row for row, so the id -> vector link would be wrong."""
    path = build(tmp_path / "b", seed=0)
    other = build(tmp_path / "other", seed=1)
    os.replace(other / INDEX_FILE, path / INDEX_FILE)
    data = json.loads((path / MANIFEST_FILE).read_text())
    data["files"][INDEX_FILE] = {
        "sha256": sha256_of(path / INDEX_FILE), "bytes": (path / INDEX_FILE).stat().st_size,
    }
    (path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(BundleError) as excinfo:
        open_bundle(tmp_path / "b")
    assert INDEX_FILE in error_message(excinfo) and "differs from row 0" in error_message(excinfo)
