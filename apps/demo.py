"""`cbir demo`: index the demo photos, then run embedder, indexer, gateway and UI as local
processes until Ctrl-C. Each service is the same `cbir serve ...` a user would run by hand."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

from cbir import health
from cbir.logs import setup_logging

log = logging.getLogger("apps.demo")
REPO_PHOTOS = pathlib.Path(__file__).resolve().parent.parent / "demo" / "photos"


@dataclasses.dataclass
class DemoOptions:
    photos: pathlib.Path | None = None
    workdir: pathlib.Path = pathlib.Path("var/demo")
    weights: str = "auto"
    rebuild: bool = False
    ui_port: int = 7860
    gateway_port: int = 50050
    embedder_port: int = 50051
    indexer_port: int = 50052
    metrics_port_base: int = 9100  # gateway, embedder, indexer: base, base + 1, base + 2
    start_timeout_s: float = 300.0


@dataclasses.dataclass
class Service:
    name: str
    args: list[str]
    grpc_port: int | None = None
    http_port: int | None = None
    process: subprocess.Popen | None = None
    log_path: pathlib.Path | None = None


def run_demo(options: DemoOptions) -> int:
    setup_logging()
    photos = (options.photos or REPO_PHOTOS).resolve()
    workdir = options.workdir.resolve()
    bundle = workdir / "bundle"
    ensure_demo_bundle(photos, bundle, options.weights, options.rebuild)

    o = options
    metrics = o.metrics_port_base
    services = [
        Service("embedder", ["embedder", "--port", str(o.embedder_port), "--metrics-port", str(metrics + 1),
                             "--weights", o.weights], grpc_port=o.embedder_port),
        Service("indexer", ["indexer", "--port", str(o.indexer_port), "--metrics-port", str(metrics + 2),
                            "--bundle", str(bundle)], grpc_port=o.indexer_port),
        Service("gateway", ["gateway", "--port", str(o.gateway_port), "--metrics-port", str(metrics),
                            "--embedder", f"127.0.0.1:{o.embedder_port}",
                            "--indexer", f"127.0.0.1:{o.indexer_port}"], grpc_port=o.gateway_port),
        Service("ui", ["ui", "--port", str(o.ui_port), "--gateway", f"127.0.0.1:{o.gateway_port}",
                       "--media-root", str(photos)], http_port=o.ui_port),
    ]
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for service in services:
            start(service, logs)
        for service in services:
            wait_until_ready(service, options.start_timeout_s, lambda: stopping)
        print(
            "\ncbir demo is running:\n"
            f"  UI       http://127.0.0.1:{o.ui_port}\n"
            f"  gateway  127.0.0.1:{o.gateway_port}   (try: {search_hint(photos, o.gateway_port)})\n"
            f"  metrics  http://127.0.0.1:{metrics}/metrics (gateway), :{metrics + 1} (embedder), "
            f":{metrics + 2} (indexer), http://127.0.0.1:{o.ui_port}/metrics (ui)\n"
            f"  logs     {logs}\n"
            "Press Ctrl-C to stop.\n",
            flush=True,
        )
        while not stopping:
            for service in services:
                if service.process.poll() is not None:
                    raise RuntimeError(f"{service.name} exited with code {service.process.returncode}")
            time.sleep(0.5)
        return 0
    except RuntimeError as error:
        log.error("%s", error)
        for service in services:
            if service.process is not None and service.process.poll() is not None:
                print_log_tail(service)
        return 1
    finally:
        stop_all(services)


DEFAULT_GATEWAY_PORT = DemoOptions.gateway_port  # what `cbir search --gateway` defaults to


def search_hint(photos: pathlib.Path, gateway_port: int, *, cwd: pathlib.Path | None = None) -> str:
    """A `cbir search` command line that works as printed, from the shell the demo was started in:
    the `cbir` of this environment by its path (`.venv/bin` is not on the user's PATH), a photo
    of the demo collection, and `--gateway` unless the gateway is where `cbir search` looks."""
    cwd = (cwd or pathlib.Path.cwd()).resolve()
    cbir = pathlib.Path(sys.executable).parent / "cbir"  # the venv's bin folder, symlinks kept
    if cbir.exists():
        command = _shown(cbir.absolute(), cwd)
        if "/" not in command:
            command = "./" + command
    else:  # not installed as a script (e.g. run from a source tree): the module works everywhere
        command = f"{sys.executable} -m apps"
    images = sorted(p for p in photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.is_file())
    preferred = [p for p in images if p.name == "skimage-astronaut.jpg"]
    photo = (preferred or images or [photos / "photo.jpg"])[0]
    hint = f"{command} search {_quote(_shown(photo, cwd))}"
    if gateway_port != DEFAULT_GATEWAY_PORT or os.environ.get("CBIR_GATEWAY_TARGET"):
        hint += f" --gateway 127.0.0.1:{gateway_port}"
    return hint


def _shown(path: pathlib.Path, cwd: pathlib.Path) -> str:
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        return str(path)


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def ensure_demo_bundle(photos: pathlib.Path, bundle: pathlib.Path, weights: str, rebuild: bool) -> None:
    """Build the demo bundle unless one built with the same model already exists."""
    from apps.ingest.build import BuildOptions, build_index
    from apps.ingest.embedding import LocalEmbedding
    from services.embedder.embedder import Embedder
    from services.embedder.settings import EmbedderSettings

    settings = EmbedderSettings(weights=weights)
    embedder = Embedder.from_settings(settings)
    current = _current_manifest(bundle)
    if current and not rebuild and current.get("model", {}).get("fingerprint") == embedder.info.fingerprint:
        log.info("demo bundle %s is up to date (%s items)", bundle, current.get("item_count"))
        return
    log.info("building the demo index over %s", photos)
    result = build_index(photos, bundle, LocalEmbedding(embedder), BuildOptions())
    log.info("built %s: %d images in %.1f s (%.1f images/s), %d rejected",
             result.bundle, result.items, result.seconds, result.images_per_second, result.rejected)


def _current_manifest(bundle: pathlib.Path) -> dict | None:
    from cbir.bundle import MANIFEST_FILE, read_current
    from cbir.errors import BundleError

    try:
        version = read_current(bundle)
        return json.loads((bundle / version / MANIFEST_FILE).read_text()) if version else None
    except (OSError, ValueError, BundleError):  # no usable bundle: build one
        return None


def start(service: Service, logs: pathlib.Path) -> None:
    service.log_path = logs / f"{service.name}.log"
    handle = service.log_path.open("w")
    command = [sys.executable, "-m", "apps", "serve", *service.args]
    log.info("starting %s: %s", service.name, " ".join(command[1:]))
    # Own process group: Ctrl-C reaches only the demo, which then stops the services in order.
    service.process = subprocess.Popen(
        command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_until_ready(service: Service, timeout_s: float, stopping) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stopping():
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited during start-up (code {service.process.returncode})")
        if _ready(service):
            log.info("%s is ready", service.name)
            return
        time.sleep(0.5)
    if not stopping():
        raise RuntimeError(f"{service.name} not ready after {timeout_s:.0f} s; see {service.log_path}")


def _ready(service: Service) -> bool:
    if service.grpc_port is not None:
        target = f"127.0.0.1:{service.grpc_port}"
    else:
        target = f"http://127.0.0.1:{service.http_port}/"
    return health.check(target, timeout_s=1).healthy


def stop_all(services: list[Service], grace_s: float = 10.0) -> None:
    for service in reversed(services):
        if service.process is not None and service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
    for service in reversed(services):
        if service.process is None:
            continue
        try:
            service.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", service.name, grace_s)
            service.process.kill()
            service.process.wait()
    if any(s.process is not None for s in services):
        log.info("all services stopped")


def print_log_tail(service: Service, lines: int = 30) -> None:
    if service.log_path and service.log_path.exists():
        tail = service.log_path.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- last lines of {service.log_path} ---", *tail, sep="\n", file=sys.stderr)
