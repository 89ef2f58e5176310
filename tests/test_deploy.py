"""The container deployment's files, checked without a container engine: docker-compose.yml, the
Dockerfiles, the per-image requirement lists, Prometheus' configuration and alert rules, the
Grafana dashboard, and the `cbir health` check the containers run. (deploy/smoke.sh builds and runs
all of it for real; that takes minutes and a container engine, so it is not part of this suite.)"""

from __future__ import annotations

import http.server
import importlib.metadata
import json
import pathlib
import re
import subprocess
import sys
import threading

import pytest
import yaml
from click.testing import CliRunner

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SERVICES = ["embedder", "indexer", "gateway", "ui"]
# The long-running cbir services and the port their health check must ask.
GRPC_PORTS = {"embedder": 50051, "indexer": 50052, "gateway": 50050}
METRICS_PORTS = {"gateway": 9100, "embedder": 9101, "indexer": 9102, "ui": 7860}

sys.path.insert(0, str(DEPLOY))
import requirements as image_requirements  # noqa: E402  (deploy/requirements.py)


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# ----------------------------------------------------------------------------------- compose
def test_compose_has_the_whole_stack_with_health_checks_over_the_grpc_health_protocol():
    """Every service of the issue is there, and every cbir service's health check is `cbir health`
    against its own gRPC port (the gRPC health protocol: SERVING only once loaded), not a port probe."""
    services = compose()["services"]
    assert set(services) >= {"embedder", "indexer", "gateway", "ui", "prometheus", "grafana", "indexer-build", "weights"}
    for name, port in GRPC_PORTS.items():
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "cbir", "health"], f"{name}: {test}"
        assert test[-1] == f"127.0.0.1:{port}", f"{name} health check asks {test[-1]}"
    assert services["ui"]["healthcheck"]["test"][-1] == "http://127.0.0.1:7860/"
    for name in ("prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"], name


def test_compose_depends_on_waits_for_health_and_for_the_one_shot_jobs():
    """The start order of the issue: health, not just start. The gateway needs only the indexer
    started: it must come up when the indexer has no bundle, to report that. The indexer waits for
    its bundle by itself, so it depends on nothing (podman cannot start a container that requires an
    exited one-shot container whose own dependencies run)."""
    services = compose()["services"]
    assert "depends_on" not in services["indexer"]
    expected = {
        ("embedder", "weights"): "service_completed_successfully",
        ("indexer-build", "embedder"): "service_healthy",
        ("gateway", "embedder"): "service_healthy",
        ("gateway", "indexer"): "service_started",
        ("ui", "gateway"): "service_healthy",
        ("grafana", "prometheus"): "service_healthy",
    }
    for (service, dependency), condition in expected.items():
        assert services[service]["depends_on"][dependency]["condition"] == condition, (service, dependency)


def test_compose_scaled_services_can_scale_and_are_reached_through_dns_round_robin():
    """`--scale embedder=3 --scale indexer=2` needs services without fixed host ports or container
    names; the gateway must use dns:/// targets (gRPC re-resolves them to every replica)."""
    services = compose()["services"]
    for name in ("embedder", "indexer"):
        assert "ports" not in services[name] and "container_name" not in services[name], name
    environment = services["gateway"]["environment"]
    assert environment["CBIR_GATEWAY_EMBEDDER_TARGET"] == "dns:///embedder:50051"
    assert environment["CBIR_GATEWAY_INDEXER_TARGET"] == "dns:///indexer:50052"
    # Replicas end connections after a while so that the gateway resolves the name again and uses
    # replicas added to a running stack (see test_max_connection_age_...).
    assert services["embedder"]["environment"]["CBIR_EMBEDDER_MAX_CONNECTION_AGE_S"].startswith("${CBIR_MAX_CONNECTION_AGE_S:-")
    assert services["indexer"]["environment"]["CBIR_INDEXER_MAX_CONNECTION_AGE_S"].startswith("${CBIR_MAX_CONNECTION_AGE_S:-")
    build = " ".join(services["indexer-build"]["command"])
    assert "--embedder dns:///embedder:50051" in build
    assert "gateway:50050" == services["ui"]["environment"]["CBIR_UI_GATEWAY_TARGET"]


