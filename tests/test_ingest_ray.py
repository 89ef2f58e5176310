"""`cbir index build --ray`: the build on Ray Data, on a real two-node Ray cluster on loopback
(`ray.cluster_utils.Cluster`: a head and a worker node, each its own raylet and object store, 2 CPUs each).

The Ray actors run the real VGG-16 (seeded random weights) and must give the in-process build's bundle: the
same ids in the same order, the same vectors, local features, PDQ records and rejects. A Ray actor killed
(SIGKILL) in the middle of a build, and a coordinator interrupted part way, must lose nothing and write
nothing twice.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import ray
from click.testing import CliRunner
from ray.cluster_utils import Cluster

from apps import cli
from apps.ingest import ray_embed
from apps.ingest.build import BuildOptions, build_index
from apps.ingest.embedding import LocalEmbedding
from apps.ingest.ray_embed import RayEmbedding
from apps.ingest.shards import ShardStore
from apps.ingest.sources import SourceItem
from cbir.bundle import open_bundle
from conftest import DEMO_PHOTOS, E2E_PHOTOS, ROOT
from cbir.v1 import common_pb2
from services.embedder.settings import EmbedderSettings

# Ray Data reads deprecated settings of its own DataContext when it starts a dataset.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

# Ray replaces 127.0.0.1 and localhost with the machine's network address (for other machines to reach
# it); any other loopback address it takes as it is, so the whole cluster stays on loopback.
LOOPBACK = "127.0.0.2"
SEED = 7  # conftest's random_embedder: the in-process reference
CORRUPT = "truncated.jpg"  # sorts after the photos


@pytest.fixture(scope="module")
def ray_cluster():
    """Two nodes of 2 CPUs: an actor (model) on each, and a CPU each for Ray Data's other tasks."""
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2, include_dashboard=False,
                                                               node_ip_address=LOOPBACK))
    try:
        cluster.add_node(num_cpus=2, node_ip_address=LOOPBACK)
        ray.init(address=cluster.address, _node_ip_address=LOOPBACK, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=False)
        assert sum(node["Alive"] for node in ray.nodes()) == 2
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> pathlib.Path:
    """Eight real photos and a file that is not a usable image."""
    folder = tmp_path_factory.mktemp("ray-photos")
    for name in E2E_PHOTOS[:8]:
        shutil.copy(DEMO_PHOTOS / name, folder / name)
    (folder / CORRUPT).write_bytes((DEMO_PHOTOS / E2E_PHOTOS[0]).read_bytes()[:2000])
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, photos, random_embedder) -> pathlib.Path:
    """The in-process build of the photos."""
    root = tmp_path_factory.mktemp("ray-reference") / "bundles"
    build_index(photos, root, LocalEmbedding(random_embedder), BuildOptions(batch_size=4, progress=False))
    return root


@pytest.fixture(scope="module")
def ray_embedding(random_embedder) -> RayEmbedding:
    embedding = RayEmbedding(EmbedderSettings(weights="random", random_seed=SEED, metrics_port=None))
    assert embedding.info.fingerprint == random_embedder.info.fingerprint
    return embedding


def ray_options(cluster, **changes) -> BuildOptions:
    return BuildOptions(**{"batch_size": 2, "progress": False, "ray_address": cluster.address, **changes})


def contents(root: pathlib.Path) -> dict:
    with open_bundle(root) as bundle:
        return {
            "ids": [record.item_id for record in bundle.iter_items()],
            "vectors": np.array(bundle.features()),
            "local": [bundle.local.get(i) for i in range(bundle.item_count)],
            "pdq": np.array(bundle.pdq) if bundle.pdq is not None else None,
        }


def rejects(root: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (root / "rejects.jsonl").read_text().splitlines()]


def assert_same_bundle(root: pathlib.Path, reference: pathlib.Path) -> None:
    got, want = contents(root), contents(reference)
    assert got["ids"] == want["ids"] == sorted(E2E_PHOTOS[:8])
    cosine = np.sum(got["vectors"] * want["vectors"], axis=1) / (
        np.linalg.norm(got["vectors"], axis=1) * np.linalg.norm(want["vectors"], axis=1))
    assert cosine.min() >= 0.9999, cosine
    assert got["local"] == want["local"] and all(got["local"])
    if want["pdq"] is not None:
        assert np.array_equal(got["pdq"], want["pdq"])
    assert rejects(root) == rejects(reference)
    assert [record["item_id"] for record in rejects(root)] == [CORRUPT]


