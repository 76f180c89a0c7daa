"""The real server (``python -m service.cli``) in a subprocess, on a free loopback port, for benchmarks."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]


def interpreter() -> str:
    """The CPython the server runs on (this one): its version and real path. How it was built moves the
    host path's CPU per image by 4-13% (BENCHMARKS.md), so every report names it."""
    return f"Python {platform.python_version()} at {os.path.realpath(sys.executable)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The CLI with ``config_text`` written to ``workdir``; ready once /readyz says so.

    ``pid`` is the root of the server's process tree: whatever processes the service starts are its
    descendants.
    """

    def __init__(
        self,
        config_text: str,
        workdir: Path,
        log_level: str = "warning",
        nice: int = 0,
        cpus: str | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / f"server-{self.port}.toml"
        self.config.write_text(config_text)
        self.log_path = workdir / f"server-{self.port}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        cmd = ["nice", "-n", str(nice)] if nice else []  # a lower priority than a load generator's
        cmd += ["taskset", "-c", cpus] if cpus else []  # e.g. cores of its own, apart from the generator's
        cmd += [sys.executable, "-m", "service.cli", "--config", str(self.config)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", log_level]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM the root (the service drains and stops its own children); whatever of the tree is
        still alive after ``timeout`` is killed, so a benchmark never leaves processes behind."""
        try:
            descendants = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _, alive = psutil.wait_procs(descendants, timeout=10)
        for p in alive:
            p.kill()
        self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
