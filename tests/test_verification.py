"""Geometric verification in the indexer: a real bundle with the RootSIFT features of real demo photos,
queried through `SearchIndex` and through a real gRPC indexer. The query is an edited copy of ORIGINAL
whose global vector is deliberately only 5th nearest: verification must bring the original first."""

from __future__ import annotations

import dataclasses

import io
import json
import math
import pathlib

import grpc
import numpy as np
import pytest
from PIL import Image

from cbir import local_features as lf
from cbir import vectors as wire
from cbir.bundle import InvalidBundleInput, open_bundle, write_bundle
from cbir.errors import BundleError, InvalidRequest
from cbir.health import wait_until_serving
from cbir.v1 import common_pb2, indexer_pb2, indexer_pb2_grpc
from services.indexer.index import SearchIndex
from services.indexer.server import IndexerServer
from services.indexer.settings import IndexerSettings
from services.indexer.verification import Verification, count_inliers

PHOTOS = pathlib.Path(__file__).resolve().parent.parent / "demo" / "photos"
DIM = 16
FINGERPRINT = "fp-verification-test"
ORIGINAL = "opencv-home.jpg"
# Score thresholds that fit the cosines chosen below (the mechanism is tested, not the calibrated defaults).
CLASSES = Verification(same_image_score=0.93, copy_score=0.88, similar_score=0.60)

# (item id, photo whose local features the item stores or None for b"", cosine of its vector with the query)
DECOYS = [  # the four global neighbours ahead of the original: unrelated photos (one without features)
    ("decoy-1", "lomiri-friends_by_aitzol_berasategi.jpg", 0.92),
    ("decoy-2", "skimage-astronaut.jpg", 0.91),
    ("decoy-3", None, 0.90),
    ("decoy-4", "opencv-graf1.jpg", 0.89),
]
FILLERS = [
    "opencv-building.jpg", "skimage-coffee.jpg", "opencv-baboon.jpg", "opencv-messi5.jpg",
    "lomiri-life_by_aitzol_berasategi.jpg", "opencv-starry_night.jpg", "skimage-motorcycle_left.jpg",
    "opencv-fruits.jpg", "skimage-chelsea.jpg", "opencv-squirrel_cls.jpg", "mate-dune.jpg", "plasma-path.jpg",
    "opencv-board.jpg", "opencv-butterfly.jpg", "lomiri-picosdeeuropa_by_aitzol_berasategi.jpg", None, None,
    None, None, None, None, None, None, None,
]


def jpeg(array: np.ndarray, quality: int = 75) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(PHOTOS / name).convert("RGB"))


def cropped_rotated(name: str, keep: float = 0.5, angle: float = 20.0) -> np.ndarray:
    """`keep` of the width and height (off centre), rotated by `angle` degrees, JPEG q75."""
    image = Image.open(PHOTOS / name).convert("RGB")
    width, height = image.size
    left, top = round(width * 0.3), round(height * 0.2)
    crop = image.crop((left, top, left + round(width * keep), top + round(height * keep)))
    return jpeg(np.asarray(crop.rotate(angle, expand=True, resample=Image.BICUBIC)))


def features_of(name: str | None) -> bytes:
    return lf.to_bytes(lf.extract(rgb(name))) if name else b""


def items() -> list[tuple[str, bytes, float]]:
    """30 items: four decoys, the original (cosine 0.85: 5th), a reduced JPEG copy of the original stored as
    another item far from the query (cosine 0.0), and 24 fillers (cosines 0.80 down to -0.5)."""
    assert len(FILLERS) == 24
    rows = [(item_id, features_of(photo), cosine) for item_id, photo, cosine in DECOYS[:2]]
    rows.append(("original", features_of(ORIGINAL), 0.85))  # Annoy id 2: not in global order
    rows += [(item_id, features_of(photo), cosine) for item_id, photo, cosine in DECOYS[2:]]
    small_copy = np.asarray(Image.fromarray(rgb(ORIGINAL)).resize((300, 225), Image.LANCZOS))
    rows.append(("far-copy", lf.to_bytes(lf.extract(jpeg(small_copy, 50))), 0.0))
    cosines = np.linspace(0.80, -0.5, len(FILLERS))
    rows += [(f"filler-{i}", features_of(photo), float(c)) for i, (photo, c) in enumerate(zip(FILLERS, cosines))]
    return rows


