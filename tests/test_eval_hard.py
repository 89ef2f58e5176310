"""The hard evaluation (issue 10): nested labelled groups with distractors, DISC21-style augly copies,
gallery sizes, group-weighted mAP, paired differences, generic model settings. Generated images only
(Pillow), the random-weights embedder; devbench is never needed."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from apps.eval import copies, metrics
from apps.eval.embedding import ModelSpec
from apps.eval.indexes import gallery_levels
from apps.eval.protocols import groups_summary
from apps.eval.run import EvalOptions, run_copies, run_groups
from apps.ingest.embedding import LocalEmbedding


def picture(seed: int, size=(160, 120)) -> Image.Image:
    """A distinct, textured photo-like image: a gradient and random shapes drawn from `seed`."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(rng.integers(0, 128, 3), rng.integers(128, 256, 3), w)[None, :, :].repeat(h, 0)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(5, 30))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
    return image


def save(image: Image.Image, path, quality=92):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=quality)


@pytest.fixture(scope="module")
def embedding(random_embedder):
    return LocalEmbedding(random_embedder)


def options(**changes) -> EvalOptions:
    return EvalOptions(model=ModelSpec(weights="random"), progress=False, **changes)


# ------------------------------------------------------------------------------------- metrics


def test_group_weighted_map_differs_from_query_weighted_on_a_hand_made_ranking():
    """A big easy group (4 queries, AP 1) and a small hard one (2 queries, AP 0): query-weighted mAP is
    4/6, group-weighted 1/2 — the small groups count as much as the big ones."""
    rows = [{"query": f"big{i}", "group": "big", "ap": 1.0, "r1": 1.0, "r5": 1.0, "r10": 1.0} for i in range(4)]
    rows += [{"query": f"small{i}", "group": "small", "ap": 0.0, "r1": 0.0, "r5": 0.0, "r10": 0.0} for i in range(2)]
    summary = groups_summary(rows)
    assert summary["map"] == pytest.approx(4 / 6)
    assert summary["map_groups"] == pytest.approx(0.5)
    assert summary["groups"] == 2 and summary["queries"] == 6


def test_bootstrap_interval_of_paired_differences_is_seeded_and_resamples_clusters():
    """No difference -> [0, 0]; a constant gain -> that gain exactly; a gain in one cluster only -> an
    interval that spans the cluster-level uncertainty (reaches 0); the same seed gives the same interval."""
    clusters = ["a", "a", "b", "c", "d"]
    assert metrics.bootstrap_interval([0.0] * 5, clusters) == (0.0, 0.0, 0.0)
    assert metrics.bootstrap_interval([0.2] * 5, clusters) == pytest.approx((0.2, 0.2, 0.2))
    one = [0.5, 0.5, 0, 0, 0]
    mean, low, high = metrics.bootstrap_interval(one, clusters, seed=3)
    assert mean == pytest.approx(0.2) and low == 0.0 and high > mean
    assert metrics.bootstrap_interval(one, clusters, seed=3) == (mean, low, high)
    assert metrics.bootstrap_interval(one, clusters, weighting="group")[0] == pytest.approx(0.125)


def test_gallery_subsets_are_nested_seeded_and_keep_the_core():
    core, extra = ["q1", "q2"], [f"d{i}" for i in range(50)]
    levels = gallery_levels(core, extra, [10, 0, "all", 100, 30], seed=4)
    assert [(label, n) for label, n, _ in levels] == [("0", 0), ("10", 10), ("30", 30), ("all", 50)]
    for (_, _, small), (_, _, big) in zip(levels, levels[1:]):
        assert small == big[:len(small)]  # nested: each gallery extends the smaller one
    assert all(ids[:2] == core for _, _, ids in levels)
    assert levels == gallery_levels(core, extra, [10, 0, "all", 100, 30], seed=4)
    assert levels[1][2] != gallery_levels(core, extra, [10], seed=5)[0][2]


# ------------------------------------------------------------------------------------- augly copies


