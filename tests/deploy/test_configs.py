"""The deploy configs (compose's and Kubernetes's) are valid service settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from service.settings import ServiceSettings, load_settings

from .conftest import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "deploy" / "config").glob("*.toml"))


def k8s_config(tmp_path: Path) -> Path:
    configmap = yaml.safe_load((REPO_ROOT / "deploy" / "k8s" / "configmap.yaml").read_text())
    path = tmp_path / "config.toml"
    path.write_text(configmap["data"]["config.toml"])
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_compose_configs_load(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOME_CONFIG_FILE", raising=False)
    settings = load_settings(path)
    assert settings.models and settings.limits.drain_timeout_s > 0
    expected_device = "cpu" if path.stem == "cpu" else "cuda"
    assert settings.device == expected_device


def test_k8s_configmap_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOME_CONFIG_FILE", raising=False)
    settings: ServiceSettings = load_settings(k8s_config(tmp_path))
    assert settings.device == "cuda"


def test_there_are_gpu_and_cpu_configs() -> None:
    assert {p.name for p in CONFIGS} >= {"gpu.toml", "cpu.toml"}
