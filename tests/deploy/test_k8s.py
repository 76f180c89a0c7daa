"""deploy/k8s: one GPU per replica, probes on the service's endpoints, grace covering the drain.

`scripts/check-deploy.sh` validates the manifests against the Kubernetes schemas; these tests check
that they agree with the service and with each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import ServiceSettings, load_settings

from .conftest import REPO_ROOT

K8S = REPO_ROOT / "deploy" / "k8s"


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            out[doc["kind"]] = doc
    return out


@pytest.fixture(scope="module")
def container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.fixture
def configmap_settings(
    docs: dict[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> ServiceSettings:
    """The settings the ConfigMap's config.toml gives the service."""
    monkeypatch.delenv("TOME_CONFIG_FILE", raising=False)
    config = tmp_path / "config.toml"
    config.write_text(docs["ConfigMap"]["data"]["config.toml"])
    return load_settings(config)


def test_every_part_is_there(docs: dict[str, dict[str, Any]]) -> None:
    expected = {"ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Service"}
    assert expected <= set(docs)
    assert docs["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"


def test_one_gpu_per_replica(container: dict[str, Any]) -> None:
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_probes_hit_the_service_endpoints(container: dict[str, Any]) -> None:
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "probe": 8001}
    assert container["args"][-2:] == ["--port", "8000"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):  # their own accept queue
        assert container[probe]["httpGet"]["port"] == "probe"


def test_the_probe_port_is_the_configured_one(configmap_settings: ServiceSettings) -> None:
    assert configmap_settings.server.probe_port == 8001


def test_grace_period_covers_prestop_and_drain(
    docs: dict[str, dict[str, Any]], container: dict[str, Any], configmap_settings: ServiceSettings
) -> None:
    drain = configmap_settings.limits.drain_timeout_s
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace = docs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(command[1]) + drain


def test_config_and_volumes_are_wired(docs: dict[str, dict[str, Any]], container: dict[str, Any]) -> None:
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert env["TOME_CONFIG_FILE"] in mounts and mounts[env["TOME_CONFIG_FILE"]]["name"] == "config"
    assert env["HF_HOME"] in mounts and "/models" in mounts
    volumes = {v["name"]: v for v in docs["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    pvc = docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc


def test_service_selects_the_pods(docs: dict[str, dict[str, Any]]) -> None:
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selector = docs["Service"]["spec"]["selector"]
    assert selector.items() <= pod_labels.items()
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == "http"


def test_scrape_annotations(
    docs: dict[str, dict[str, Any]], container: dict[str, Any], configmap_settings: ServiceSettings
) -> None:
    """Prometheus scrapes the probe port (server.probe_port serves /metrics too, "for health probes and
    scrapes"): on the main port a flood of clients delays scrapes, and the autoscaler's metric with them."""
    annotations = docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    probe_port = configmap_settings.server.probe_port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe_port is not None and ports["probe"] == probe_port
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(probe_port),
        "prometheus.io/path": "/metrics",
    }


def test_autoscaler_targets_the_deployment_on_an_exported_metric(
    docs: dict[str, dict[str, Any]], service_series: set[str]
) -> None:
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert hpa["minReplicas"] >= 1 and hpa["maxReplicas"] > hpa["minReplicas"]
    for metric in hpa["metrics"]:
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] in service_series


def test_shared_memory_for_the_image_slots(
    docs: dict[str, dict[str, Any]],
    container: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Front-ends and the engine share slots in /dev/shm; a pod's default there is 64 MB."""
    volumes = {v["name"]: v for v in docs["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory"
    config = tmp_path / "config.toml"
    config.write_text(docs["ConfigMap"]["data"]["config.toml"])
    monkeypatch.delenv("TOME_CONFIG_FILE", raising=False)
    settings = load_settings(config)
    workers = settings.server.workers
    assert 0 < workers <= int(container["resources"]["requests"]["cpu"]), "one front-end per requested CPU"
    slots_bytes = workers * settings.server.max_pending_images * 3 * 224 * 224
    assert slots_bytes < 2**30  # fits the 1Gi emptyDir with room to spare