def vectors_for(cosines: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Vectors with exactly these cosines to the query e0 (random directions otherwise), and e0."""
    rng = np.random.default_rng(11)
    query = np.zeros(DIM, np.float32)
    query[0] = 1.0
    rows = []
    for cosine in cosines:
        other = rng.normal(size=DIM)
        other[0] = 0.0
        other /= np.linalg.norm(other)
        rows.append((cosine * query + math.sqrt(1 - cosine * cosine) * other) * rng.uniform(0.5, 3.0))
    return np.asarray(rows, np.float32), query


def write(root: pathlib.Path, rows, *, with_local: bool = True) -> pathlib.Path:
    vectors, _ = vectors_for([c for _, _, c in rows])
    ids = [item_id for item_id, _, _ in rows]
    return write_bundle(
        root, ids=ids, urls=[f"file:///photos/{i}.jpg" for i in ids], vectors=vectors,
        model=common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=DIM, fingerprint=FINGERPRINT),
        metric="angular", trees=10, metadata=[{"row": i} for i in range(len(ids))],
        local_features=[blob for _, blob, _ in rows] if with_local else None,
        local_features_kind=lf.DESCRIPTION if with_local else "",
    )


@pytest.fixture(scope="module")
def rows():
    return items()


@pytest.fixture(scope="module")
def query_vector(rows) -> np.ndarray:
    return vectors_for([c for _, _, c in rows])[1]


@pytest.fixture(scope="module")
def query_local() -> lf.LocalFeatures:
    return lf.extract(cropped_rotated(ORIGINAL))


@pytest.fixture(scope="module")
def root(tmp_path_factory, rows) -> pathlib.Path:
    root = tmp_path_factory.mktemp("bundles") / "verified"
    write(root, rows)
    return root


@pytest.fixture(scope="module")
def index(root):
    index = SearchIndex(open_bundle(root), verification=CLASSES)
    yield index
    index.close()


def ids(hits) -> list[str]:
    return [h.item_id for h in hits]


GLOBAL_ORDER = ["decoy-1", "decoy-2", "decoy-3", "decoy-4", "original", "filler-0", "filler-1", "filler-2"]


# -- (a) verification re-ranks


def test_without_local_features_the_original_stays_fifth_unverified(index, query_vector):
    """Precondition and control: the global order puts four decoys first; no hit is verified (inliers 0);
    unverified classes follow the score alone (>= 0.88 copy, >= 0.60 similar)."""
    hits = index.query_vector(query_vector, k=8)
    assert ids(hits) == GLOBAL_ORDER
    assert [h.inliers for h in hits] == [0] * 8
    assert [round(h.score, 4) for h in hits[:5]] == [0.92, 0.91, 0.90, 0.89, 0.85]
    assert [h.match for h in hits[:5]] == ["copy", "copy", "copy", "copy", "similar"]


def test_local_features_put_the_original_first_as_a_copy(index, query_vector, query_local):
    """With the query's local features every candidate is verified: the original (5th globally) and the
    far JPEG copy of it (score ~0, last but fifteen globally) move to the front as "copy" with >= 12
    inliers; the decoys follow in their global order, now "similar" with fewer than 10 inliers."""
    hits = index.query_vector(query_vector, k=7, local=[query_local])
    assert ids(hits) == ["original", "far-copy", "decoy-1", "decoy-2", "decoy-3", "decoy-4", "filler-0"]
    assert hits[0].inliers >= 12 and hits[0].match == "copy"
    assert hits[0].score == pytest.approx(0.85, abs=1e-4)
    assert hits[1].inliers >= 12 and hits[1].match == "copy" and hits[1].score == pytest.approx(0.0, abs=1e-3)
    assert all(h.inliers < 10 for h in hits[2:]), [h.inliers for h in hits]
    assert hits[4].inliers == 0  # decoy-3 has no stored features
    assert [h.match for h in hits[2:6]] == ["similar"] * 4
    assert hits[0].url == "file:///photos/original.jpg" and hits[0].metadata == {"row": "2"}



def test_among_verified_candidates_the_most_inliers_come_first(index, query_vector):
    """The query is the small JPEG copy itself: the far copy (global score ~0) shares far more keypoints with
    it than the original (0.85) does, so it leads although the global order puts it last but fifteen."""
    small_copy = np.asarray(Image.fromarray(rgb(ORIGINAL)).resize((300, 225), Image.LANCZOS))
    hits = index.query_vector(query_vector, k=3, local=[lf.extract(jpeg(small_copy, 50))])
    assert ids(hits)[:2] == ["far-copy", "original"]
    assert hits[0].inliers > hits[1].inliers >= 10 and hits[0].score < hits[1].score


def test_a_mirrored_query_needs_its_mirror_features(index, query_vector):
    """A mirrored copy of the original: with the mirror-back features in `local` the original comes first
    with hundreds of inliers."""
    mirrored_copy = jpeg(lf.mirrored(rgb(ORIGINAL)))
    local = [lf.extract(mirrored_copy), lf.extract(lf.mirrored(mirrored_copy))]
    hits = index.query_vector(query_vector, k=3, local=local)
    assert ids(hits)[:2] == ["original", "far-copy"]
    assert hits[0].inliers >= 200 and hits[0].match == "copy"


def test_empty_query_features_change_nothing(index, query_vector):
    """Query features without keypoints (an all-black image): verified, nothing moves, inliers all 0."""
    hits = index.query_vector(query_vector, k=8, local=[lf.extract(np.zeros((200, 300, 3), np.uint8))])
    assert ids(hits) == GLOBAL_ORDER
    assert [h.inliers for h in hits] == [0] * 8


def test_count_inliers_reads_the_stored_features_by_annoy_id(index, query_local):
    """count_inliers: Annoy ids 2 (original) and 5 (far copy) have >= 12, id 3 (b"", no features) 0."""
    counts = count_inliers([query_local], index.bundle.local, [0, 1, 2, 3, 4, 5])
    assert counts[2] >= 12 and counts[5] >= 12
    assert counts[3] == 0 and max(counts[0], counts[1], counts[4]) < 10


# -- (b) how many are verified


def test_verification_top_zero_disables_it(root, query_vector, query_local):
    """Verification(top=0): local features are ignored, the answer is the global one."""
    index = SearchIndex(open_bundle(root), verification=dataclasses.replace(CLASSES, top=0))
    try:
        hits = index.query_vector(query_vector, k=8, local=[query_local])
        assert ids(hits) == GLOBAL_ORDER
        assert [h.inliers for h in hits] == [0] * 8
        assert [h.match for h in hits[:5]] == ["copy", "copy", "copy", "copy", "similar"]
        assert index.info().verify_top == 0
    finally:
        index.close()


def test_only_the_top_candidates_are_verified(root, query_vector, query_local):
    """Verification(top=3): the original (5th) is not among the verified three, so it stays 5th unverified;
    the three verified decoys lose their "copy" class (0 inliers), the unverified 4th keeps it by score."""
    index = SearchIndex(open_bundle(root), verification=dataclasses.replace(CLASSES, top=3))
    try:
        hits = index.query_vector(query_vector, k=5, local=[query_local])
        assert ids(hits) == GLOBAL_ORDER[:5]
        assert [h.inliers for h in hits] == [hits[0].inliers, hits[1].inliers, 0, 0, 0]
        assert [h.match for h in hits] == ["similar", "similar", "similar", "copy", "similar"]
    finally:
        index.close()


def stored_vector(root: pathlib.Path, item_id: str) -> np.ndarray:
    with open_bundle(root) as bundle:
        (record,) = bundle.find_items([item_id])
        return np.array(bundle.features()[record.annoy_id])


def test_a_region_vector_brings_in_an_original_outside_the_candidates_and_verification_accepts_it(
        root, query_vector, query_local):
    """k=3 and top=3: the global search fetches only the three decoys. A region vector of the query that lies
    on the original (the part of the query that shows it) adds the original as a candidate; it verifies, so it
    comes first, scored by its global cosine (0.85). A region vector on an unrelated filler adds that filler,
    which does not verify and so is no hit."""
    index = SearchIndex(open_bundle(root), verification=dataclasses.replace(CLASSES, top=3, region_k=1))
    try:
        regions = [stored_vector(root, "original"), stored_vector(root, "filler-20")]
        hits = index.query_vector(query_vector, k=3, local=[query_local], regions=regions)
        assert ids(hits) == ["original", "decoy-1", "decoy-2"]
        assert hits[0].inliers >= 12 and hits[0].match == "copy" and hits[0].score == pytest.approx(0.85, abs=1e-4)
        without = index.query_vector(query_vector, k=3, local=[query_local])
        assert ids(without) == ["decoy-1", "decoy-2", "decoy-3"]
        # region vectors are candidates for verification only: without local features they change nothing
        assert ids(index.query_vector(query_vector, k=3, regions=regions)) == ["decoy-1", "decoy-2", "decoy-3"]
    finally:
        index.close()


def test_region_vectors_of_the_wrong_dimension_or_too_many_are_invalid(index, query_vector, query_local):
    with pytest.raises(InvalidRequest, match="region vectors must be finite and of dimension 16"):
        index.query_vector(query_vector, k=3, local=[query_local], regions=[np.ones(8, np.float32)])
    with pytest.raises(InvalidRequest, match="at most 64 region vectors"):
        index.query_vector(query_vector, k=3, local=[query_local], regions=[query_vector] * 65)


def test_min_inliers_decides_what_moves(root, query_vector, query_local):
    """Verification(min_inliers=10**6): nothing is moved, but the original's inliers and "copy" class remain."""
    index = SearchIndex(open_bundle(root), verification=dataclasses.replace(CLASSES, min_inliers=10**6))
    try:
        hits = index.query_vector(query_vector, k=5, local=[query_local])
        assert ids(hits) == GLOBAL_ORDER[:5]
        assert hits[4].inliers >= 12 and hits[4].match == "copy"
    finally:
        index.close()


# -- (c) min_score


def test_min_score_drops_weaker_hits(index, query_vector, query_local):
    """min_score keeps only hits scoring at least that much, before or after verification (the far copy,
    verified but scoring ~0, is left out)."""
    assert ids(index.query_vector(query_vector, k=10, min_score=0.895)) == ["decoy-1", "decoy-2", "decoy-3"]
    hits = index.query_vector(query_vector, k=10, local=[query_local], min_score=0.84)
    assert ids(hits) == ["original", "decoy-1", "decoy-2", "decoy-3", "decoy-4"]
    assert index.query_vector(query_vector, k=10, min_score=0.95) == []
    assert len(index.query_vector(query_vector, k=10, min_score=0.0)) == 10


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), float("inf"), -float("inf")])
def test_min_score_outside_zero_one_is_an_invalid_request(index, query_vector, bad):
    """min_score below 0, above 1 or NaN: InvalidRequest (query_vector and query_item) saying the range."""
    with pytest.raises(InvalidRequest, match="min_score must be between 0 and 1"):
        index.query_vector(query_vector, k=5, min_score=bad)
    with pytest.raises(InvalidRequest, match="min_score must be between 0 and 1"):
        index.query_item("original", k=5, min_score=bad)