def test_every_copy_family_makes_a_valid_different_image_deterministically():
    """Each family: a decodable JPEG unlike the original, the same bytes for the same (seed, key), other
    bytes for another seed (except the mirror and grayscale, which draw nothing)."""
    original = picture(1, (200, 150))
    backgrounds = [lambda i=i: picture(100 + i, (240, 180)) for i in range(4)]
    reference = np.asarray(original, dtype=np.float32)
    for family in copies.FAMILIES:
        first = copies.make_copy(original, family, seed=0, key="x", backgrounds=backgrounds)
        again = copies.make_copy(original, family, seed=0, key="x", backgrounds=backgrounds)
        other = copies.make_copy(original, family, seed=1, key="x", backgrounds=backgrounds)
        decoded = Image.open(io.BytesIO(first.data))
        assert decoded.format == "JPEG" and decoded.mode == "RGB", family
        assert first.data == again.data, family
        pixels = np.asarray(decoded, dtype=np.float32)
        if pixels.shape == reference.shape:
            assert np.abs(pixels - reference).mean() > 2.0, family
        if family not in ("mirror", "grayscale"):
            assert other.data != first.data, family
    assert copies.make_copy(original, "jpeg", seed=0, key="x").params["quality"] <= 10
    area = copies.make_copy(original, "crop", seed=0, key="x").params["area"]
    assert 0.25 <= area <= 0.35
    with pytest.raises(ValueError, match="needs 3 photo"):
        copies.make_copy(original, "collage", seed=0, key="x", backgrounds=backgrounds[:2])
    with pytest.raises(ValueError, match="unknown copy family blurr"):
        copies.parse_families("crop,blurr")


def test_perspective_coefficients_map_output_corners_to_input_corners():
    src = [(0, 0), (100, 0), (100, 80), (0, 80)]
    dst = [(5, 10), (110, 0), (95, 90), (0, 70)]
    a, b, c, d, e, f, g, h = copies.perspective_coefficients(dst, src)
    for (x, y), (u, v) in zip(dst, src):
        w = g * x + h * y + 1
        assert ((a * x + b * y + c) / w, (d * x + e * y + f) / w) == pytest.approx((u, v), abs=1e-6)


# ------------------------------------------------------------------------------------- protocols


@pytest.fixture(scope="module")
def devbench_like(tmp_path_factory):
    """groups/<dataset>/<group>/*.jpg (two datasets: one of 2 groups, one of 1) and a distractor tree."""
    root = tmp_path_factory.mktemp("bench")
    for dataset, groups in (("easy", ("g1", "g2")), ("hard", ("g3",))):
        for n, group in enumerate(groups):
            seed = hash((dataset, group)) % 1000
            for view in range(3 if group == "g1" else 2):
                image = picture(seed).rotate(5 * view)
                save(image, root / "groups" / dataset / group / f"v{view}.jpg", quality=90 - 10 * view)
    for i in range(12):
        save(picture(500 + i), root / "distractors" / ("sub" if i % 2 else "") / f"d{i}.jpg")
    return root


@pytest.mark.slow
def test_nested_groups_with_distractors_report_datasets_gallery_sizes_and_top_hits(devbench_like, embedding, tmp_path):
    """The dataset level is detected; distractors are indexed but never queries; every query row names its
    top hit and whether it is relevant; gallery sizes use the same queries over nested distractor subsets."""
    result = run_groups(devbench_like / "groups", options(), embedding=embedding,
                        distractors=devbench_like / "distractors", gallery_sizes=[4, 100, "all"])
    groups = result["groups"]
    assert result["collection"]["datasets"] == ["easy", "hard"]
    assert (groups["groups"], groups["queries"], result["collection"]["distractors"]) == (3, 7, 12)
    assert result["index"]["items"] == 7 + 12
    rows = groups["per_query"]
    assert not any(r["query"].startswith("distractor:") for r in rows)
    assert {r["dataset"] for r in rows} == {"easy", "hard"} and rows[0]["group"] == "easy/g1"
    for row in rows:
        assert row["top1"] is not None and row["top1"] != row["query"]
        assert row["top1_relevant"] == (row["top1"].rpartition("/")[0] == row["group"])
        assert row["top1_relevant"] == (row["r1"] == 1.0)
    assert set(groups["per_dataset"]) == {"easy", "hard"} and groups["per_dataset"]["hard"]["groups"] == 1
    assert groups["per_group"]["easy/g1"]["images"] == 3
    assert groups["map_groups"] == pytest.approx(np.mean([g["ap"] for g in groups["per_group"].values()]))
    sizes = result["gallery_sizes"]
    assert [(s["distractors"], s["gallery"]) for s in sizes] == [("0", 7), ("4", 11), ("all", 19)]
    assert all(s["queries"] == 7 for s in sizes)
    assert sizes[-1]["map"] == groups["map"]
    json.dumps(result)


