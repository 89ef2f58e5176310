"""deploy/k8s: every manifest validated against the Kubernetes API schemas (the ones the
`kubernetes-validate` package ships, so offline), strict (unknown fields are errors), for the
oldest Kubernetes with GA gRPC probes (1.27) and the newest the package knows; plus the rules of
the issue: gRPC probes, resource requests, non-root, read-only root filesystem, the bundle on a
read-only volume, an autoscaler for the embedder."""

from __future__ import annotations

import copy
import pathlib

import kubernetes_validate
import pytest
import yaml

K8S = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "k8s"
VERSIONS = ["1.27.0", "1.37.0"]


def documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.name, doc))
    return found


def by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in documents() if doc["kind"] == kind}


def container(name: str) -> dict:
    return by_kind("Deployment")[name]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version):
    docs = documents()
    assert len(docs) >= 12
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']} invalid for {version}: "
                        f"{'.'.join(map(str, error.path))}: {error.message}")


def test_the_validator_rejects_a_broken_manifest():
    """The validation above can fail: a misspelt field and a wrong type are both refused."""
    deployment = copy.deepcopy(by_kind("Deployment")["gateway"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(by_kind("Deployment")["gateway"])
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest_and_every_image():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    images = {c["image"] for _, doc in documents() if doc["kind"] in ("Deployment", "Job")
              for c in doc["spec"]["template"]["spec"]["containers"]}
    assert images == {image["name"] for image in kustomization["images"]}


def test_deployments_for_every_service_hardened_with_requests():
    deployments = by_kind("Deployment")
    assert set(deployments) == {"embedder", "indexer", "gateway", "ui"}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001, name
        assert pod["automountServiceAccountToken"] is False, name
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items(), name
        main = pod["containers"][0]
        security = main["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        assert {"cpu", "memory"} <= set(main["resources"]["requests"]), name
        assert any(mount["mountPath"] == "/tmp" for mount in main["volumeMounts"]), name


@pytest.mark.parametrize("name, port", [("embedder", 50051), ("indexer", 50052), ("gateway", 50050)])
def test_grpc_services_are_ready_only_when_their_grpc_health_says_serving(name, port):
    main = container(name)
    assert main["readinessProbe"]["grpc"]["port"] == port
    assert {"name": "grpc", "containerPort": port} in main["ports"]
    if name == "indexer":
        # NOT_SERVING = no bundle yet: a restart does not cure it, so liveness only asks "is it up".
        assert main["livenessProbe"]["tcpSocket"]["port"] == "grpc"
    else:
        assert main["livenessProbe"]["grpc"]["port"] == port
    if name == "embedder":
        probe = main["startupProbe"]
        assert probe["grpc"]["port"] == port and probe["periodSeconds"] * probe["failureThreshold"] >= 300


def test_replicas_are_reached_through_headless_services_and_dns_targets():
    services = by_kind("Service")
    for name in ("embedder", "indexer"):
        assert services[name]["spec"]["clusterIP"] == "None", name
    for name in ("embedder", "indexer"):  # new pods (HPA) are found when connections end and DNS is asked again
        env = {e["name"]: e["value"] for e in container(name)["env"]}
        assert float(env[f"CBIR_{name.upper()}_MAX_CONNECTION_AGE_S"]) > 0, name
    env = {e["name"]: e["value"] for e in container("gateway")["env"]}
    assert env["CBIR_GATEWAY_EMBEDDER_TARGET"] == "dns:///embedder:50051"
    assert env["CBIR_GATEWAY_INDEXER_TARGET"] == "dns:///indexer:50052"


def test_indexer_mounts_the_bundle_read_only_and_the_build_job_writes_it():
    indexer = by_kind("Deployment")["indexer"]["spec"]["template"]["spec"]
    volume = next(v for v in indexer["volumes"] if v["name"] == "bundles")
    assert volume["persistentVolumeClaim"] == {"claimName": "cbir-bundles", "readOnly": True}
    assert {"name": "bundles", "mountPath": "/bundles", "readOnly": True} in indexer["containers"][0]["volumeMounts"]
    job = by_kind("Job")["index-build"]["spec"]["template"]["spec"]
    args = job["containers"][0]["args"]
    assert args[:2] == ["index", "build"] and "dns:///embedder:50051" in args and "/bundles/demo" in args
    assert {"name": "CBIR_INDEXER_BUNDLE", "value": "/bundles/demo"} in container("indexer")["env"]


def test_embedder_autoscales_on_cpu():
    hpa = by_kind("HorizontalPodAutoscaler")["embedder"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "embedder"}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in by_kind("Deployment")["embedder"]["spec"], "the HPA owns the embedder's replica count"