# -- (d) query_item verifies with the stored features


def test_query_item_verifies_with_the_items_stored_features(index):
    """query_item("original"): itself first as "same_image" (all its keypoints match), then the far JPEG
    copy moved up from the back of the global order as "copy"; with exclude_self the copy is first."""
    hits = index.query_item("original", k=4)
    assert ids(hits)[:2] == ["original", "far-copy"]
    assert hits[0].match == "same_image" and hits[0].inliers >= 300 and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[1].match == "copy" and hits[1].inliers >= 12
    assert all(h.inliers < 10 for h in hits[2:])
    others = index.query_item("original", k=3, exclude_self=True)
    assert ids(others)[0] == "far-copy" and "original" not in ids(others)
    assert others[0].inliers >= 12


def test_query_item_without_stored_features_is_not_verified(index):
    """An item stored with b"" (decoy-3): no verification, global neighbours only, inliers all 0, and the
    far copy (not a global neighbour) is not brought in."""
    hits = index.query_item("decoy-3", k=6)
    assert hits[0].item_id == "decoy-3" and hits[0].match == "same_image"
    assert [h.inliers for h in hits] == [0] * 6
    assert "far-copy" not in ids(hits)


# -- (e) the bundle files


def test_the_manifest_and_info_describe_the_local_features(root, index):
    """manifest.json names the kind and lists both files with sizes; IndexInfo reports kind and verify_top."""
    version = root / (root / "current").read_text().strip()
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["local_features"] == "rootsift:500@512"
    for name in ("local_features.bin", "local_offsets.npy"):
        assert manifest["files"][name]["bytes"] == (version / name).stat().st_size
    offsets = np.load(version / "local_offsets.npy")
    assert offsets.shape == (31,) and offsets[0] == 0 and offsets[-1] == (version / "local_features.bin").stat().st_size
    assert offsets[4] == offsets[3]  # decoy-3 (Annoy id 3) stored b""
    info = index.info()
    assert (info.local_features, info.verify_top) == ("rootsift:500@512", 100)