def test_compose_volumes_bundle_read_only_for_the_indexer_and_weights_shared():
    services = compose()["services"]
    assert "bundles:/bundles:ro" in services["indexer"]["volumes"]
    assert "bundles:/bundles" in services["indexer-build"]["volumes"]
    for name in ("weights", "embedder"):
        assert "weights:/var/cache/cbir" in services[name]["volumes"], name
    assert set(compose()["volumes"]) >= {"weights", "bundles", "prometheus", "grafana"}


def test_compose_cbir_containers_are_hardened_and_publish_on_loopback_by_default():
    services = compose()["services"]
    for name in ("weights", "embedder", "indexer-build", "indexer", "gateway", "ui"):
        service = services[name]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert "/tmp" in service["tmpfs"], name
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("${CBIR_PUBLISH_ADDRESS:-127.0.0.1}:"), (name, port)


def _variables(text: str) -> dict[str, str | None]:
    """${NAME:-default} / ${NAME} uses in a compose file -> their default."""
    found: dict[str, str | None] = {}
    for name, default in re.findall(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}", text):
        found.setdefault(name, default)
    return found


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


def test_env_example_lists_every_compose_variable_with_its_default():
    """.env.example is the documentation of the compose file's knobs: none missing, none stale,
    and each shows the default the compose file really uses."""
    used = _variables((ROOT / "docker-compose.yml").read_text())
    used_gpu = _variables((DEPLOY / "compose.gpu.yml").read_text())
    example = _env_example()
    assert set(used) - set(example) == set(), "variables of docker-compose.yml missing in .env.example"
    assert set(example) - set(used) - set(used_gpu) == set(), ".env.example lists variables nothing uses"
    for name, default in used.items():
        assert example[name] == (default or ""), f"{name}: .env.example says {example[name]!r}, compose uses {default!r}"


