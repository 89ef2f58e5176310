"""Listing collections for `cbir index build`: folders, CSV and JSONL manifests, and their errors."""

import json
import pathlib

import numpy as np
import pytest

from cbir.download import FetchError
from apps.ingest.sources import read_bytes
from apps.ingest.pipeline import chunked, ordered_map
from apps.ingest.shards import ShardStore
from apps.ingest.sources import SourceError, SourceItem, list_source


def _touch(path: pathlib.Path, data: bytes = b"x") -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_is_listed_recursively_with_relative_ids_and_file_uris(tmp_path):
    """Ids are the folder-relative paths (stable across machines); URLs are absolute file:// URIs;
    files that are not images by their suffix are left out."""
    _touch(tmp_path / "b.jpg")
    _touch(tmp_path / "sub" / "a.PNG")
    _touch(tmp_path / "notes.txt")
    items = list_source(tmp_path)
    assert [item.item_id for item in items] == ["b.jpg", "sub/a.PNG"]
    assert items[1].url == (tmp_path / "sub" / "a.PNG").resolve().as_uri()
    assert items[1].location == str((tmp_path / "sub" / "a.PNG").resolve())


def test_csv_manifest_resolves_relative_paths_and_keeps_extra_columns_as_metadata(tmp_path):
    """Open Images style columns (ImageID, OriginalURL) and plain ones (id, path) both work."""
    _touch(tmp_path / "img" / "one.jpg")
    manifest = tmp_path / "list.csv"
    manifest.write_text("id,path,title\nfirst,img/one.jpg,A cat\n")
    openimages = tmp_path / "oi.csv"
    openimages.write_text("ImageID,Subset,OriginalURL\nabc123,train,https://example.org/a.jpg\n")
    (item,) = list_source(manifest)
    assert item == SourceItem("first", str((tmp_path / "img" / "one.jpg").resolve()),
                              (tmp_path / "img" / "one.jpg").resolve().as_uri(), {"title": "A cat"})
    (remote,) = list_source(openimages)
    assert (remote.item_id, remote.location, remote.url, remote.metadata) == (
        "abc123", "https://example.org/a.jpg", "https://example.org/a.jpg", {"Subset": "train"})


def test_jsonl_manifest(tmp_path):
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"item_id": "x", "url": "http://h/x.png", "tag": 3}) + "\n\n")
    (item,) = list_source(manifest)
    assert (item.item_id, item.url, item.metadata) == ("x", "http://h/x.png", {"tag": "3"})


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("dup.csv", "id,path\na,x.jpg\na,y.jpg\n", "appears more than once"),
        ("cols.csv", "name,file\na,x.jpg\n", "each row needs an id"),
        ("bad.jsonl", '{"id": "a", "path": "x.jpg"}\nnot json\n', ":2: not valid JSON"),
        ("list.jsonl", '["a", "x.jpg"]\n', "expected a JSON object"),
        ("list.txt", "a x.jpg\n", "not a folder, .csv or .jsonl"),
    ],
)
def test_bad_manifests_are_refused_with_the_line_and_the_reason(tmp_path, name, content, message):
    manifest = tmp_path / name
    manifest.write_text(content)
    with pytest.raises(SourceError, match=message):
        list_source(manifest)


def test_missing_source_is_refused(tmp_path):
    with pytest.raises(SourceError, match="no such folder or manifest"):
        list_source(tmp_path / "nowhere")


def test_read_bytes_enforces_the_size_limit_and_reports_missing_files(tmp_path):
    big = _touch(tmp_path / "big.jpg", b"0" * 100)
    item = SourceItem("big", str(big), big.as_uri())
    assert read_bytes(item, max_bytes=100) == b"0" * 100
    with pytest.raises(FetchError, match="over the 99-byte limit"):
        read_bytes(item, max_bytes=99)
    with pytest.raises(FetchError, match="cannot read"):
        read_bytes(SourceItem("gone", str(tmp_path / "gone.jpg"), ""), max_bytes=100)


def test_ordered_map_keeps_order_and_bounds_the_work_queued():
    """Results come back in input order even when later tasks finish first, and the input is
    consumed lazily (at most `lookahead` ahead of the consumer)."""
    import time

    consumed = []

    def produce():
        for number in range(20):
            consumed.append(number)
            yield number

    def slow_for_small(number):
        time.sleep(0.01 * (5 - number % 5))
        return number * 2

    results = ordered_map(slow_for_small, produce(), workers=4, lookahead=3)
    first = next(results)
    assert first == 0
    assert len(consumed) <= 4
    assert [first, *results] == [2 * n for n in range(20)]
    assert list(chunked(range(5), 2)) == [[0, 1], [2, 3], [4]]


def test_shards_keep_ids_with_vectors_and_survive_a_restart(tmp_path):
    """What one run stored (vectors, local features and rejects, each with its id) a second run loads back."""
    store = ShardStore(tmp_path / "work", shard_size=2)
    store.add("a", np.array([1, 2, 3], np.float32), b"local-a")
    store.add("b", np.array([4, 5, 6], np.float32))  # fills the shard: written
    store.add_reject("c", "cannot decode")
    store.flush()
    vectors, rejects, local, hashes = ShardStore(tmp_path / "work").load()
    assert sorted(vectors) == ["a", "b"] and vectors["b"].tolist() == [4, 5, 6]
    assert sorted(hashes) == ["a", "b"]  # a PDQ record per stored item (empty when none was computed)
    assert local == {"a": b"local-a", "b": b""}
    assert rejects == {"c": "cannot decode"}
    assert len(list((tmp_path / "work").glob("shard-*.npz"))) == 2