def _version(root: pathlib.Path) -> pathlib.Path:
    return root / (root / "current").read_text().strip()


@pytest.fixture
def fresh(tmp_path, rows) -> pathlib.Path:
    """A bundle of its own, to damage."""
    root = tmp_path / "fresh"
    write(root, rows[:6])
    return root


def test_an_altered_local_features_file_is_refused(fresh):
    """One byte of local_features.bin changed after writing: BundleError naming the file and its checksum."""
    path = _version(fresh) / "local_features.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"local_features\.bin fails its checksum"):
        open_bundle(fresh)


def test_a_truncated_local_features_file_is_refused(fresh):
    """local_features.bin shorter than recorded: BundleError naming the file and both sizes."""
    path = _version(fresh) / "local_features.bin"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleError, match=rf"local_features\.bin is {size - 10} bytes but the manifest records {size}"):
        open_bundle(fresh)


def test_unlisted_local_files_are_refused(fresh):
    """A manifest naming local features but not listing their files: BundleError "does not list" both."""
    version = _version(fresh)
    manifest_path = version / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["files"]["local_offsets.npy"], manifest["files"]["local_features.bin"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"does not list local_features\.bin, local_offsets\.npy under 'files'"):
        open_bundle(fresh)


def test_a_deleted_offsets_file_is_refused(fresh):
    """local_offsets.npy deleted after writing: BundleError naming it as missing."""
    (_version(fresh) / "local_offsets.npy").unlink()
    with pytest.raises(BundleError, match=r"local_offsets\.npy is missing"):
        open_bundle(fresh)


