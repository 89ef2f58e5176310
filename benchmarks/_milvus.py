"""The embedded Milvus standalone of the `milvus` package (`milvus-server`) on loopback, for the benchmarks
and tests of the milvus backend: its gRPC proxy and its embedded etcd on free ports (etcd's peer port is
otherwise fixed at 2380: one server per machine), in a process group of its own."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

SERVER_BIN = Path(sys.executable).parent / "milvus-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def embedded_milvus(folder: Path, start_timeout_s: float = 180.0) -> Iterator[str]:
    """Start the server with its data and log in `folder`, yield its URI once a client connects, stop it."""
    import pymilvus

    client_port, peer_port, proxy_port = free_port(), free_port(), free_port()
    etcd = folder / "etcd.yaml"
    etcd.write_text(f"name: default\nlisten-client-urls: http://127.0.0.1:{client_port}\n"
                    f"advertise-client-urls: http://127.0.0.1:{client_port}\n"
                    f"listen-peer-urls: http://127.0.0.1:{peer_port}\n"
                    f"initial-advertise-peer-urls: http://127.0.0.1:{peer_port}\n"
                    f"initial-cluster: default=http://127.0.0.1:{peer_port}\n")
    log_path = folder / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 (open while the server runs)
    process = subprocess.Popen(
        [str(SERVER_BIN), "--data", str(folder / "data"), "--etcd-port", str(client_port), "--proxy-port", str(proxy_port)],
        env={**os.environ, "ETCD_CONFIG_PATH": str(etcd)}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{proxy_port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                pymilvus.MilvusClient(uri, timeout=2).close()
                break
            except pymilvus.exceptions.MilvusException:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"milvus-server did not start: {log_path.read_text(errors='replace')[-2000:]}")
                time.sleep(0.5)
        yield uri
    finally:
        stop_group(process)
        log.close()


def stop_group(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop the wrapper and the milvus process it started (a process group): SIGTERM, then SIGKILL for what is
    left after `grace_s` (milvus can hang in its graceful shutdown once its coordinators have stopped)."""
    os.killpg(process.pid, signal.SIGTERM)
    process.wait()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
