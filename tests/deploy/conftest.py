"""Fixtures for the deploy tests: the repository's paths and one real tome-serve process per session."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_DEMO_CONFIG = REPO_ROOT / "service" / "configs" / "cpu-demo.toml"
SHARED_IMAGES = REPO_ROOT.parent / "shared" / "data" / "imagenet-sample"
START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@dataclass
class LiveServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

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
    port = free_port()
    log = tmp_path_factory.mktemp("tome-serve") / "server.log"
    cmd = [sys.executable, "-m", "service.cli", "--config", str(CPU_DEMO_CONFIG)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", port, proc, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tome-serve exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                if http_get(server.url + "/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tome-serve not ready after {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")
            time.sleep(0.25)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