def test_offsets_that_do_not_fit_the_data_are_refused_without_checksums(fresh):
    """Even with verify_checksums=False, offsets whose last value is not the data size: BundleError."""
    path = _version(fresh) / "local_offsets.npy"
    offsets = np.load(path)
    offsets[-1] += 1
    np.save(path, offsets)  # same size: only the content differs
    with pytest.raises(BundleError, match=r"local_offsets\.npy does not describe 6 items of .*local_features\.bin"):
        open_bundle(fresh, verify_checksums=False)


def test_a_bundle_without_local_features_round_trips_without_the_key(tmp_path, rows, query_vector, query_local):
    """write_bundle without local features: no `local_features` key in manifest.json, no local files,
    bundle.local is None, IndexInfo says "" and verify_top 0, and query features are simply not used."""
    root = tmp_path / "plain"
    write(root, rows, with_local=False)
    version = _version(root)
    manifest = json.loads((version / "manifest.json").read_text())
    assert "local_features" not in manifest
    assert not (version / "local_features.bin").exists() and not (version / "local_offsets.npy").exists()
    assert set(manifest["files"]) == {"index.ann", "items.sqlite", "features.npy"}
    index = SearchIndex(open_bundle(root), verification=CLASSES)
    try:
        assert index.bundle.local is None and index.bundle.manifest.local_features == ""
        info = index.info()
        assert (info.local_features, info.verify_top) == ("", 0)
        hits = index.query_vector(query_vector, k=8, local=[query_local])
        assert ids(hits) == GLOBAL_ORDER and [h.inliers for h in hits] == [0] * 8
        assert index.query_item("original", k=3)[0].inliers == 0
    finally:
        index.close()