@pytest.mark.slow
def test_augly_copies_report_families_top_hits_and_ignore_other_views(devbench_like, embedding, tmp_path):
    """Originals from a labelled-groups folder: one query per original and family; a gallery image of the
    original's own group is ignored (never the top hit, never a miss); backgrounds stay out of the gallery."""
    families = ("crop", "overlay", "mirror", "jpeg")
    result = run_copies(devbench_like / "groups", options(), families=families, originals=3, labelled=True,
                        background_count=3, distractors=devbench_like / "distractors", gallery_sizes=[2, "all"],
                        embedding=embedding)
    collection = result["collection"]
    assert collection["mode"] == "families" and collection["backgrounds"] == 3
    assert collection["queries"] == 3 * len(families) and collection["indexed"] == 7 - 3 + 12
    copies_result = result["copies"]
    assert list(copies_result["per_family"]) == list(families)
    for row in copies_result["per_query"]:
        group = row["original"].rpartition("/")[0]
        assert row["top1"] is not None
        assert row["top1"] == row["original"] or row["top1"].rpartition("/")[0] != group  # other views skipped
        assert row["top1_relevant"] == (row["rank"] == 1)
        assert row["params"] or row["family"] == "mirror"
    assert collection["ignored_views"] > 0
    assert [s["distractors"] for s in result["gallery_sizes"]] == ["2", "all"]


@pytest.mark.slow
def test_cli_groups_prints_markdown_tables_marks_cached_runs_and_diffs_two_reports(devbench_like, tmp_path):
    """`cbir eval groups --distractors` twice with a vector cache: the second run says "cached" instead of a
    stale ms/image; `cbir eval diff` of a run with itself is zero with a zero-width interval."""
    runner = CliRunner()
    args = ["eval", "groups", str(devbench_like / "groups"), "--distractors", str(devbench_like / "distractors"),
            "--weights", "random", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--search-k", "0"]
    from apps.cli import main

    first = runner.invoke(main, args + ["--json", str(tmp_path / "a.json")])
    assert first.exit_code == 0, first.output
    assert "| mAP (queries) | mAP (groups)" in first.output.replace("  ", " ") or "mAP (groups)" in first.output
    assert "Per dataset:" in first.output and "Quality at gallery size" in first.output
    assert "ms per image" in first.output and "cached (" not in first.output
    second = runner.invoke(main, args + ["--json", str(tmp_path / "b.json"), "--no-per-group"])
    assert second.exit_code == 0, second.output
    assert "cached (no image embedded" in second.output
    assert json.loads((tmp_path / "b.json").read_text())["embedding"]["ms_per_image"] is None

    diff = runner.invoke(main, ["eval", "diff", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert diff.exit_code == 0, diff.output
    assert "7 queries in common" in diff.output and "+0.000 [+0.000, +0.000]" in diff.output
    assert "| easy" in diff.output


def test_model_settings_pass_through_to_the_embedder_settings_and_unknown_keys_are_refused():
    """--set KEY=VALUE: any EmbedderSettings field (validated by it), unknown or service keys refused."""
    spec = ModelSpec(weights="random").with_settings(["scales=1,1.414", "random_seed=3"])
    assert spec.scales == (1.0, 1.414) and dict(spec.extra) == {"random_seed": "3"}
    assert spec.settings().random_seed == 3 and "random_seed=3" in spec.label
    assert ModelSpec.parse("gem:random+random_seed=2").settings().random_seed == 2
    with pytest.raises(ValueError, match="'image_sizes' is not a descriptor setting of the embedder"):
        ModelSpec().with_settings(["image_sizes=448"])
    with pytest.raises(ValueError, match="'port' is not a descriptor setting"):
        ModelSpec().with_settings(["port=1"])
    with pytest.raises(ValueError, match="model settings refused: gem_p"):
        ModelSpec().with_settings(["gem_p=-1"])
    from apps.cli import main

    result = CliRunner().invoke(main, ["eval", "groups", ".", "--set", "colour=red"])
    assert result.exit_code == 2 and "'colour' is not a descriptor setting" in result.output


def test_compare_needs_a_source_or_labelled_groups():
    from apps.cli import main

    result = CliRunner().invoke(main, ["eval", "compare"])
    assert result.exit_code == 2 and "--groups DIR" in result.output