@pytest.mark.slow
def test_an_unreachable_ray_address_is_refused_in_a_sentence(tmp_path):
    """A separate process: this module's own connection to its cluster would be reused."""
    done = subprocess.run(
        [sys.executable, "-m", "apps", "index", "build", str(DEMO_PHOTOS), "--out", str(tmp_path / "b"),
         "--ray", f"{LOOPBACK}:1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"Error: cannot join the Ray cluster at {LOOPBACK}:1: nothing answers there" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "b").exists()


def test_ray_and_an_embedder_service_are_refused_together(tmp_path):
    result = CliRunner().invoke(cli.main, ["index", "build", str(DEMO_PHOTOS), "--out", str(tmp_path / "b"),
                                           "--ray", "--embedder", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert "--ray runs the model in Ray actors and --embedder sends the images" in result.output


@pytest.mark.slow
def test_a_ray_build_gives_the_in_process_bundle(ray_cluster, photos, reference, ray_embedding, tmp_path):
    result = build_index(photos, tmp_path / "bundles", ray_embedding, ray_options(ray_cluster))
    assert (result.items, result.rejected, result.embedded) == (8, 1, 8)
    assert_same_bundle(tmp_path / "bundles", reference)


def embed_actors() -> list[int]:
    """Process ids of this test's Ray actors that embed (the cluster's processes descend from this one)."""
    parents = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - mine
        mine |= frontier
    actors = []
    for pid in sorted(mine):
        try:
            if b"_EmbedBatch" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes():
                actors.append(pid)
        except OSError:
            continue
    return actors


@pytest.mark.slow
def test_a_ray_actor_killed_mid_build_loses_and_duplicates_nothing(ray_cluster, photos, reference, ray_embedding,
                                                                    tmp_path, monkeypatch):
    written, killed, actors_before, actors_after = [], [], set(), set()
    add, add_reject = ShardStore.add, ShardStore.add_reject
    monkeypatch.setattr(ShardStore, "add", lambda self, item_id, *a: (written.append(item_id), add(self, item_id, *a)))
    monkeypatch.setattr(ShardStore, "add_reject",
                        lambda self, item_id, *a: (written.append(item_id), add_reject(self, item_id, *a)))
    results = ray_embed._results

    def kill_an_actor_at_the_first_result(dataset):
        for index, result in results(dataset):
            if not killed:
                actors_before.update(embed_actors())
                assert actors_before, "no embedding actor found"
                killed.append(min(actors_before))
                os.kill(killed[0], signal.SIGKILL)
            else:
                actors_after.update(embed_actors())
            yield index, result

    monkeypatch.setattr(ray_embed, "_results", kill_an_actor_at_the_first_result)
    result = build_index(photos, tmp_path / "bundles", ray_embedding, ray_options(ray_cluster, batch_size=1))

    assert killed and not pathlib.Path(f"/proc/{killed[0]}").exists()
    assert actors_after - actors_before, "Ray did not start the killed actor again"
    assert sorted(written) == sorted(set(written)) == sorted(E2E_PHOTOS[:8] + [CORRUPT])  # each written once
    assert (result.items, result.rejected, result.embedded) == (8, 1, 8)
    assert_same_bundle(tmp_path / "bundles", reference)


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_an_interrupted_ray_build_resumes_from_its_shards(ray_cluster, photos, reference, ray_embedding,
                                                          tmp_path, monkeypatch):
    out = tmp_path / "bundles"
    embed_all = ray_embed.embed_all
    asked = []

    def stop_after_four(items, *args):
        for done, result in enumerate(embed_all(items, *args)):
            if done == 4:
                raise Interrupted  # the coordinator dies after four results
            yield result

    monkeypatch.setattr(ray_embed, "embed_all", stop_after_four)
    with pytest.raises(Interrupted):
        build_index(photos, out, ray_embedding, ray_options(ray_cluster, shard_size=2))
    assert not (out / "current").exists()

    def count_what_is_asked(items, *args):
        asked.extend(item.item_id for item in items)
        yield from embed_all(items, *args)

    monkeypatch.setattr(ray_embed, "embed_all", count_what_is_asked)
    monkeypatch.setenv("CBIR_EMBEDDER_RANDOM_SEED", str(SEED))
    result = CliRunner().invoke(cli.main, [
        "index", "build", str(photos), "--out", str(out), "--weights", "random", "--ray", ray_cluster.address,
        "--batch-size", "2", "--shard-size", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "4 embedded, 4 reused" in result.output
    assert asked == sorted(E2E_PHOTOS[:8])[4:] + [CORRUPT]  # only what the shards lacked
    assert_same_bundle(out, reference)


@pytest.mark.slow
def test_an_actor_whose_model_differs_stops_the_build_in_a_sentence(ray_cluster, photos, ray_embedding, tmp_path):
    other = copy.copy(ray_embedding)
    other.info = common_pb2.ModelInfo()
    other.info.CopyFrom(ray_embedding.info)
    other.info.fingerprint = "vgg16-gem-another-model"
    with pytest.raises(ray_embed.RayError, match=r"^the Ray build stopped: .*this Ray node's model is "
                       f"{ray_embedding.info.fingerprint}, the build's is vgg16-gem-another-model"):
        build_index(photos, tmp_path / "bundles", other, ray_options(ray_cluster))
    assert not (tmp_path / "bundles" / "current").exists()


def test_results_come_back_once_each_in_order_and_a_lost_one_is_an_error():
    items = [SourceItem(f"item{i}", f"/photos/{i}.jpg", f"file:///photos/{i}.jpg") for i in range(4)]
    arrivals = [(2, ("c", None, False)), (0, ("a", None, False)), (2, ("again", None, False)),
                (1, (None, "not an image", False)), (0, ("again", None, False)), (3, ("d", None, False))]
    assert list(ray_embed._in_order(items, iter(arrivals))) == [
        (items[0], "a", None, False), (items[1], None, "not an image", False), (items[2], "c", None, False),
        (items[3], "d", None, False)]
    given = []
    with pytest.raises(ray_embed.RayError, match="Ray returned no result for 2 of 4 items .first: item1."):
        for result in ray_embed._in_order(items, iter(arrivals[:3])):
            given.append(result[0].item_id)
    assert given == ["item0"]
