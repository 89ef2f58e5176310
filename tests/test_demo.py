"""`cbir demo`, the README's main job, run for real: it builds the demo index, starts the four
services as processes, answers searches, and stops everything on Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from cbir.client import GatewayClient
from conftest import DEMO_PHOTOS, E2E_PHOTOS

pytestmark = pytest.mark.slow


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_demo_builds_serves_answers_and_stops_cleanly_on_ctrl_c(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in E2E_PHOTOS[:6]:
        (photos / name).write_bytes((DEMO_PHOTOS / name).read_bytes())
    ui, gateway, embedder, indexer, metrics = _free_ports(5)
    command = [
        sys.executable, "-m", "cbir", "demo", "--photos", str(photos), "--workdir", str(tmp_path / "work"),
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

        with GatewayClient(f"127.0.0.1:{gateway}") as client:
            hits = client.search_image((photos / E2E_PHOTOS[2]).read_bytes(), k=3).hits
        assert hits[0].item_id == E2E_PHOTOS[2]
        with urllib.request.urlopen(f"http://127.0.0.1:{ui}/", timeout=10) as page:
            assert page.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as scrape:
            assert b'cbir_grpc_server_handled_total{grpc_code="OK",grpc_method="SearchByImage"' in scrape.read()

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