def test_write_bundle_refuses_mismatched_local_features(tmp_path, rows):
    """One blob per item and a kind are required; nothing is left behind when refused."""
    vectors, _ = vectors_for([0.5, 0.4])
    common = dict(ids=["a", "b"], urls=["u:a", "u:b"], vectors=vectors, metric="angular", trees=2,
                  model=common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=DIM, fingerprint=FINGERPRINT))
    with pytest.raises(InvalidBundleInput, match="1 local features for 2 items"):
        write_bundle(tmp_path / "r", local_features=[b""], local_features_kind=lf.DESCRIPTION, **common)
    with pytest.raises(InvalidBundleInput, match="2 local features for 2 items"):
        write_bundle(tmp_path / "r", local_features=[b"", b""], **common)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


# -- (f) over gRPC


@pytest.fixture(scope="module")
def stub(root):
    server = IndexerServer(IndexerSettings(bundle=root, port=0, metrics_port=None, warm_up=False, max_k=100,
                                           same_image_score=0.93, copy_score=0.88, similar_score=0.60))
    server.start_serving()
    target = f"127.0.0.1:{server.port}"
    channel = grpc.insecure_channel(target)
    try:
        wait_until_serving(target, service="cbir.v1.Indexer", timeout_s=30)
        yield indexer_pb2_grpc.IndexerStub(channel)
    finally:
        channel.close()
        server.stop(0)


def request(query_vector, **fields) -> indexer_pb2.QueryVectorRequest:
    return indexer_pb2.QueryVectorRequest(vector=wire.to_proto(query_vector), model_fingerprint=FINGERPRINT, **fields)


def test_grpc_query_with_local_features_returns_inliers_and_match(stub, query_vector, query_local):
    """QueryVector with local_features bytes: the original first with Hit.inliers >= 12 and match "copy";
    without them the global order with inliers 0; IndexInfo reports the kind and verify_top."""
    reply = stub.QueryVector(request(query_vector, k=3, local_features=lf.to_bytes(query_local)), timeout=30)
    assert [h.item_id for h in reply.hits] == ["original", "far-copy", "decoy-1"]
    assert reply.hits[0].inliers >= 12 and reply.hits[0].match == "copy"
    assert reply.hits[2].inliers < 10 and reply.hits[2].match == "similar"
    plain = stub.QueryVector(request(query_vector, k=5), timeout=30)
    assert [h.item_id for h in plain.hits] == GLOBAL_ORDER[:5]
    assert [h.inliers for h in plain.hits] == [0] * 5 and plain.hits[0].match == "copy"
    info = stub.GetIndexInfo(indexer_pb2.GetIndexInfoRequest(), timeout=30).index
    assert (info.local_features, info.verify_top) == ("rootsift:500@512", 100)


