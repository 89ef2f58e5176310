"""Load and faults through the gateway (benchmarks/load.py), bounded in time and count, loopback only.

Quick versions (seconds each) run in the suite with the three servers in this process: load below the
concurrency limit has no errors; above it, what is refused is RESOURCE_EXHAUSTED and nothing else;
a new version made current during load fails no request; broken versions offered during load fail
no request and change nothing; an indexer or embedder stopped and started again during load fails
only the requests that needed it, with UNAVAILABLE, and only until it is back. No item is lost.

The long versions (`-m load`: real processes killed with SIGKILL, 20 s per scenario) are what
BENCHMARKS.md reports; `.ci/run` does not select them.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from cbir.bundle import read_current

_spec = importlib.util.spec_from_file_location("cbir_load", Path(__file__).resolve().parents[1] / "benchmarks" / "load.py")
load = importlib.util.module_from_spec(_spec)
sys.modules["cbir_load"] = load  # dataclasses look their module up
_spec.loader.exec_module(load)

pytestmark = pytest.mark.slow  # seconds per test: VGG-16 under load


@pytest.fixture
def private_bundle(bundle, tmp_path) -> Path:
    """A copy of the session bundle (scenarios add versions to it)."""
    return load.fresh_bundle(bundle.root, tmp_path / "bundle")


@pytest.fixture
def in_process(private_bundle, random_embedder):
    stacks = []

    def start(limit: int = 8) -> "load.InProcessStack":
        stack = load.InProcessStack(private_bundle, random_embedder, gateway_limit=limit)
        stack.start_all()
        stacks.append(stack)
        return stack

    yield start
    for stack in stacks:
        stack.stop()


def inputs(bundle: Path):
    from conftest import DEMO_PHOTOS, E2E_PHOTOS

    return [(DEMO_PHOTOS / name).read_bytes() for name in E2E_PHOTOS[:6]], load.bundle_ids(bundle)


def test_load_below_the_concurrency_limit_has_no_errors(in_process, private_bundle):
    """4 clients against a gateway that takes 8 at once, for 4 s, a third of them searching by image:
    every request succeeds with k hits; no item is lost."""
    stack = in_process(limit=8)
    images, ids = inputs(private_bundle)
    report = load.scenario(stack, "steady", clients=4, seconds=4, images=images, ids=ids, image_share=0.3)
    assert report["total"]["errors"] == 0, report["failures"][:5]
    assert report["total"]["ok"] > 0 and report["short_answers"] == 0
    assert report["items_lost"] == []


def test_load_above_the_limit_is_refused_with_resource_exhausted_and_nothing_else(in_process, private_bundle):
    """12 clients against a gateway that takes 2 at once: some requests are refused, every refusal is
    RESOURCE_EXHAUSTED (the limit, not a queue or a crash), the rest succeed."""
    stack = in_process(limit=2)
    images, ids = inputs(private_bundle)
    report = load.scenario(stack, "overload", clients=12, seconds=3, images=images, ids=ids, image_share=0.5)
    codes = report["total"]["codes"]
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert all("Concurrent RPC limit exceeded" in f["detail"] for f in report["failures"])
    assert report["items_lost"] == []


def test_a_new_version_made_current_during_load_fails_no_request(in_process, private_bundle):
    """v2 (the live items + 5) is made current 1 s into a 5 s run: no request fails, answers come from both
    versions, no client sees the old one after the new one, and v2 serves all its items."""
    stack = in_process()
    images, ids = inputs(private_bundle)
    first = read_current(private_bundle)
    report = load.scenario(stack, "reload", clients=4, seconds=5, images=images, ids=ids, image_share=0.3)
    assert report["failed_requests"] == 0, report["failures"][:5]
    assert set(report["versions_seen"]) == {first, "load-v2"}
    assert report["old_version_after_new"] == 0
    assert report["live_version_after"] == ("load-v2", len(ids) + 5)
    assert report["items_lost"] == []


def test_broken_versions_offered_during_load_fail_no_request_and_change_nothing(in_process, private_bundle):
    """A truncated version and one of another model, offered by ReloadBundle and by `current`, are refused
    (FAILED_PRECONDITION with the reason) while the load runs without a failure on the live version."""
    stack = in_process()
    images, ids = inputs(private_bundle)
    live = read_current(private_bundle)
    report = load.scenario(stack, "bad-reload", clients=4, seconds=5, images=images, ids=ids, image_share=0.3)
    assert report["failed_requests"] == 0, report["failures"][:5]
    notes = report["notes"]
    assert notes["reload truncated (RPC)"].startswith("FAILED_PRECONDITION") and "truncated" in notes["reload truncated (RPC)"]
    assert notes["reload other model (RPC)"].startswith("FAILED_PRECONDITION") and "another-model" in notes["reload other model (RPC)"]
    assert notes["live version after"] == (live, len(ids))
    assert set(report["versions_seen"]) == {live}
    assert report["items_lost"] == []


@pytest.mark.parametrize("upstream", ["indexer", "embedder"])
def test_an_upstream_stopped_and_restarted_during_load_fails_only_what_needs_it(in_process, private_bundle, upstream):
    """Stopped 1.5 s into a 6 s run and started again 0.75 s later: only requests that need it fail (the
    embedder: only searches by image), only with UNAVAILABLE, none before the stop, and once a request of a
    kind succeeds after the restart no later one of that kind fails. No item is lost."""
    stack = in_process()
    images, ids = inputs(private_bundle)
    report = load.scenario(stack, f"kill-{upstream}", clients=4, seconds=6, images=images, ids=ids, image_share=0.5)
    killed = report["events"][f"kill {upstream}"]
    back = report["events"][f"restart {upstream} done"]
    failures = report["failures"]
    assert {f["code"] for f in failures} <= {"UNAVAILABLE"}, failures[:5]
    assert all(f["end_s"] >= killed for f in failures)
    if upstream == "embedder":
        assert {f["kind"] for f in failures} <= {"image"}
    after = report["after_fault"]["by_kind"]
    for kind, codes in after.items():
        assert codes.get("OK", 0) > 0, (kind, after)
    assert report["items_lost"] == []
    assert back > killed


# --- the long runs: real processes, SIGKILL ----------------------------------------------------------


@pytest.fixture(scope="module")
def master_bundle(tmp_path_factory) -> Path:
    return load.ensure_bundle(tmp_path_factory.mktemp("load"), count=40)


@pytest.mark.load  # also slow (the module's mark): `-m "not slow"`, which replaces the default `-m "not load"`, leaves it out too
@pytest.mark.parametrize("name", load.SCENARIOS)
def test_long_scenarios_with_real_processes(master_bundle, tmp_path, name):
    """benchmarks/load.py's scenarios, 20 s each, processes killed with SIGKILL: the same properties as the
    quick tests, with the numbers written to var/load/<scenario>.json."""
    import json

    bundle = load.fresh_bundle(master_bundle, tmp_path / "bundle")
    stack = load.ProcessStack(bundle, tmp_path, gateway_limit=16)
    images, ids = load.load_inputs(bundle)
    try:
        stack.start_all()
        report = load.scenario(stack, name, clients=64 if name == "overload" else 8, seconds=20, images=images,
                               ids=ids)
    finally:
        stack.stop()
    out = load.REPO / "var" / "load" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    assert report["items_lost"] == [] and report["short_answers"] == 0
    codes = report["total"]["codes"]
    if name == "steady" or name.endswith("reload"):
        assert report["failed_requests"] == 0, report["failures"][:5]
    elif name == "overload":
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    else:
        assert set(codes) <= {"OK", "UNAVAILABLE"}
        killed = report["events"][f"kill {name.split('-')[1]}"]
        assert all(f["end_s"] >= killed for f in report["failures"])
    shutil.rmtree(tmp_path / "bundle", ignore_errors=True)