def test_gpu_override_reserves_a_gpu_and_builds_tensorflow_with_cuda():
    override = yaml.safe_load((DEPLOY / "compose.gpu.yml").read_text())["services"]["embedder"]
    assert override["build"]["args"]["TENSORFLOW_EXTRAS"] == "and-cuda"
    device = override["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


# ----------------------------------------------------------------------------------- Dockerfile
DOCKERFILE = DEPLOY / "Dockerfile"


def _stages() -> dict[str, str]:
    """Stage name -> its instructions (from its FROM line on), continuation lines joined, comments
    and blank lines left out."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines) + "\n")
    stages = {}
    for stage in re.split(r"^FROM ", text, flags=re.M)[1:]:
        head = stage.split("\n", 1)[0]
        match = re.fullmatch(r"(\S+) AS (\S+)", head.strip())
        assert match, f"unnamed stage: FROM {head}"
        stages[match.group(2)] = stage
    return stages


def test_one_dockerfile_with_a_target_per_service_and_no_copied_stages():
    """One multi-stage deploy/Dockerfile (no per-service Dockerfiles any more): shared stages
    written once (requirements, builder, code, runtime), a small deps stage and a final target per
    service; build tools, the user and the code build appear once in the whole file."""
    assert not list(DEPLOY.glob("*/Dockerfile")), "per-service Dockerfiles are back"
    stages = _stages()
    assert list(stages) == ["requirements", "builder", *(f"deps-{s}" for s in SERVICES), "code", "runtime", *SERVICES]
    text = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#"))
    for once in ("apt-get update", "useradd", "python3 -m venv", "pip wheel", "COPY cbir ", "ENTRYPOINT"):
        assert text.count(once) == 1, once
    for name, stage in stages.items():
        assert stage.startswith(("python:3.11-slim AS", "builder AS", "runtime AS")), name
    for service in SERVICES:  # the per-service stages differ in their names only or are short
        assert len(stages[f"deps-{service}"].strip().splitlines()) == 3
        assert stages[f"deps-{service}"].replace(f"-{service}", "-X") == stages["deps-embedder"].replace("-embedder", "-X")
    assert "--tensorflow-extras \"${TENSORFLOW_EXTRAS}\"" in stages["requirements"]
    # compose builds each image from this file's target of the same name
    for name, service in compose()["services"].items():
        if "build" in service:
            target = service["build"]["target"]
            assert service["build"]["dockerfile"] == "deploy/Dockerfile" and service["build"]["context"] == "."
            assert service["image"].startswith(f"${{CBIR_IMAGE_PREFIX:-cbir}}-{target}:"), name


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_target_is_slim_non_root_with_a_grpc_health_check(service):
    """The image rules, per target: built on the python:3.11-slim runtime stage (the non-root user
    10001, PYTHONUNBUFFERED, `cbir` as entry point), no build tools, runs as uid 10001, and checks
    health with `cbir health` (gRPC health protocol; the UI: its page) on the port it listens on."""
    stages = _stages()
    runtime, final = stages["runtime"], stages[service]
    assert runtime.startswith("python:3.11-slim AS runtime\n")
    assert "--uid 10001 --gid 10001" in runtime and "PYTHONUNBUFFERED=1" in runtime
    assert re.search(r'^ENTRYPOINT \["cbir"\]$', runtime, re.M)
    assert final.startswith(f"runtime AS {service}\n")
    for tool in ("apt-get", "g++", "build-essential", "pip install"):
        assert tool not in final and tool not in runtime, tool
    assert re.search(r"^USER 10001:10001$", final, re.M)
    # The dependencies' venv and the code are separate layers: a code change leaves the first.
    deps, code = f"COPY --from=deps-{service} /opt/venv /opt/venv", "COPY --from=code /opt/cbir /opt/cbir"
    assert deps in final and code in final and final.index(deps) < final.index(code)
    assert "/opt/cbir/bin" in runtime.split("ENV PATH=", 1)[1].split()[0]  # where the `cbir` script is
    healthcheck = re.search(r"^HEALTHCHECK .* CMD (.+)$", final, re.M)
    assert healthcheck, "no HEALTHCHECK"
    prefix = f"CBIR_{service.upper()}_PORT"
    assert re.search(rf"{prefix}=\d+", final)
    if service == "ui":
        assert healthcheck.group(1) == 'cbir health --quiet --timeout 4 "http://127.0.0.1:${CBIR_UI_PORT}/"'
    else:
        assert healthcheck.group(1) == f'cbir health --quiet --timeout 4 "127.0.0.1:${{{prefix}}}"'
        assert f"{prefix}={GRPC_PORTS[service]}" in final
    assert f'CMD ["serve", "{service}"]' in final


def test_dockerfile_documents_the_health_checks_tls_variables():
    """With TLS the HEALTHCHECK command stays the same: `cbir health` reads CBIR_HEALTH_TLS_*;
    the Dockerfile, compose file and Kubernetes notes say so."""
    names = ["CBIR_HEALTH_TLS_CA", "CBIR_HEALTH_TLS_CERT", "CBIR_HEALTH_TLS_KEY", "CBIR_HEALTH_TLS_SERVER_NAME"]
    for path in (DOCKERFILE, ROOT / "docker-compose.yml", DEPLOY / "k8s" / "kustomization.yaml"):
        text = path.read_text()
        assert all(name in text for name in names), path


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_installs_dependencies_before_copying_the_code(service):
    """Layer caching: a code change must not reinstall TensorFlow. Each image's requirement list
    is made from pyproject.toml by deploy/requirements.py; the install stage sees only that list,
    so pyproject changes outside the image's share leave it cached. The code stage copies every
    package the `cbir` command needs (apps/ too: its entry point is apps.cli:main)."""
    stages = _stages()
    deps = stages[f"deps-{service}"]
    assert f"COPY --from=requirements /requirements-{service}.txt /requirements.txt" in deps
    assert "RUN pip install -r /requirements.txt" in deps and "COPY cbir" not in deps
    assert "requirements.py \"$service\"" in stages["requirements"] and service in stages["requirements"]
    code = stages["code"]
    for package in ("cbir", "services", "ui", "apps"):
        assert f"COPY {package} /src/{package}" in code, package
    assert "--target /opt/cbir" in code


def test_dockerignore_keeps_photos_bundles_and_the_venv_out_of_the_context():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert [line for line in lines if line and not line.startswith("#")][0] == "*"  # nothing unless listed
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "deploy/requirements.py", "cbir", "services", "ui", "apps"}
    code = _stages()["code"]
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", code + _stages()["requirements"], re.M))
    assert {part for line in copied for part in line.split()} <= allowed | {"deploy/requirements.py"}


# ----------------------------------------------------------------------------------- requirements
def test_image_requirements_come_pinned_from_pyproject_and_only_the_embedder_gets_tensorflow():
    pyproject = ROOT / "pyproject.toml"
    pinned = image_requirements.pinned(pyproject)
    for service in SERVICES:
        lines = image_requirements.requirements(service, pyproject)
        assert all("==" in line for line in lines), lines
        assert {image_requirements.requirement_name(line) for line in lines} <= set(pinned)
        has_tf = any(line.startswith("tensorflow") for line in lines)
        assert has_tf == (service == "embedder"), service
    gpu = image_requirements.requirements("embedder", pyproject, tensorflow_extras="and-cuda")
    assert pinned["tensorflow"].replace("tensorflow", "tensorflow[and-cuda]", 1) in gpu


def test_image_requirements_refuse_a_name_pyproject_does_not_pin(tmp_path):
    fake = tmp_path / "pyproject.toml"
    fake.write_text('[project]\nname = "x"\ndependencies = ["grpcio==1.0"]\n')
    with pytest.raises(SystemExit, match="does not list"):
        image_requirements.requirements("gateway", fake)


# What each image runs: its service, the CLI (entrypoint, health check), and for the indexer image
# the one-shot index build through the embedder service.
IMAGE_MODULES = {
    "embedder": ["services.embedder.server", "services.embedder.model", "services.embedder.weights", "apps.cli",
                 "cbir.health", "apps.ingest.build", "apps.ingest.embedding"],
    "indexer": ["services.indexer.server", "apps.cli", "cbir.health", "apps.ingest.build",
                "apps.ingest.embedding", "services.embedder.images"],
    "gateway": ["services.gateway.server", "apps.cli", "cbir.health", "cbir.client"],
    "ui": ["ui.server", "ui.app", "ui.media", "apps.cli", "cbir.health", "fastapi", "PIL.Image"],
}


def _closure(names: list[str]) -> set[str]:
    """The distributions `names` pull in when installed (their requirements, transitively)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [image_requirements.normalize(name) for name in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(image_requirements.normalize(requirement.name))
    return seen


# Run in a fresh interpreter: every import of a distribution the image would not have fails, as it
# would in the image; optional imports (Keras tries pandas, ...) must cope, required ones may not.
_IMAGE_IMPORTS = """
import importlib, importlib.abc, importlib.metadata, json, re, sys
allowed, modules = set(json.loads(sys.argv[1])), json.loads(sys.argv[2])
providers = importlib.metadata.packages_distributions()
normalize = lambda name: re.sub(r"[-_.]+", "-", name).lower()
blocked = []

class NotInImage(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        top = fullname.split(".")[0]
        dists = {normalize(d) for d in providers.get(top, [])} - {"cbir"}
        if dists and not dists & allowed:
            blocked.append(top)
            raise ModuleNotFoundError(f"No module named {fullname!r} (not in the image)", name=fullname)
        return None

sys.meta_path.insert(0, NotInImage())
for name in modules:
    importlib.import_module(name)
print(json.dumps({"loaded": sorted({m.split(".")[0] for m in sys.modules}), "blocked": sorted(set(blocked))}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("service", SERVICES)
def test_image_requirements_cover_every_module_the_image_imports(service):
    """Import what the image runs, in a fresh interpreter where every distribution the image's
    requirement list would not install (directly or as a dependency) cannot be imported: it must
    still work. TensorFlow must stay out of the indexer, gateway and UI images."""
    installed = _closure(image_requirements.SERVICES[service])
    done = subprocess.run(
        [sys.executable, "-c", _IMAGE_IMPORTS, json.dumps(sorted(installed)), json.dumps(IMAGE_MODULES[service])],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, f"{service} image cannot import its code:\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if service != "embedder":
        assert "tensorflow" not in result["loaded"] and "keras" not in result["loaded"]
        assert "tensorflow" not in installed


def test_image_import_check_fails_when_a_needed_distribution_is_missing():
    """The check above can fail: without annoy, the indexer's code does not import."""
    installed = _closure(image_requirements.SERVICES["indexer"]) - {"annoy"}
    done = subprocess.run(
        [sys.executable, "-c", _IMAGE_IMPORTS, json.dumps(sorted(installed)), json.dumps(["services.indexer.server"])],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode != 0 and "not in the image" in done.stderr


# ----------------------------------------------------------------------------------- prometheus
def _metric_samples() -> set[str]:
    """Sample names the code can expose, from its prometheus_client definitions."""
    names = {"up"}
    pattern = re.compile(r"prometheus_client\.(Counter|Gauge|Histogram|Info|Summary)\(\s*\"([a-z0-9_]+)\"", re.S)
    for path in [*ROOT.glob("cbir/*.py"), *ROOT.glob("services/*/*.py"), *ROOT.glob("ui/*.py")]:
        for kind, name in pattern.findall(path.read_text()):
            if kind == "Counter":
                base = name.removesuffix("_total")
                names |= {f"{base}_total", f"{base}_created"}
            elif kind in ("Histogram", "Summary"):
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "Info":
                names.add(f"{name}_info")
            else:
                names.add(name)
    return names


def _promql_metrics(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values are not metric names
    return set(re.findall(r"\b(cbir_[a-z0-9_]+|up)\b", expr))


def test_metric_names_list_is_not_empty_and_knows_the_grpc_metrics():
    samples = _metric_samples()
    assert {"cbir_grpc_server_handled_total", "cbir_grpc_server_handling_seconds_bucket",
            "cbir_stage_seconds_bucket", "cbir_embedder_batch_size_bucket", "cbir_indexer_items"} <= samples


def test_prometheus_scrapes_every_service_on_its_metrics_port_through_dns():
    """One job per service, found through DNS (every replica), on the port the service's own
    settings default to; the alert rules file is loaded."""
    from services.embedder.settings import EmbedderSettings
    from services.gateway.settings import GatewaySettings
    from services.indexer.settings import IndexerSettings
    from ui.settings import UiSettings

    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    defaults = {"gateway": GatewaySettings.model_fields["metrics_port"].default,
                "embedder": EmbedderSettings.model_fields["metrics_port"].default,
                "indexer": IndexerSettings.model_fields["metrics_port"].default,
                "ui": UiSettings.model_fields["port"].default}
    assert defaults == METRICS_PORTS
    services = compose()["services"]
    for service, port in METRICS_PORTS.items():
        sd = jobs[service]["dns_sd_configs"][0]
        assert sd["names"] == [service] and sd["type"] == "A" and sd["port"] == port, service
        assert service in services
        assert str(port) in " ".join(map(str, services[service].get("expose", []))) or service == "ui" \
            or any(f":{port}" in p or p.endswith(str(port)) for p in services[service].get("ports", [])), service
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]


def test_alert_rules_cover_errors_latency_and_upstreams_and_use_real_metrics():
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert {"CbirHighErrorRate", "CbirHighLatencyP99", "CbirUpstreamDown", "CbirTargetDown"} <= set(alerts)
    assert "histogram_quantile(0.99" in alerts["CbirHighLatencyP99"]["expr"]
    samples = _metric_samples()
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        unknown = _promql_metrics(rule["expr"]) - samples
        assert not unknown, f"{name} uses metrics no service exposes: {unknown}"
    tests = yaml.safe_load((DEPLOY / "prometheus/alerts_test.yml").read_text())
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert set(alerts) <= tested, f"alerts without a promtool unit test: {set(alerts) - tested}"


def test_promql_metric_extraction_sees_unknown_names():
    """The check above can fail: a misspelt metric is found."""
    assert _promql_metrics('rate(cbir_grpc_server_handeld_total{job="x"}[5m])') - _metric_samples() == {
        "cbir_grpc_server_handeld_total"}


# ----------------------------------------------------------------------------------- grafana
def test_grafana_dashboard_is_provisioned_and_shows_what_the_issue_asks_for():
    """Request rate, latency percentiles per RPC and per stage, batch sizes, errors, index size;
    every query on the provisioned Prometheus data source and over metrics the services expose."""
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/cbir.yml").read_text())["providers"][0]
    services = compose()["services"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in services["grafana"]["volumes"]
    dashboard = json.loads((DEPLOY / "grafana/dashboards/cbir.json").read_text())
    exprs = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        exprs += [target["expr"] for target in panel["targets"]]
    samples = _metric_samples()
    used = set().union(*(_promql_metrics(expr) for expr in exprs))
    assert used - samples == set()
    assert {"cbir_grpc_server_handled_total", "cbir_grpc_server_handling_seconds_bucket", "cbir_stage_seconds_bucket",
            "cbir_embedder_batch_size_bucket", "cbir_indexer_items"} <= used
    joined = "\n".join(exprs)
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (job, grpc_method, le)" in joined
    assert "sum by (service, stage, le)" in joined
    assert 'grpc_code!="OK"' in joined


# ----------------------------------------------------------------------------------- cbir health
@pytest.fixture
def grpc_service():
    from cbir.grpc_server import GrpcService

    service = GrpcService("health-test", host="127.0.0.1", port=0)
    service.start()
    yield service
    service.stop(0)


def _health(*args) -> tuple[int, str]:
    from apps.cli import main

    result = CliRunner().invoke(main, ["health", *args])
    return result.exit_code, result.output


def test_cbir_health_follows_the_grpc_health_status(grpc_service):
    """NOT_SERVING (listening, nothing loaded) is unhealthy: a port probe would have said healthy."""
    target = f"127.0.0.1:{grpc_service.port}"
    code, output = _health(target)
    assert code == 1 and "NOT_SERVING" in output
    grpc_service.set_serving(True)
    code, output = _health(target)
    assert code == 0 and "SERVING" in output
    code, output = _health("--service", "cbir.v1.Nothing", target)
    assert code == 1 and "SERVICE_UNKNOWN" in output


def test_cbir_health_of_nothing_listening_is_unreachable():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, output = _health("--timeout", "1", f"127.0.0.1:{port}")
    assert code == 1 and "UNREACHABLE" in output


def test_cbir_health_of_an_http_url_wants_200():
    statuses = {"/": 200, "/down": 503}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(statuses.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert _health(f"{base}/") == (0, f"HTTP 200: {base}/\n")
        code, output = _health(f"{base}/down")
        assert code == 1 and "HTTP 503" in output
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------------- connection age
def test_max_connection_age_ends_client_connections_so_they_resolve_again():
    """With CBIR_*_MAX_CONNECTION_AGE_S the server ends each connection after that long: the client's
    channel leaves READY (and gRPC resolves a dns:/// target again on reconnecting, which is how a
    gateway finds embedder replicas added after it connected)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cbir.grpc_server import GrpcService
    from services.embedder.settings import EmbedderSettings

    settings = EmbedderSettings(host="127.0.0.1", port=0, metrics_port=None, max_connection_age_s=0.5)
    assert settings.grpc_service_kwargs()["max_connection_age_s"] == 0.5
    service = GrpcService("age-test", **settings.grpc_service_kwargs())
    service.start()
    states: list[grpc.ChannelConnectivity] = []
    left_ready = threading.Event()

    def watch(state):
        states.append(state)
        if grpc.ChannelConnectivity.READY in states and state is not grpc.ChannelConnectivity.READY:
            left_ready.set()

    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        channel.subscribe(watch, try_to_connect=True)
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert left_ready.wait(20), f"the connection was never ended by the server: {states}"
    finally:
        channel.unsubscribe(watch)
        channel.close()
        service.stop(0)


# ----------------------------------------------------------------------------------- smoke script
def test_smoke_script_parses_and_names_the_one_dockerfile():
    subprocess.run(["bash", "-n", str(DEPLOY / "smoke.sh")], check=True)
    text = (DEPLOY / "smoke.sh").read_text()
    assert "deploy/*/Dockerfile" not in text and "deploy/Dockerfile" in text
    # podman-compose `version` prints its own version, then podman's: not the last line
    assert "version 2>/dev/null | tail -n1" not in text and "grep -i -m1 'compose'" in text


def _smoke_function(engine: str, name: str) -> str:
    """Runs one of smoke.sh's shell functions (with its VOLUMES/POD settings) and returns its output."""
    text = (DEPLOY / "smoke.sh").read_text()
    settings = "\n".join(line for line in text.splitlines() if line.startswith(("VOLUMES=", "POD=")))
    body = re.search(rf"^{name}\(\) {{.*?^}}$", text, re.S | re.M).group(0)
    script = f"ENGINE={engine}\nCOMPOSE='{'podman-compose' if engine == 'podman' else 'docker compose'}'\n" \
             f"PROJECT=cbir-smoke\n{settings}\n{body}\n{name}\n"
    return subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True).stdout


def test_smoke_keep_hint_and_teardown_remove_everything_on_podman():
    """The --keep hint removes what podman-compose 1.x `down -v` leaves (replicas 2..N, the pod,
    the network, the volumes); the teardown removes the pod too."""
    hint = _smoke_function("podman", "removal_command")
    assert hint.startswith("podman-compose -p cbir-smoke down -v")
    assert "podman rm -f -t 5 $(podman ps -aq --filter label=com.docker.compose.project=cbir-smoke)" in hint
    assert "podman pod rm -f pod_cbir-smoke" in hint and "podman network rm -f cbir-smoke_default" in hint
    assert hint.rstrip().endswith("podman volume rm -f cbir-smoke_weights cbir-smoke_bundles "
                                  "cbir-smoke_prometheus cbir-smoke_grafana")
    assert set(compose()["volumes"]) == {"weights", "bundles", "prometheus", "grafana"}
    assert _smoke_function("docker", "removal_command").strip() == "docker compose -p cbir-smoke down -v --remove-orphans"
    teardown = re.search(r"^remove_stack\(\) {.*?^}$", (DEPLOY / "smoke.sh").read_text(), re.S | re.M).group(0)
    assert 'pod rm -f "$POD"' in teardown


def test_smoke_check_waits_for_prometheus_to_scrape_the_newest_replica(monkeypatch, capsys):
    """The newest embedder replica gets its first Embed calls seconds before the check; Prometheus
    (10 s scrapes) shows them only later: the check polls within --wait instead of failing at once."""
    sys.path.insert(0, str(DEPLOY))
    import smoke_check

    scrapes = {"count": 0}

    def prom_get(url, path, **params):
        if path == "/api/v1/targets":
            return {"activeTargets": [{"labels": {"job": "embedder", "instance": f"e{i}:9101"}, "health": "up"}
                                      for i in (1, 2)]}
        if path == "/api/v1/rules":
            return {"groups": []}
        if path == "/api/v1/alerts":
            return {"alerts": []}
        query = params.get("query", "")
        if 'grpc_method="Embed"' in query and "sum by (instance)" in query:
            scrapes["count"] += 1
            newest = 0 if scrapes["count"] < 3 else 4  # scraped on the third look
            return {"result": [{"metric": {"instance": "e1:9101"}, "value": [0, "50"]},
                               {"metric": {"instance": "e2:9101"}, "value": [0, str(newest)]}]}
        if "handling_seconds_count" in query:
            return {"result": [{"metric": {}, "value": [0, "60"]}]}
        return {"result": []}

    monkeypatch.setattr(smoke_check, "prom_get", prom_get)
    monkeypatch.setattr(smoke_check.time, "sleep", lambda s: None)
    monkeypatch.setattr(smoke_check, "expressions", lambda: [])
    args = type("Args", (), dict(url="http://prom", expect_targets=["embedder=2"], min_searches=30, wait=60))()
    smoke_check.cmd_prometheus(args)
    assert scrapes["count"] == 3
    assert "e1:9101=50, e2:9101=4" in capsys.readouterr().out

    scrapes["count"] = -1000  # never scraped within the wait: a clear failure, not a hang
    clock = iter(range(0, 10_000, 5))
    monkeypatch.setattr(smoke_check.time, "monotonic", lambda: next(clock))
    with pytest.raises(SystemExit):
        smoke_check.cmd_prometheus(args)
    assert "does not show Embed requests on every embedder replica within 60 s" in capsys.readouterr().out
