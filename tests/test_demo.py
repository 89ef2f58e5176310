"""`cbir demo`, the README's main job, run for real: it builds the demo index, starts the four
services as processes, answers searches, and stops everything on Ctrl-C (SIGINT). Also
scripts/demo.sh and scripts/test.sh (over a stand-in .venv): arguments reach `cbir demo`, and the
two scripts' installs do not undo each other."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from apps.demo import search_hint
from cbir.client import GatewayClient
from conftest import DEMO_PHOTOS, E2E_PHOTOS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_demo_builds_serves_answers_and_stops_cleanly_on_ctrl_c(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in E2E_PHOTOS[:6]:
        (photos / name).write_bytes((DEMO_PHOTOS / name).read_bytes())
    ui, gateway, embedder, indexer, metrics = _free_ports(5)
    command = [
        sys.executable, "-m", "apps", "demo", "--photos", str(photos), "--workdir", str(tmp_path / "work"),
        "--weights", "random", "--ui-port", str(ui), "--gateway-port", str(gateway),
        "--embedder-port", str(embedder), "--indexer-port", str(indexer), "--metrics-port-base", str(metrics),
    ]
    # metrics ports are base..base+2: the base came free, and so, almost surely, do its neighbours
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output.append(line)
            if line.startswith("Press Ctrl-C to stop"):
                break
        text = "".join(output)
        assert "cbir demo is running" in text, text[-3000:]
        assert f"http://127.0.0.1:{ui}" in text and f"127.0.0.1:{gateway}" in text
        hint = text.split("(try: ", 1)[1].split(")", 1)[0]
        assert hint == search_hint(photos, gateway), text
        assert hint.endswith(f"--gateway 127.0.0.1:{gateway}") and os.path.isfile(hint.split()[0]), hint

        with GatewayClient(f"127.0.0.1:{gateway}") as client:
            hits = client.search_image((photos / E2E_PHOTOS[2]).read_bytes(), k=3).hits
            duplicates = list(client.find_duplicates_events(threshold=0.0, k=2))
        assert hits[0].item_id == E2E_PHOTOS[2]
        # every pair scores >= 0: the six photos are one group, found over the demo stack's index
        groups = [event.group for event in duplicates if event.HasField("group")]
        assert [len(group.items) for group in groups] == [6] and duplicates[-1].summary.items_searched == 6
        with urllib.request.urlopen(f"http://127.0.0.1:{ui}/", timeout=10) as page:
            assert page.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as scrape:
            scraped = scrape.read()
        assert b'cbir_grpc_server_handled_total{grpc_code="OK",grpc_method="SearchByImage"' in scraped
        assert b'cbir_grpc_server_handled_total{grpc_code="OK",grpc_method="FindDuplicates"' in scraped

        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
        assert process.returncode == 0, rest
        assert "all services stopped" in rest
        for log in (tmp_path / "work" / "logs").glob("*.log"):
            assert "Traceback" not in log.read_text(), log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # nothing is left listening
    for port in (ui, gateway, embedder, indexer):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"


# ----------------------------------------------------------------------------------- the banner's hint
def test_search_hint_is_a_command_that_works_as_printed(tmp_path, monkeypatch):
    """The banner's `try:` command names this environment's `cbir` by its path (.venv/bin is not
    on the user's PATH), a photo that exists, and --gateway when the port is not the default."""
    monkeypatch.delenv("CBIR_GATEWAY_TARGET", raising=False)
    cbir = pathlib.Path(sys.executable).parent / "cbir"
    assert cbir.exists(), "the project is installed into this environment, with its cbir script"
    hint = search_hint(DEMO_PHOTOS, 50050, cwd=ROOT)
    assert hint.split()[1:] == ["search", "demo/photos/skimage-astronaut.jpg"], hint
    assert (ROOT / hint.split()[0]).resolve() == cbir.resolve()
    assert "/" in hint.split()[0]  # a path, never a bare `cbir` that the shell would look up on PATH
    assert search_hint(DEMO_PHOTOS, 50060, cwd=ROOT).endswith(" --gateway 127.0.0.1:50060")
    (tmp_path / "my photos").mkdir()
    (tmp_path / "my photos" / "b.png").write_bytes(b"")
    hint = search_hint(tmp_path / "my photos", 50050, cwd=tmp_path)
    assert hint.endswith(" search 'my photos/b.png'"), hint  # quoted for the shell
    monkeypatch.setenv("CBIR_GATEWAY_TARGET", "elsewhere:1")
    assert search_hint(DEMO_PHOTOS, 50050, cwd=ROOT).endswith(" --gateway 127.0.0.1:50050")
    # the printed command really runs (its --help: no gateway needed)
    done = subprocess.run([*hint.split()[:1], "search", "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--gateway" in done.stdout, done.stderr


# ----------------------------------------------------------------------------------- demo.sh / test.sh
_FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for .venv/bin/python: records pip calls, answers pytest
if [[ $1 == -m && $2 == pip ]]; then echo "${*:3}" >> "$(dirname "$0")/../calls"; exit 0; fi
if [[ $1 == -m && $2 == pytest ]]; then echo "pytest ${*:3}"; exit 0; fi
echo "unexpected: $*" >&2; exit 2
"""
_FAKE_CBIR = """#!/usr/bin/env bash
echo "cbir $*"
"""


@pytest.fixture
def scripts_repo(tmp_path):
    """A copy of scripts/ and pyproject.toml over a stand-in .venv whose python and cbir record calls."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("python", _FAKE_PYTHON), ("cbir", _FAKE_CBIR)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return repo


def _run(repo: pathlib.Path, script: str, *args: str) -> tuple[str, list[str]]:
    calls = repo / ".venv" / "calls"
    calls.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "venv_extras"}
    env["CBIR_TEST_CHROMIUM"] = "/bin/true"
    done = subprocess.run(["bash", str(repo / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    pip = [line for line in calls.read_text().splitlines() if " -e " in line] if calls.exists() else []
    return done.stdout + done.stderr, pip


def test_demo_sh_passes_its_arguments_to_cbir_demo(scripts_repo):
    """`./scripts/demo.sh --ui-port 7960` and `--help` reach `cbir demo` unchanged; no argument is
    read as pip extras."""
    out, pip = _run(scripts_repo, "demo.sh", "--ui-port", "7960")
    assert out.rstrip().endswith("cbir demo --ui-port 7960"), out
    assert pip == [f"install --quiet -e {scripts_repo}"], pip
    out, pip = _run(scripts_repo, "demo.sh", "--help")
    assert out.rstrip().endswith("cbir demo --help") and pip == [], out


def test_demo_sh_and_test_sh_installs_do_not_undo_each_other(scripts_repo):
    """The first install says it takes a few minutes; test.sh adds the dev extra once; after that
    neither script installs again, whichever runs; a changed pyproject.toml installs again."""
    out, pip = _run(scripts_repo, "demo.sh")
    assert "first time: a few minutes" in out and pip == [f"install --quiet -e {scripts_repo}"]
    out, pip = _run(scripts_repo, "test.sh", "-k", "x")
    assert pip == [f"install --quiet -e {scripts_repo}[dev]"] and "first time" not in out, out
    assert "adding the [dev] extra" in out and out.rstrip().endswith("pytest -k x")
    for script in ("demo.sh", "test.sh", "demo.sh", "test.sh"):
        out, pip = _run(scripts_repo, script)
        assert pip == [] and "install" not in out, (script, out)

    fresh = scripts_repo.parent / "fresh"  # a dev install first: the demo accepts it
    shutil.copytree(scripts_repo, fresh)
    for marker in (fresh / ".venv").glob(".installed-*"):
        marker.unlink()
    assert _run(fresh, "test.sh")[1] == [f"install --quiet -e {fresh}[dev]"]
    assert _run(fresh, "demo.sh")[1] == []

    with (scripts_repo / "pyproject.toml").open("a") as f:
        f.write("\n# changed\n")
    out, pip = _run(scripts_repo, "demo.sh")
    assert pip == [f"install --quiet -e {scripts_repo}"] and "pyproject.toml changed" in out, out
    assert [m.name.count("-") for m in (scripts_repo / ".venv").glob(".installed-*")] == [1]  # stale ones gone
