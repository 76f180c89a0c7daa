"""docker-compose.yml (GPU) and docker-compose.cpu.yml fit together with the repo's configs.

`scripts/check-deploy.sh` validates the files with docker-compose itself; these tests check what
the schema cannot: that mounts, targets, names and timeouts agree with each other.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import load_settings

from .conftest import REPO_ROOT

GPU_SERVICE, CPU_SERVICE = "tome-serve", "tome-serve-cpu"


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / name).read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load("docker-compose.yml")


@pytest.fixture(scope="module")
def cpu_override() -> dict[str, Any]:
    return load("docker-compose.cpu.yml")


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host source of a service's short-syntax volumes."""
    out = {}
    for spec in service.get("volumes", []):
        # split on ":" outside ${VAR:-default} interpolations
        source, target = re.findall(r"(?:\$\{[^}]*\}|[^:])+", spec)[:2]
        out[target] = source
    return out


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, f"unexpected duration {duration!r}"
    return int(match[1] or 0) * 60 + int(match[2] or 0)


def config_of(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Path:
    container_path = Path(service["environment"]["TOME_CONFIG_FILE"])
    host_dir = mounts(service)[str(container_path.parent)]
    path = REPO_ROOT / host_dir / container_path.name
    assert path.is_file(), f"{service['environment']['TOME_CONFIG_FILE']} is not mounted from the repo"
    monkeypatch.delenv("TOME_CONFIG_FILE", raising=False)
    return path


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service["deploy"]["resources"]["reservations"]["devices"]


def test_gpu_service_reserves_one_nvidia_gpu(compose: dict[str, Any]) -> None:
    devices = gpu_devices(compose["services"][GPU_SERVICE])
    assert devices == [{"driver": "nvidia", "device_ids": ["${TOME_GPU:-0}"], "capabilities": ["gpu"]}]
    assert compose["services"][GPU_SERVICE]["build"]["args"]["VARIANT"] == "gpu"


@pytest.mark.parametrize("which", ["gpu", "cpu"])
def test_service_volumes_config_and_drain(
    which: str, compose: dict[str, Any], cpu_override: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    service = compose["services"][GPU_SERVICE] if which == "gpu" else cpu_override["services"][CPU_SERVICE]
    volumes = mounts(service)
    assert volumes["/cache/huggingface"] == "hf-cache", "hub downloads must persist in a named volume"
    assert volumes["/models"].startswith("${TOME_WEIGHTS_DIR"), "weights directory from the host"
    settings = load_settings(config_of(service, monkeypatch))
    assert settings.device == ("cuda" if which == "gpu" else "cpu")
    assert seconds(service["stop_grace_period"]) > settings.limits.drain_timeout_s
    assert service["ports"] == ["${TOME_PORT:-8000}:8000"]
    assert service["shm_size"] == "1gb", "image slots live in /dev/shm (64 MB by default in a container)"


def test_prometheus_scrapes_the_service(compose: dict[str, Any]) -> None:
    prom = compose["services"]["prometheus"]
    config_path = mounts(prom)["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load((REPO_ROOT / config_path).read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "tome-serve")
    assert job["static_configs"][0]["targets"] == [f"{GPU_SERVICE}:8000"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert prom["ports"] == ["127.0.0.1:9090:9090"], "Prometheus is published on loopback only"


def test_grafana_is_provisioned_and_keeps_no_secret(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    volumes = mounts(grafana)
    provisioning = REPO_ROOT / volumes["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "tome-serve.yml").read_text())
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert list((REPO_ROOT / volumes[dashboards_dir]).glob("*.json")), "no dashboard is provisioned"
    env = grafana["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-admin}"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert grafana["ports"] == ["127.0.0.1:3000:3000"], "Grafana is published on loopback only"


def test_cpu_override_replaces_the_gpu_service(compose: dict[str, Any], cpu_override: dict[str, Any]) -> None:
    services = cpu_override["services"]
    assert services[GPU_SERVICE] == {"profiles": ["gpu"]}, "the GPU service stays out of a CPU run"
    cpu = services[CPU_SERVICE]
    assert cpu["build"]["args"]["VARIANT"] == "cpu" and "deploy" not in cpu
    assert cpu["networks"]["default"]["aliases"] == [GPU_SERVICE], "Prometheus's target must resolve"
    gpu = compose["services"][GPU_SERVICE]
    assert cpu["restart"] == gpu["restart"] and cpu["stop_grace_period"] == gpu["stop_grace_period"]
    assert mounts(cpu) == mounts(gpu)


def nginx_upstream(conf: str) -> tuple[list[str], int]:
    """Servers of the tome_serve upstream, and client_max_body_size in bytes."""
    block = re.search(r"upstream tome_serve \{(?P<body>[^}]*)\}", conf)
    assert block, "no tome_serve upstream"
    servers = re.findall(r"^\s*server\s+([^\s;]+)", block["body"], re.MULTILINE)
    # A retried 503 counts as a failed attempt: with the default max_fails=1 one queue_full took the
    # replica out for fail_timeout (10 s). tests/deploy/test_nginx_live.py shows it in a real nginx.
    params = re.findall(r"^\s*server\s+\S+\s*([^;]*);", block["body"], re.MULTILINE)
    assert all("max_fails=0" in p.split() for p in params), f"every replica needs max_fails=0: {params}"
    size = re.search(r"client_max_body_size\s+(\d+)m;", conf)
    assert size, "client_max_body_size must be set in MiB"
    return servers, int(size[1]) * 1024 * 1024


def test_multi_gpu_override_one_replica_per_gpu(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    multi = load("docker-compose.multi-gpu.yml")
    base = compose["services"][GPU_SERVICE]
    replicas = {GPU_SERVICE: base}
    replicas.update({k: v for k, v in multi["services"].items() if k.startswith(f"{GPU_SERVICE}-gpu")})
    assert len(replicas) >= 2
    device_ids = [gpu_devices(r)[0]["device_ids"] for r in replicas.values()]
    assert device_ids[0] == ["${TOME_GPU:-0}"] and device_ids[1:] == [
        [str(i)] for i in range(1, len(replicas))
    ]
    for name, replica in replicas.items():
        assert replica["image"] == base["image"] and replica["build"] == base["build"], name
        assert mounts(replica) == mounts(base) and replica["environment"] == base["environment"], name
        assert replica["stop_grace_period"] == base["stop_grace_period"], name

    lb = multi["services"]["lb"]
    conf = (REPO_ROOT / mounts(lb)["/etc/nginx/conf.d/default.conf"]).read_text()
    servers, max_body = nginx_upstream(conf)
    assert servers == [f"{name}:8000" for name in replicas], "the load balancer must list every replica"
    assert "listen 8080;" in conf and lb["ports"] == ["${TOME_LB_PORT:-8080}:8080"]
    retry = re.search(r"proxy_next_upstream\s+([^;]+);", conf)
    assert retry and retry[1].split() == ["error", "http_503", "non_idempotent"], (
        "a 503 (no work done) or an error (a replica that is down) retries a POST on another replica; "
        "a timeout could run it twice"
    )
    assert max_body >= load_settings(config_of(base, monkeypatch)).limits.max_body_bytes
    body_buffer = re.search(r"client_body_buffer_size\s+(\d+)m;", conf)
    assert body_buffer and int(body_buffer[1]) * 2**20 >= max_body, (
        "bodies buffered in memory, not temp files"
    )

    prom = REPO_ROOT / mounts(multi["services"]["prometheus"])["/etc/prometheus/prometheus.yml"]
    job = next(j for j in yaml.safe_load(prom.read_text())["scrape_configs"] if j["job_name"] == "tome-serve")
    assert job["static_configs"][0]["targets"] == servers, "Prometheus must scrape every replica"
