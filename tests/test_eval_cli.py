"""`cbir eval` as a user runs it: tables on stdout, the JSON report on disk, clear errors for bad input."""

import json
import shutil

import pytest
from click.testing import CliRunner

from apps.cli import main
from conftest import DEMO_PHOTOS


@pytest.mark.slow
def test_eval_copies_prints_tables_and_writes_json(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("skimage-coffee.jpg", "plasma-kite.jpg", "opencv-fruits.jpg"):
        shutil.copy(DEMO_PHOTOS / name, folder / name)
    (folder / "empty.png").write_bytes(b"")
    report = tmp_path / "report.json"

    result = CliRunner().invoke(main, ["eval", "copies", str(folder), "--weights", "random", "--edits", "jpeg,flip",
                                       "--json", str(report), "--no-progress", "--search-k", "0"])

    assert result.exit_code == 0, result.output
    assert "Copy detection: 6 queries (2 edits) of 3 originals, 3 images indexed (0 distractors)" in result.output
    assert "| family" in result.output and "| **all**" in result.output
    assert "recall@50 vs exact" not in result.output and "recall@3 vs exact" in result.output  # k capped at the items
    assert "empty.png: " in result.output and "empty" in result.output.split("empty.png: ")[1].splitlines()[0]  # the reject, with its reason
    data = json.loads(report.read_text())
    assert data["protocol"] == "copies" and data["index_spec"]["metric"] == "angular"
    assert data["copies"]["queries"] == 6 and set(data["copies"]["per_family"]) == {"jpeg", "flip"}
    assert all("top1" in row for row in data["copies"]["per_query"])
    assert data["embedding"]["model"]["weights_source"] == "random:0"


def test_eval_errors_are_messages_not_tracebacks(tmp_path):
    """Empty manifest, a folder without groups, an unknown edit or model: exit status 1 or 2 and a sentence."""
    runner = CliRunner()
    empty = tmp_path / "empty.csv"
    empty.write_text("id,path\n")
    result = runner.invoke(main, ["eval", "copies", str(empty), "--weights", "random", "--no-progress"])
    assert result.exit_code == 1 and "lists no images" in result.output and "Traceback" not in result.output

    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(DEMO_PHOTOS / "plasma-kite.jpg", flat / "kite.jpg")
    result = runner.invoke(main, ["eval", "groups", str(flat), "--weights", "random", "--no-progress"])
    assert result.exit_code == 1 and "no image has a group" in result.output and "--from-edits" in result.output

    result = runner.invoke(main, ["eval", "copies", str(flat), "--edits", "crop,blur"])
    assert result.exit_code == 2 and "unknown edit(s) blur" in result.output
    result = runner.invoke(main, ["eval", "compare", str(flat), "--model", "vit"])
    assert result.exit_code == 2 and "is not FEATURE[-POOLING]" in result.output


def test_eval_edits_writes_one_image_per_edit(tmp_path):
    result = CliRunner().invoke(main, ["eval", "edits", str(DEMO_PHOTOS / "plasma-kite.jpg"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"plasma-kite.{e}.jpg" for e in ("crop", "rescale", "jpeg", "rotate", "colour", "flip", "caption", "combined"))
