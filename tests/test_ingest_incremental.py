"""Growing collections: `--incremental` builds reuse the live version's vectors and embed only what is
new; deletion lists (the root's deleted.txt and `--deleted FILE`) keep items out of new versions; the
CLI commands that manage them (`index delete/undelete/reload`, `index build --incremental`)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from apps import cli
from cbir.bundle import add_deleted, list_versions, read_deleted
from apps.ingest.build import BuildOptions, build_index
from apps.ingest.sources import SourceError
from cbir.v1 import common_pb2
from test_ingest_resume import ColourEmbedding, bundle_contents, draw_collection, local_features_of

OPTIONS = BuildOptions(batch_size=4, trees=3, progress=False)


def incremental(**changes) -> BuildOptions:
    return BuildOptions(**{**OPTIONS.__dict__, "incremental": True, **changes})


def test_an_incremental_build_embeds_only_the_new_images_and_keeps_the_old_vectors(tmp_path):
    """v1 from 10 images; 4 more are added to the folder: v2 embeds 4, holds 14 items (the old ones first,
    with bit-identical vectors and the same local features), and v1 stays on disk."""
    source = tmp_path / "photos"
    names = draw_collection(source, 10)
    root = tmp_path / "bundle"
    build_index(source, root, ColourEmbedding(), OPTIONS)
    v1_ids, v1_vectors = bundle_contents(root)
    more = draw_collection(tmp_path / "more", 14)[10:]
    for name in more:
        shutil.copy(tmp_path / "more" / name, source / name)

    model = ColourEmbedding()
    result = build_index(source, root, model, incremental())
    ids, vectors = bundle_contents(root)
    assert sum(model.embedded) == 4 and (result.embedded, result.reused) == (4, 10)
    assert ids == names + more and ids[:10] == v1_ids
    np.testing.assert_array_equal(vectors[:10], v1_vectors)
    assert len(list_versions(root)) == 2
    local = local_features_of(root)
    assert all(np.array_equal(np.frombuffer(blob, np.float32) + 0.01, v) for blob, v in zip(local, vectors)), \
        "local features not carried with their items"


def test_items_missing_from_the_new_source_stay_and_changed_metadata_is_taken(tmp_path):
    """An incremental build adds to the collection: a manifest listing only new rows keeps the old items;
    a row for an old id updates its URL/metadata without embedding it again."""
    folder = tmp_path / "img"
    draw_collection(folder, 6)
    first = tmp_path / "first.csv"
    first.write_text("id,path,title\n" + "".join(f"a{i},img/img{i:03d}.png,old {i}\n" for i in range(4)))
    root = tmp_path / "bundle"
    build_index(first, root, ColourEmbedding(), OPTIONS)
    second = tmp_path / "second.csv"
    second.write_text("id,path,title\na1,img/img001.png,renamed\nb4,img/img004.png,new\nb5,img/img005.png,new\n")
    model = ColourEmbedding()
    build_index(second, root, model, incremental())
    from cbir.bundle import open_bundle

    with open_bundle(root) as bundle:
        records = {r.item_id: r.metadata["title"] for r in bundle.iter_items()}
    assert records == {"a0": "old 0", "a1": "renamed", "a2": "old 2", "a3": "old 3", "b4": "new", "b5": "new"}
    assert sum(model.embedded) == 2


def test_deleted_items_are_left_out_of_full_and_incremental_builds(tmp_path):
    """Ids on the root's deleted.txt, and those of `deleted=`, are in no new version, whether the build is
    full or incremental; taking an id off the list lets the next build index it again."""
    source = tmp_path / "photos"
    names = draw_collection(source, 8)
    root = tmp_path / "bundle"
    build_index(source, root, ColourEmbedding(), OPTIONS)
    add_deleted(root, [names[1], names[5]])

    result = build_index(source, root, ColourEmbedding(), incremental(deleted=frozenset({names[2]})))
    assert bundle_contents(root)[0] == [n for i, n in enumerate(names) if i not in (1, 2, 5)]
    assert result.deleted == 3
    full = build_index(source, root, ColourEmbedding(), OPTIONS)
    assert bundle_contents(root)[0] == [n for i, n in enumerate(names) if i not in (1, 5)]
    assert full.deleted == 2

    from cbir.bundle import remove_deleted

    remove_deleted(root, [names[1]])
    model = ColourEmbedding()
    build_index(source, root, model, incremental())
    assert names[1] in bundle_contents(root)[0] and sum(model.embedded) == 1


def test_an_incremental_build_refuses_another_model_or_a_missing_bundle(tmp_path):
    source = tmp_path / "photos"
    draw_collection(source, 3)
    with pytest.raises(SourceError, match="needs a bundle to add to"):
        build_index(source, tmp_path / "none", ColourEmbedding(), incremental())
    build_index(source, tmp_path / "bundle", ColourEmbedding(), OPTIONS)

    class OtherModel(ColourEmbedding):
        info = common_pb2.ModelInfo(name="other", feature="x", dimension=6, fingerprint="fp-other")

    with pytest.raises(SourceError, match="fp-colour.*fp-other|vectors of two models"):
        build_index(source, tmp_path / "bundle", OtherModel(), incremental())


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_delete_undelete_and_build_with_incremental_and_a_deleted_file(tmp_path, monkeypatch):
    """`cbir index delete ROOT ID... --file`, `undelete`, and `cbir index build --incremental --deleted FILE
    --shard-size N` (with the stand-in model in place of VGG-16)."""
    monkeypatch.setattr(cli, "_embedding", lambda *args, **kwargs: ColourEmbedding())
    source = tmp_path / "photos"
    names = draw_collection(source, 6)
    root = tmp_path / "bundle"
    runner = CliRunner()
    result = runner.invoke(cli.main, ["index", "build", str(source), "--out", str(root), "--no-progress", "--trees", "3"])
    assert result.exit_code == 0, result.output

    ids_file = tmp_path / "gone.txt"
    ids_file.write_text(f"{names[0]}\n{names[1]}\n")
    result = runner.invoke(cli.main, ["index", "delete", str(root), names[2], "--file", str(ids_file)])
    assert result.exit_code == 0, result.output
    assert "3 ids added" in result.output and read_deleted(root) == {names[0], names[1], names[2]}
    result = runner.invoke(cli.main, ["index", "undelete", str(root), names[0]])
    assert "1 ids taken off" in result.output

    extra = tmp_path / "extra.txt"
    extra.write_text(names[3] + "\n")
    result = runner.invoke(cli.main, ["index", "build", str(source), "--out", str(root), "--no-progress", "--trees", "3",
                                      "--incremental", "--deleted", str(extra), "--shard-size", "2"])
    assert result.exit_code == 0, result.output
    assert "0 embedded, 3 reused, 3 left out as deleted" in result.output
    assert bundle_contents(root)[0] == [names[0], names[4], names[5]]

    result = runner.invoke(cli.main, ["index", "delete", str(root)])
    assert result.exit_code != 0 and "give item ids" in result.output
