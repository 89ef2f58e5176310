"""PDQ hashes (`cbir.pdq`) of real photos, and how `cbir index build` stores them: one record per item in the
bundle's `pdq.npy`, carried through resumed and incremental builds; a build without `pdqhash` stores none."""

from __future__ import annotations

import io
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image
from test_ingest_resume import ColourEmbedding, draw_collection

from apps.ingest.build import BuildOptions, build_index
from apps.ingest.shards import ShardStore
from cbir import pdq
from cbir.bundle import open_bundle

PHOTOS = pathlib.Path(__file__).resolve().parent.parent / "demo" / "photos"
OPTIONS = BuildOptions(batch_size=4, trees=3, progress=False)
PDQHASH = pdq.load_pdqhash()


def encoded(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_mirrored_rotated_and_recompressed_photos_are_the_same_image_and_other_photos_are_not():
    photo = Image.open(PHOTOS / "skimage-chelsea.jpg").convert("RGB")
    original = pdq.hash_bytes(PDQHASH, encoded(photo))
    assert pdq.usable(original)
    for copy in (photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), photo.transpose(Image.Transpose.ROTATE_270),
                 photo.resize((photo.width // 3, photo.height // 3))):
        assert pdq.distance(original, pdq.hash_bytes(PDQHASH, encoded(copy, quality=50))) <= pdq.MATCH_BITS
    other = pdq.hash_bytes(PDQHASH, (PHOTOS / "skimage-coffee.jpg").read_bytes())
    assert pdq.distance(original, other) > 3 * pdq.MATCH_BITS


def test_bytes_that_are_no_image_have_no_hash():
    record = pdq.hash_bytes(PDQHASH, b"not an image")
    assert int(record["quality"]) == pdq.NO_HASH and not pdq.usable(record)


def test_the_build_stores_each_items_hash_and_an_incremental_build_keeps_them(tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    for name in ("opencv-baboon.jpg", "skimage-coffee.jpg", "opencv-fruits.jpg"):
        shutil.copy(PHOTOS / name, source / name)
    root = tmp_path / "bundle"
    build_index(source, root, ColourEmbedding(), OPTIONS)
    shutil.copy(PHOTOS / "skimage-astronaut.jpg", source / "skimage-astronaut.jpg")
    build_index(source, root, ColourEmbedding(), BuildOptions(**{**OPTIONS.__dict__, "incremental": True}))
    with open_bundle(root) as bundle:
        ids = [record.item_id for record in bundle.iter_items()]
        stored = np.array(bundle.pdq)
        assert "pdq.npy" in bundle.manifest.files
    assert ids[-1] == "skimage-astronaut.jpg" and len(ids) == 4
    for item_id, record in zip(ids, stored):
        expected = pdq.hash_bytes(PDQHASH, (source / item_id).read_bytes())
        assert int(record["quality"]) == int(expected["quality"]) >= pdq.MIN_QUALITY
        np.testing.assert_array_equal(record["hashes"], expected["hashes"])


def test_without_pdqhash_the_bundle_has_no_hashes(tmp_path, monkeypatch):
    draw_collection(tmp_path / "img", 3)
    monkeypatch.setattr(pdq, "load_pdqhash", lambda: None)
    build_index(tmp_path / "img", tmp_path / "bundle", ColourEmbedding(), OPTIONS)
    with open_bundle(tmp_path / "bundle") as bundle:
        assert bundle.pdq is None and "pdq.npy" not in bundle.manifest.files


def test_shards_keep_the_hashes_and_older_shards_load_without(tmp_path):
    store = ShardStore(tmp_path / "work", shard_size=2)
    record = pdq.hash_bytes(PDQHASH, (PHOTOS / "opencv-baboon.jpg").read_bytes())
    store.add("a", np.ones(4, np.float32), b"x", record)
    store.add("b", np.ones(4, np.float32), b"y")  # no hash
    (shard,) = (tmp_path / "work").glob("shard-*.npz")
    _, _, _, hashes = ShardStore(tmp_path / "work").load()
    np.testing.assert_array_equal(hashes["a"]["hashes"], record["hashes"])
    assert int(hashes["b"]["quality"]) == pdq.NO_HASH

    with np.load(shard) as data:  # a shard written before PDQ was stored
        members = {name: data[name] for name in data.files if name != "pdq"}
    np.savez(shard, **members)
    _, _, _, hashes = ShardStore(tmp_path / "work").load()
    assert {key: int(value["quality"]) for key, value in hashes.items()} == {"a": pdq.NO_HASH, "b": pdq.NO_HASH}


@pytest.mark.parametrize("count", [0, 2])
def test_bundle_refuses_pdq_records_of_another_length(tmp_path, count):
    from cbir.bundle import InvalidBundleInput, write_bundle
    from cbir.v1 import common_pb2

    with pytest.raises(InvalidBundleInput, match=f"{count} PDQ records for 3 items"):
        write_bundle(tmp_path, ids=["a", "b", "c"], urls=["a", "b", "c"], vectors=np.eye(3, dtype=np.float32),
                     model=common_pb2.ModelInfo(name="m", dimension=3, fingerprint="f"), metric="angular", trees=2,
                     pdq=pdq.empty(count))
