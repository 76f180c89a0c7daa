"""Start a real server process for a test, wait until it answers, and always stop it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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


def read_response(sock: socket.socket, timeout: float) -> str:
    """One whole HTTP/1.1 response, its head and then Content-Length bytes of body, which may come in
    separate segments (a streamed answer writes them apart); what arrived, if the peer closes first."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode(errors="replace")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [
        line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    ]
    while len(body) < (int(lengths[0]) if lengths else 0) and (chunk := sock.recv(65536)):
        body += chunk
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def log_tail(log: Path, n: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


@contextmanager
def running(
    cmd: Sequence[str], ready_url: str, log: Path, timeout_s: float, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` (output to ``log``) until ``ready_url`` answers 200; stop it on exit, whatever happens.

    Fails the test with the log's tail if the process exits or is not ready within ``timeout_s``.
    """
    with log.open("wb") as out:
        proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{cmd[0]} exited with {proc.returncode}:\n{log_tail(log)}")
            try:
                if http_get(ready_url, timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{cmd[0]} not ready after {timeout_s:.0f} s:\n{log_tail(log)}")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def serving(
    config: Path,
    log: Path,
    timeout_s: float = 120,
    ready_path: str = "/readyz",
    log_level: str = "warning",
) -> Iterator[tuple[str, int, subprocess.Popen[bytes]]]:
    """``python -m service.cli --config config`` on a free loopback port, from the repository root, until
    ``ready_path`` answers 200: (base URL, port, process); stopped on exit, whatever happens."""
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "--config", str(config)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", log_level]
    url = f"http://127.0.0.1:{port}"
    with running(cmd, url + ready_path, log, timeout_s, cwd=REPO) as proc:
        yield url, port, proc
