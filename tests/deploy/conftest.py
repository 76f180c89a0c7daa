"""Fixtures for the deploy tests: the repository's paths and one real tome-serve process per session."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import http_get, log_tail, serving

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_DEMO_CONFIG = REPO_ROOT / "service" / "configs" / "cpu-demo.toml"
START_TIMEOUT_S = 180.0


@dataclass
class LiveServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, n: int = 40) -> str:
        return log_tail(self.log, n)

    def metrics(self) -> str:
        status, body = http_get(self.url + "/metrics")
        assert status == 200, f"/metrics answered {status}"
        return body.decode()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The real CLI (`tome-serve --config service/configs/cpu-demo.toml`) on a free loopback port."""
    log = tmp_path_factory.mktemp("tome-serve") / "server.log"
    with serving(CPU_DEMO_CONFIG, log, START_TIMEOUT_S) as (url, port, proc):
        yield LiveServer(url, port, proc, log)


def exported_series(metrics_text: str) -> set[str]:
    """Every series name a /metrics exposition can carry (histograms: _bucket, _sum, _count)."""
    names: set[str] = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


@pytest.fixture(scope="session")
def service_series(live_server: LiveServer) -> set[str]:
    """Series names the running service really exports."""
    return exported_series(live_server.metrics())
