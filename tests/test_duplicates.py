"""`cbir duplicates` over a real bundle: demo photos plus four copies made here (a 60 % crop, a mirror, a quarter
turn, a smaller re-encoded JPEG), built by `cbir index build`'s code with the seeded random VGG-16. Random weights
make every global score ~1.0, so what these tests rely on is the robust evidence: RootSIFT inliers (the crop) and
the PDQ hashes the build stored (the mirror, the quarter turn, the re-encoded copy). Small chosen-vector bundles
cover the score rules and PDQ hashes of images that cannot be read any more."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pathlib
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from apps import duplicates as dup
from apps.cli import main
from cbir import pdq
from cbir.bundle import add_deleted, open_bundle, write_bundle
from cbir.errors import BundleError
from cbir.v1 import common_pb2

PHOTOS = pathlib.Path(__file__).resolve().parent.parent / "demo" / "photos"
ORIGINALS = [
    "skimage-astronaut.jpg", "skimage-coffee.jpg", "skimage-chelsea.jpg", "skimage-motorcycle_left.jpg",
    "opencv-baboon.jpg", "opencv-fruits.jpg", "opencv-messi5.jpg", "opencv-home.jpg",
    "lomiri-dragonfly_by_bolly.jpg",
]
COPIES = {  # copy -> its original
    "copy-crop.jpg": "opencv-home.jpg",
    "copy-mirror.jpg": "skimage-astronaut.jpg",
    "copy-rotated.jpg": "skimage-coffee.jpg",
    "copy-small.jpg": "opencv-baboon.jpg",
}
SAME_IMAGE = ("copy-mirror.jpg", "copy-rotated.jpg", "copy-small.jpg")  # PDQ's: the crop is a copy, not the same
EXPECTED = {frozenset(pair) for pair in COPIES.items()}


def make_copies(folder: pathlib.Path) -> None:
    home = Image.open(PHOTOS / "opencv-home.jpg").convert("RGB")
    w, h = home.size
    home.crop((round(w * 0.2), round(h * 0.2), round(w * 0.8), round(h * 0.8))).save(folder / "copy-crop.jpg",
                                                                                    quality=90)
    astronaut = Image.open(PHOTOS / "skimage-astronaut.jpg").convert("RGB")
    astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "copy-mirror.jpg", quality=90)
    coffee = Image.open(PHOTOS / "skimage-coffee.jpg").convert("RGB")
    coffee.transpose(Image.Transpose.ROTATE_90).save(folder / "copy-rotated.jpg", quality=90)
    baboon = Image.open(PHOTOS / "opencv-baboon.jpg").convert("RGB")
    baboon.resize((baboon.width // 2, baboon.height // 2), Image.Resampling.LANCZOS).save(
        folder / "copy-small.jpg", quality=60)


@pytest.fixture(scope="module")
def root(tmp_path_factory, random_embedder) -> pathlib.Path:
    """The bundle the slow tests share: VGG-16 (random weights) and RootSIFT over 12 photos, ~30 s on 2 cores."""
    from apps.ingest.build import BuildOptions, build_index
    from apps.ingest.embedding import LocalEmbedding

    folder = tmp_path_factory.mktemp("dup-photos")
    for name in ORIGINALS:
        shutil.copy(PHOTOS / name, folder / name)
    make_copies(folder)
    root = tmp_path_factory.mktemp("dup-bundles") / "photos"
    build_index(folder, root, LocalEmbedding(random_embedder), BuildOptions(batch_size=6, progress=False))
    return root


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, ["duplicates", *map(str, args)])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def groups_of(document: dict) -> set[frozenset[str]]:
    return {frozenset(group["items"]) for group in document["groups"]}


def evidence_of(document: dict) -> dict[frozenset[str], dict]:
    return {frozenset(pair[:2]): evidence for group in document["groups"]
            for pair, evidence in zip(group["pairs"], group["evidence"])}


@pytest.mark.slow
def test_copies_are_grouped_with_their_originals_and_nothing_else(root):
    result = run(root, "--json")  # default: --class copy, PDQ on, a progress bar on stderr
    document = json.loads(result.stdout)
    assert groups_of(document) == EXPECTED
    evidence = evidence_of(document)
    assert evidence[frozenset(("copy-crop.jpg", "opencv-home.jpg"))]["inliers"] >= 12  # verified, not PDQ
    assert evidence[frozenset(("copy-crop.jpg", "opencv-home.jpg"))]["match"] == "copy"  # PDQ: not the same image
    for copy in SAME_IMAGE:
        found = evidence[frozenset((copy, COPIES[copy]))]
        assert (found["match"], found["decided_by"], found["pdq"]) == ("same_image", "pdq", "match")
        assert found["pdq_distance"] <= dup.PDQ_MATCH_BITS
    assert document["summary"]["items_searched"] == len(ORIGINALS) + len(COPIES)
    assert document["summary"]["pdq"] == "stored"  # made by the build, not read from the files now
    assert "item/s" in result.stderr and "4 groups, 4 pairs, 8 items in groups" in result.stderr


@pytest.mark.slow
def test_the_build_stores_pdq_and_the_indexer_core_judges_by_it(root):
    """The indexer's own scan (what FindDuplicates runs) calls the mirrored, rotated and re-encoded copies the
    same image on the hashes stored in the bundle."""
    from services.indexer import duplicates as core
    from services.indexer.index import SearchIndex

    index = SearchIndex(open_bundle(root))
    try:
        assert index.bundle.pdq is not None and (index.bundle.pdq["quality"] >= 50).all()
        scan = core.DuplicateScan(index, core.Rule("near-duplicate"))
        for _ in scan:
            pass
        pairs = {frozenset((p.a, p.b)): p for g in scan.groups() for p in g.pairs}
    finally:
        index.close()
    assert set(pairs) == {frozenset((copy, COPIES[copy])) for copy in SAME_IMAGE}
    assert {(p.match, p.decided_by, p.pdq) for p in pairs.values()} == {("same_image", "pdq", "match")}


@pytest.mark.slow
def test_near_duplicate_class_keeps_only_the_same_image(root):
    document = json.loads(run(root, "--class", "near-duplicate", "--json", "--no-progress").stdout)
    assert groups_of(document) == EXPECTED - {frozenset(("copy-crop.jpg", "opencv-home.jpg"))}


@pytest.mark.slow
def test_without_pdq_pairs_rest_on_verification_and_say_so(root):
    document = json.loads(run(root, "--no-pdq", "--json", "--no-progress").stdout)
    assert frozenset(("copy-crop.jpg", "opencv-home.jpg")) in groups_of(document)
    assert all(len(group) == 2 and group & set(COPIES) for group in groups_of(document))  # no unrelated photos
    assert {(e["pdq"], e["decided_by"]) for e in evidence_of(document).values()} == {("off", "inliers")}


@pytest.mark.slow
def test_deleted_items_are_left_out(root, tmp_path):
    copy = tmp_path / "photos"
    shutil.copytree(root, copy)
    add_deleted(copy, ["opencv-home.jpg", "copy-mirror.jpg"])
    document = json.loads(run(copy, "--json", "--no-progress").stdout)
    assert groups_of(document) == {frozenset(("copy-small.jpg", "opencv-baboon.jpg")),
                                   frozenset(("copy-rotated.jpg", "skimage-coffee.jpg"))}
    assert document["summary"]["items_searched"] == len(ORIGINALS) + len(COPIES) - 2
    assert document["summary"]["deleted_left_out"] == 2


@pytest.mark.slow
def test_csv_to_a_file_one_row_per_pair_with_its_group(root, tmp_path):
    out = tmp_path / "dups.csv"
    result = run(root, "--csv", "--out", out, "--no-progress")
    assert f"wrote {out}" in result.stdout and "4 groups" in result.stdout
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert tuple(rows[0]) == dup.CSV_COLUMNS
    assert sorted(row["group"] for row in rows) == ["1", "2", "3", "4"]
    assert {frozenset((row["item_a"], row["item_b"])) for row in rows} == EXPECTED
    assert all(0.0 <= float(row["score"]) <= 1.0 for row in rows)


@pytest.mark.slow
def test_json_shape_to_a_file(root, tmp_path):
    out = tmp_path / "dups.json"
    run(root, "--json", "--out", out, "--no-progress")
    document = json.loads(out.read_text(encoding="utf-8"))
    assert set(document) == {"threshold", "class", "groups", "summary"}
    assert (document["threshold"], document["class"]) == (None, "copy")
    for group in document["groups"]:
        assert group["items"] == sorted(group["items"]) and len(group["pairs"]) == len(group["evidence"])
        for a, b, score in group["pairs"]:
            assert a < b and {a, b} <= set(group["items"]) and isinstance(score, float)


# -------------------------------------------------------------------- chosen vectors: the score rules
def chosen_bundle(root: pathlib.Path) -> pathlib.Path:
    """a1~a2 cosine 0.99, b1~b2 0.90, b2~b3 0.90 (b1~b3 0.81), c alone; http URLs: no PDQ, no local features."""
    rng = np.random.default_rng(5)
    basis = np.linalg.qr(rng.normal(size=(16, 16)))[0].T.astype(np.float32)
    a = basis[0]
    b1, b2 = basis[1], 0.90 * basis[1] + np.sqrt(1 - 0.81) * basis[2]
    b3 = 0.90 * b2 + np.sqrt(1 - 0.81) * basis[3]
    vectors = np.stack([a, 0.99 * a + np.sqrt(1 - 0.99 ** 2) * basis[4], b1, b2, b3 / np.linalg.norm(b3), basis[5]])
    ids = ["a1", "a2", "b1", "b2", "b3", "c"]
    return write_bundle(root, ids=ids, urls=[f"https://example.invalid/{i}.jpg" for i in ids], vectors=vectors,
                        model=common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=16, fingerprint="fp-dup"),
                        metric="angular", trees=5)


def test_threshold_and_unverified_score_rules(tmp_path):
    root = tmp_path / "chosen"
    chosen_bundle(root)
    high = json.loads(run(root, "--threshold", "0.95", "--json", "--no-progress", "--k", "3").stdout)
    assert high["threshold"] == 0.95 and groups_of(high) == {frozenset(("a1", "a2"))}
    chained = json.loads(run(root, "--threshold", "0.85", "--json", "--no-progress", "--k", "3").stdout)
    assert groups_of(chained) == {frozenset(("a1", "a2")), frozenset(("b1", "b2", "b3"))}  # b1~b3 through b2
    assert len(chained["groups"][0]["pairs"]) == 2  # b1~b3 scores 0.81: joined by the group, not a pair
    # unverified: a copy from score 0.95 (the indexer's copy_score), so the b pairs at 0.90 are only similar
    copies = json.loads(run(root, "--json", "--no-progress", "--k", "3").stdout)
    assert groups_of(copies) == {frozenset(("a1", "a2"))}
    assert {(e["decided_by"], e["pdq"]) for e in evidence_of(copies).values()} == {("score", "not_local")}


def test_stored_pdq_needs_no_image_files(tmp_path):
    """A bundle whose images are out of reach (http URLs) and far apart on the descriptor: the stored hashes
    alone make a mirrored photo the same image, and the photo and another photo nothing."""
    pdqhash = pdq.load_pdqhash()
    astronaut = Image.open(PHOTOS / "skimage-astronaut.jpg").convert("RGB")
    images = [astronaut, astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
              Image.open(PHOTOS / "opencv-baboon.jpg").convert("RGB")]
    records = np.array([pdq.hash_pixels(pdqhash, pdq.decode(image)) for image in images], dtype=pdq.RECORD)
    ids = ["photo", "mirror", "other"]
    root = tmp_path / "stored"
    write_bundle(root, ids=ids, urls=[f"https://example.invalid/{i}.jpg" for i in ids],
                 vectors=np.array([[1, 0, 0], [0.5, 0.86, 0], [0.5, 0, 0.86]], dtype=np.float32),
                 model=common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=3, fingerprint="fp-pdq"),
                 metric="angular", trees=3, pdq=records)
    document = json.loads(run(root, "--class", "near-duplicate", "--json", "--no-progress", "--k", "2").stdout)
    assert groups_of(document) == {frozenset(("photo", "mirror"))}
    (found,) = evidence_of(document).values()
    assert (found["decided_by"], found["pdq"], document["summary"]["pdq"]) == ("pdq", "match", "stored")


def test_a_damaged_pdq_file_is_refused(tmp_path):
    version = chosen_bundle(tmp_path / "chosen")
    manifest = json.loads((version / "manifest.json").read_text())
    np.save(version / "pdq.npy", pdq.empty(3))  # 3 records for 6 items, listed with its true checksum
    data = (version / "pdq.npy").read_bytes()
    manifest["files"]["pdq.npy"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"pdq\.npy holds .* \(3,\) but PDQ records \(6,\) were expected"):
        open_bundle(version)


def test_without_pdqhash_installed_it_says_so(tmp_path, monkeypatch):
    root = tmp_path / "chosen"
    chosen_bundle(root)
    monkeypatch.setattr(dup, "load_pdq", lambda: None)
    result = run(root, "--json", "--no-progress", "--k", "3")
    assert "pdqhash is not installed" in result.stderr
    document = json.loads(result.stdout)
    assert document["summary"]["pdq"] == "not_installed"
    assert {e["pdq"] for e in evidence_of(document).values()} == {"not_installed"}


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nowhere"], "does not exist"),
    (["{tmp}"], "no index bundle"),
    (["{tmp}", "--threshold", "1.5"], "0.0<=x<=1.0"),
    (["{tmp}", "--threshold", "0.5", "--class", "copy"], "not both"),
])
def test_bad_input_is_a_usage_error(tmp_path, args, message):
    result = run(*(a.format(tmp=tmp_path) for a in args), code=2)
    assert message in result.output and "Traceback" not in result.output


def test_classify_evidence_order():
    from services.indexer.verification import Verification

    v = Verification()
    assert dup.classify(0.1, 0, True, 3, v) == ("same_image", "pdq")  # PDQ wins over a low score
    assert dup.classify(0.99, 5, True, None, v) == ("similar", "inliers")  # verifiable, no inliers: no copy
    assert dup.classify(0.99, 40, True, 100, v) == ("copy", "inliers")  # PDQ apart: a crop, not the same image
    assert dup.classify(0.96, 0, False, None, v) == ("copy", "score")  # textureless: the unverified score rule
    assert dup.classify(0.90, 0, False, None, v) == ("similar", "score")
    assert dup.classify(0.5, 0, False, None, v) == ("", "score")


def framed(photo: str) -> Image.Image:
    """A demo photo pasted into the middle of another (the shared frame: a template, a background)."""
    frame = Image.open(PHOTOS / "opencv-baboon.jpg").convert("RGB").resize((640, 480))
    frame.paste(Image.open(PHOTOS / photo).convert("RGB").resize((400, 300)), (120, 90))
    return frame


def test_two_photos_in_one_shared_frame_are_no_copies(tmp_path):
    """Two different photos pasted into one frame verify with ~140 inliers, all on the frame: no copy pair (a hole
    where each shows its own photo), while a photo and its pasted copy stay one."""
    from cbir import local_features
    from services.indexer.verification import Verification

    images = {"astronaut": Image.open(PHOTOS / "skimage-astronaut.jpg").convert("RGB"),
              "framed-astronaut": framed("skimage-astronaut.jpg"), "framed-messi": framed("opencv-messi5.jpg")}
    local = [local_features.extract(np.asarray(image)) for image in images.values()]
    assert local_features.inliers([local[1]], [local[2]])[0] >= 5 * Verification().copy_inliers
    ids = list(images)
    write_bundle(tmp_path / "framed", ids=ids, urls=[f"https://example.invalid/{i}.jpg" for i in ids],
                 vectors=np.array([[1, 0.1, 0], [1, 0, 0.1], [1, 0.05, 0.05]], dtype=np.float32),
                 model=common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=3, fingerprint="fp-frame",
                                            local_features=local_features.DESCRIPTION),
                 metric="angular", trees=3, local_features=[local_features.to_bytes(f) for f in local],
                 local_features_kind=local_features.DESCRIPTION)
    report = dup.find_duplicates(tmp_path / "framed", k=2, use_pdq=False, progress=False)
    assert [(p.a, p.b, p.decided_by) for g in report.groups for p in g.pairs] == [
        ("astronaut", "framed-astronaut", "inliers")]


def test_a_scan_spends_the_search_effort_of_the_neighbours_it_asks(tmp_path):
    """A bundle's default search_k is set for 50 neighbours (trees x 50 x 10); a scan asking for 3 spends
    trees x 3 x 10 per item, finds the same pairs as at the default effort here, and takes an effort it is
    given (0 = the bundle's default); a negative one is refused in words."""
    from cbir.bundle import search_k_for
    from cbir.errors import InvalidRequest
    from services.indexer import duplicates as core
    from services.indexer.index import SearchIndex

    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((600, 16)).astype(np.float32)
    vectors[1] = vectors[0] + 0.01 * rng.standard_normal(16)  # one planted near-duplicate pair
    ids = [f"i{n:03d}" for n in range(600)]
    write_bundle(tmp_path / "b", ids=ids, urls=[f"https://example.invalid/{i}.jpg" for i in ids], vectors=vectors,
                 model=common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=16, fingerprint="fp-effort"),
                 metric="angular", trees=5)
    index = SearchIndex(open_bundle(tmp_path / "b"))
    try:
        assert index.bundle.manifest.default_search_k == 5 * 50 * 10
        rule = core.Rule(match_class=None, threshold=0.99)
        scaled, default = core.DuplicateScan(index, rule, k=3), core.DuplicateScan(index, rule, k=3, search_k=0)
        assert (scaled.search_k, default.search_k) == (5 * 3 * 10, 0) == (search_k_for(index.bundle.manifest, 3), 0)
        for scan in (scaled, default):
            list(scan)
        assert [g.items for g in scaled.groups()] == [g.items for g in default.groups()] == [["i000", "i001"]]
        with pytest.raises(InvalidRequest, match="search_k must be >= 0"):
            core.DuplicateScan(index, rule, search_k=-1)
        with pytest.raises(InvalidRequest, match="verify_top .* between 1 and 1000, got 5000"):
            core.DuplicateScan(index, core.Rule("copy"), verify_top=5000)
    finally:
        index.close()