def test_grpc_region_vectors_are_sent_as_vectors_and_checked(root, stub, query_vector, query_local):
    """QueryVector.regions reach the search (the original, far down the global order at k=1, is verified
    through its region); a region of another dimension is INVALID_ARGUMENT in words."""
    region = wire.to_proto(stored_vector(root, "far-copy"))
    reply = stub.QueryVector(request(query_vector, k=1, local_features=lf.to_bytes(query_local), regions=[region]),
                             timeout=30)
    assert [h.item_id for h in reply.hits] == ["original"]  # verified top 100 holds all 30: the original wins
    with pytest.raises(grpc.RpcError) as error:
        stub.QueryVector(request(query_vector, k=1, local_features=lf.to_bytes(query_local),
                                 regions=[wire.to_proto(np.ones(8, np.float32))]), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dimension 8, this index expects 16" in error.value.details()


def test_grpc_mirrored_features_and_min_score(stub, query_vector):
    """local_features_mirrored is used too; min_score drops weaker hits (the far copy)."""
    mirrored_copy = jpeg(lf.mirrored(rgb(ORIGINAL)))
    reply = stub.QueryVector(request(
        query_vector, k=5, min_score=0.5, local_features=lf.to_bytes(lf.extract(mirrored_copy)),
        local_features_mirrored=lf.to_bytes(lf.extract(lf.mirrored(mirrored_copy))),
    ), timeout=30)
    assert [h.item_id for h in reply.hits] == ["original", "decoy-1", "decoy-2", "decoy-3", "decoy-4"]
    assert reply.hits[0].inliers >= 200 and reply.hits[0].match == "copy"


def test_grpc_query_item_returns_verified_hits(stub):
    """QueryItem verifies with the item's stored features: the far copy first when the item is excluded."""
    reply = stub.QueryItem(indexer_pb2.QueryItemRequest(item_id="original", k=2, exclude_self=True), timeout=30)
    assert reply.hits[0].item_id == "far-copy" and reply.hits[0].inliers >= 12 and reply.hits[0].match == "copy"


@pytest.mark.parametrize("field,blob,message", [
    ("local_features", b"garbage, not features", "format 103"),  # 'g' = 103
    ("local_features", b"\x01\x01", "shorter than their 8-byte header"),
    ("local_features_mirrored", b"\x01\x01\x05\x00\x10\x00\x10\x00" + b"\0" * 40, "5 keypoints take 668 bytes, got 48"),
])
def test_grpc_garbage_local_features_are_invalid_argument(stub, query_vector, field, blob, message):
    """Unreadable local features: INVALID_ARGUMENT with a readable message, and the server keeps serving."""
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.QueryVector(request(query_vector, k=3, **{field: blob}), timeout=30)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = excinfo.value.details()
    assert details.startswith("the query's local features cannot be read: local features ")
    assert message in details
    assert stub.QueryVector(request(query_vector, k=1), timeout=30).hits[0].item_id == "decoy-1"


def test_grpc_min_score_out_of_range_is_invalid_argument(stub, query_vector):
    """min_score 1.5 over gRPC: INVALID_ARGUMENT saying the range."""
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.QueryVector(request(query_vector, k=3, min_score=1.5), timeout=30)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_score must be between 0 and 1" in excinfo.value.details()


def test_unreadable_stored_features_leave_that_item_unverified_and_the_query_answers(tmp_path, rows, query_vector,
                                                                                     query_local, caplog):
    """A bundle whose stored bytes for an item are not local features (written by other code) still answers:
    that item is not verified (0 inliers, a warning logged), the others are."""
    broken = [(item_id, b"junk" if item_id == "decoy-1" else blob, cosine) for item_id, blob, cosine in rows]
    write(tmp_path / "broken", broken)
    index = SearchIndex(open_bundle(tmp_path / "broken"), verification=CLASSES)
    try:
        hits = index.query_vector(query_vector, k=6, local=[query_local])
        by_id = {hit.item_id: hit for hit in hits}
        assert hits[0].item_id == "original" and hits[0].match == "copy"
        assert by_id["decoy-1"].inliers == 0
        assert "cannot be read" in caplog.text
        assert [h.item_id for h in index.query_item("decoy-1", k=3)][0] == "decoy-1"
    finally:
        index.close()


def test_local_features_of_another_kind_are_not_used(tmp_path, rows, query_vector, query_local):
    """Bytes the bundle says are of another kind are never parsed: no verification, no error."""
    vectors, _ = vectors_for([c for _, _, c in rows])
    ids = [item_id for item_id, _, _ in rows]
    write_bundle(tmp_path / "other", ids=ids, urls=[f"u:{i}" for i in ids], vectors=vectors,
                 model=common_pb2.ModelInfo(name="vgg16", feature="gem", dimension=DIM, fingerprint=FINGERPRINT),
                 metric="angular", trees=10, local_features=[b"x"] * len(ids), local_features_kind="orb:1000@640")
    index = SearchIndex(open_bundle(tmp_path / "other"), verification=CLASSES)
    try:
        assert index.info().verify_top == 0
        hits = index.query_vector(query_vector, k=6, local=[query_local])
        assert [h.inliers for h in hits] == [0] * 6 and hits[4].item_id == "original"
    finally:
        index.close()
