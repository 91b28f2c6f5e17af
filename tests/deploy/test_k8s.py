"""deploy/k8s/: every manifest validated (strict) against the Kubernetes API schemas that kubernetes-validate
ships, then checked for what the server needs: probes on /health at the served port, time to load a model,
time to drain, one GPU per pod where asked, settings that exist."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from steerserve.server.settings import ServerSettings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
MANIFESTS = sorted(K8S.rglob("*.yaml"))
VERSIONS = ("1.30.0", "1.37.0")  # an older still-common release and the newest the package knows
needs_validator = pytest.mark.skipif(importlib.util.find_spec("kubernetes_validate") is None,
                                     reason="kubernetes-validate is not installed (pip install kubernetes-validate==1.37.0)")


def docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(path, doc) for path in MANIFESTS for doc in docs(path) if doc["kind"] == kind]


@needs_validator
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid_kubernetes(path: Path, version: str) -> None:
    import kubernetes_validate

    for doc in docs(path):
        kubernetes_validate.validate(doc, version, strict=True)


@needs_validator
def test_the_validator_rejects_a_misspelt_field() -> None:
    import kubernetes_validate

    (_, deployment), *_ = by_kind("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def configmap() -> dict[str, str]:
    ((_, found),) = by_kind("ConfigMap")
    return found["data"]


def test_configmap_sets_only_real_settings() -> None:
    known = {f"STEERSERVE_{name.upper()}" for name in ServerSettings.model_fields}
    assert set(configmap()) <= known, set(configmap()) - known


@pytest.mark.parametrize("path", [p for p, _ in by_kind("Deployment")], ids=lambda p: str(p.relative_to(K8S)))
def test_deployment_probes_health_on_the_served_port(path: Path) -> None:
    (deployment,) = docs(path)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["http"] == int(configmap()["STEERSERVE_PORT"])
    assert container["envFrom"] == [{"configMapRef": {"name": "steerserve"}}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "time for the model to load"
    assert pod["terminationGracePeriodSeconds"] > float(configmap()["STEERSERVE_SHUTDOWN_GRACE_S"])
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert container["resources"]["limits"]["memory"]


def test_gpu_deployment_asks_for_as_many_gpus_as_it_splits_the_model_over() -> None:
    (deployment,) = docs(K8S / "gpu" / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    command = container["command"]
    assert int(command[command.index("--tensor-parallel-size") + 1]) == gpus
    assert container["image"] == "steerserve:gpu"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    cpu = [doc for path, doc in by_kind("Deployment") if path.parent == K8S]
    assert cpu and not any("nvidia.com/gpu" in str(doc) for doc in cpu), "the CPU pods ask for no GPU"


def test_service_hpa_and_pdb_select_the_deployment() -> None:
    ((_, service),) = by_kind("Service")
    ((_, hpa),) = by_kind("HorizontalPodAutoscaler")
    ((_, pdb),) = by_kind("PodDisruptionBudget")
    for _, deployment in by_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert hpa["spec"]["minReplicas"] >= pdb["spec"]["minAvailable"] + 1, "a drain never takes the last pod"
