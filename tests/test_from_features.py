"""`cbir index build-from-features`: bundles from stored vectors and ids, without the model.

Real files (.npz, .npy, id lists, CSV tables, bundles), real bundles opened with the indexer's own
code; no VGG-16 is involved, so these tests are quick.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cbir.bundle import open_bundle, write_bundle
from apps.cli import main
from apps.ingest.from_features import FeaturesError, build_from_features, load_features, save_features
from cbir.v1 import common_pb2
from services.indexer.index import SearchIndex

DIM = 24
MODEL = common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=DIM, fingerprint="vgg16-gem-test0123456789")


def vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.abs(np.random.default_rng(seed).standard_normal((n, DIM))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_npz_with_ids_urls_and_model_becomes_a_bundle_whose_rows_keep_their_ids(tmp_path):
    """Row i of the .npz is served as ids[i] with urls[i]: searching by a stored vector finds its own id first,
    the model fingerprint and the vectors are the ones given."""
    x = vectors(300)
    ids = [f"photo-{i:03d}.jpg" for i in range(300)][::-1]  # not in sorted order: the order must be kept
    urls = [f"https://example.org/{item}" for item in ids]
    source = save_features(tmp_path / "features.npz", ids=ids, vectors=x, urls=urls, model=MODEL)

    result = build_from_features(source, tmp_path / "bundle", trees=10)

    assert (result.items, result.dimension) == (300, DIM)
    with open_bundle(tmp_path / "bundle") as bundle:
        assert bundle.model_fingerprint == MODEL.fingerprint
        np.testing.assert_array_equal(bundle.features(), x)
        index = SearchIndex(bundle)
        for row in (0, 123, 299):
            best = index.query_vector(x[row], k=1, model_fingerprint=MODEL.fingerprint)[0]
            assert (best.item_id, best.url) == (ids[row], urls[row])


def test_npy_is_memory_mapped_and_ids_come_from_a_text_file(tmp_path):
    """An .npy is read as a memory map (no copy of a large matrix) and the i-th line of --ids names row i;
    the model comes from a ModelInfo JSON file."""
    x = vectors(50, seed=1)
    np.save(tmp_path / "v.npy", x)
    (tmp_path / "ids.txt").write_text("".join(f"id{i}\n" for i in range(50)))
    (tmp_path / "model.json").write_text(json.dumps({"name": "vgg16", "feature": "gem", "dimension": DIM,
                                                     "fingerprint": MODEL.fingerprint}))
    stored = load_features(tmp_path / "v.npy", ids=tmp_path / "ids.txt")
    assert isinstance(stored.vectors, np.memmap)
    assert stored.ids[:2] == ["id0", "id1"] and len(stored.ids) == 50

    build_from_features(tmp_path / "v.npy", tmp_path / "b", ids=tmp_path / "ids.txt", model=tmp_path / "model.json",
                        trees=5)
    with open_bundle(tmp_path / "b") as bundle:
        records = bundle.items_by_annoy_ids([0, 49])
        assert [r.item_id for r in records] == ["id0", "id49"]
        assert bundle.manifest.source.endswith("v.npy")


def test_csv_ids_table_gives_urls_from_paths_and_metadata_from_other_columns(tmp_path):
    """A CSV --ids table: id column, a path (stored as a file:// URL relative to the table) or URL, other
    columns kept as the item's metadata."""
    x = vectors(3, seed=2)
    np.save(tmp_path / "v.npy", x)
    (tmp_path / "ids.csv").write_text("id,path,label\na,img/a.jpg,cat\nb,https://example.org/b.jpg,dog\nc,,\n")
    build_from_features(tmp_path / "v.npy", tmp_path / "b", ids=tmp_path / "ids.csv", model=MODEL, trees=2)
    with open_bundle(tmp_path / "b") as bundle:
        a, b, c = bundle.find_items(["a", "b", "c"])
    assert a.url == (tmp_path / "img" / "a.jpg").resolve().as_uri() and a.metadata == {"label": "cat"}
    assert b.url == "https://example.org/b.jpg" and b.metadata == {"label": "dog"}
    assert c.url == "" and c.metadata == {}


def test_a_bundle_is_re_indexed_with_pca_keeping_ids_urls_metadata_and_model(tmp_path):
    """SOURCE = an existing bundle: its stored features, items and model are reused; only the index settings
    change (here PCA to 8-d and euclidean), and the stored input vectors stay the same."""
    x = vectors(120, seed=3)
    write_bundle(tmp_path / "old", ids=[f"i{i}" for i in range(120)], urls=[f"file:///p/{i}.jpg" for i in range(120)],
                 metadata=[{"n": str(i)} for i in range(120)], vectors=x, model=MODEL, metric="angular", trees=4)
    build_from_features(tmp_path / "old", tmp_path / "new", metric="euclidean", trees=6, pca_dimension=8)
    with open_bundle(tmp_path / "new") as new:
        assert (new.manifest.metric, new.manifest.trees, new.manifest.index_dimension) == ("euclidean", 6, 8)
        assert new.model_fingerprint == MODEL.fingerprint
        np.testing.assert_array_equal(new.features(), x)
        record = new.find_items(["i7"])[0]
        assert (record.annoy_id, record.url, record.metadata) == (7, "file:///p/7.jpg", {"n": "7"})


def test_re_indexing_a_bundle_leaves_out_the_ids_on_its_deletion_list(tmp_path):
    """Items deleted from the collection (the bundle root's deletion list) do not come back when the bundle is
    re-indexed into another root; the remaining rows keep their own vectors."""
    from cbir.bundle import add_deleted

    x = vectors(10, seed=6)
    write_bundle(tmp_path / "old", ids=[f"i{i}" for i in range(10)], urls=[""] * 10, vectors=x, model=MODEL,
                 metric="angular", trees=2)
    add_deleted(tmp_path / "old", ["i3", "i8"])
    result = build_from_features(tmp_path / "old", tmp_path / "new", trees=2)
    assert result.items == 8
    with open_bundle(tmp_path / "new") as new:
        assert new.find_items(["i3", "i8"]) == [None, None]
        kept = [i for i in range(10) if i not in (3, 8)]
        np.testing.assert_array_equal(new.features(), x[kept])
        assert [r.item_id for r in new.items_by_annoy_ids(range(8))] == [f"i{i}" for i in kept]


@pytest.mark.parametrize("case, message", [
    ("count", "30 vectors but 29 ids"),
    ("no-model", "does not say which model"),
    ("dimension", "cannot come from that model"),
    ("npy-without-ids", "give their ids with --ids"),
    ("pickle", "pickles are never loaded"),
])
def test_unusable_features_are_refused_with_a_reason(tmp_path, case, message):
    """Ids that do not match the rows, an unknown model, vectors of another dimension than the model's, an .npy
    without ids, and an object (pickled) id array are refused before anything is written."""
    x = vectors(30, seed=4)
    np.save(tmp_path / "v.npy", x)
    (tmp_path / "ids.txt").write_text("".join(f"id{i}\n" for i in range(29 if case == "count" else 30)))
    kwargs = dict(ids=tmp_path / "ids.txt", model=MODEL)
    source = tmp_path / "v.npy"
    if case == "no-model":
        kwargs["model"] = None
    elif case == "dimension":
        kwargs["model"] = common_pb2.ModelInfo(name="vgg16", feature="fc1", dimension=4096, fingerprint="fc1-x")
    elif case == "npy-without-ids":
        kwargs["ids"] = None
    elif case == "pickle":
        source = tmp_path / "p.npz"
        np.savez(source, vectors=x, ids=np.array([f"id{i}" for i in range(30)], dtype=object))
        kwargs["ids"] = None
    with pytest.raises(FeaturesError, match=message):
        build_from_features(source, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_builds_with_the_same_index_defaults_as_index_build(tmp_path):
    """`cbir index build-from-features` writes a bundle and, for settings not given, uses `cbir index build`'s
    defaults (metric, trees, PCA), so both commands index alike; --model-info may name a bundle."""
    x = vectors(40, seed=5)
    write_bundle(tmp_path / "ref", ids=["r"] * 1 + [f"r{i}" for i in range(1, 40)], urls=[""] * 40, vectors=x,
                 model=MODEL, metric="angular", trees=2)
    np.save(tmp_path / "v.npy", x)
    (tmp_path / "ids.txt").write_text("".join(f"id{i}\n" for i in range(40)))
    result = CliRunner().invoke(main, ["index", "build-from-features", str(tmp_path / "v.npy"), "--ids",
                                       str(tmp_path / "ids.txt"), "--model-info", str(tmp_path / "ref"),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "with 40 vectors (24-d)" in result.output
    defaults = {p.name: p.default for p in main.commands["index"].commands["build"].params}
    with open_bundle(tmp_path / "out") as bundle:
        m = bundle.manifest
        assert (m.metric, m.trees, m.pca.dimension if m.pca else 0) == (
            defaults["metric"], defaults["trees"], defaults["pca_dimension"])
        assert bundle.model_fingerprint == MODEL.fingerprint

    bad = CliRunner().invoke(main, ["index", "build-from-features", str(tmp_path / "v.npy"),
                                    "--out", str(tmp_path / "out2")])
    assert bad.exit_code != 0 and "--ids" in bad.output
