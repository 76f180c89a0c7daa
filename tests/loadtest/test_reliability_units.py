"""The reliability bench's own parts: core lists for taskset, the health poller, CPU accounting."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

from loadtest import reliability
from loadtest.reliability import _poll, cpu_during, cpu_list


def test_cpu_list_reads_taskset_lists() -> None:
    assert cpu_list("1") == {1}
    assert cpu_list("0,2-3") == {0, 2, 3}


def _slow_health_server(clients: set[tuple[str, int]]) -> http.server.ThreadingHTTPServer:
    """Answers every GET after 50 ms, recording each connection's client address."""

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            clients.add(self.client_address)
            time.sleep(0.05)
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    return http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)


def test_the_poller_times_each_probe_on_a_new_connection_and_records_failures() -> None:
    clients: set[tuple[str, int]] = set()
    server = _slow_health_server(clients)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    stop, seen = threading.Event(), []
    poller = threading.Thread(target=_poll, args=(url, "/healthz", stop, seen))
    poller.start()
    time.sleep(1.2)  # every 0.5 s: 3 probes
    stop.set()
    poller.join()
    server.shutdown()
    server.server_close()
    assert len(seen) >= 2 and all(0.05 <= s < 2 for s in seen)
    assert len(clients) == len(seen)  # a new connection (client port) per probe, like a kubelet

    stop, failed = threading.Event(), []
    stop_later = threading.Timer(0.2, stop.set)
    stop_later.start()
    _poll(url, "/healthz", stop, failed)  # the server is gone
    assert failed and all(s == float("inf") for s in failed)


def test_overload_offers_each_load_against_the_capacity_measured_just_before_it(monkeypatch) -> None:
    """The VM's speed drifts: each load's rate follows the latest capacity (not the first), and the
    report says what was offered against the capacities around it."""
    capacities = iter([100.0, 80.0, 120.0, 60.0])
    offered: list[float] = []

    def one_load(server, work, rate, seconds, probe_port, generator, load):
        offered.append(rate)
        return {
            "goodput_rps": rate / 2,
            "served_ips": rate / 2,
            "healthz_max_s": 0.1,
            "readyz_max_s": 0.1,
            "probe_port_healthz_max_s": 0.1,
            "probe_port_readyz_max_s": 0.1,
        }

    monkeypatch.setattr(reliability, "capacity", lambda server, work: next(capacities))
    monkeypatch.setattr(reliability, "cpu_cores_during", lambda server, fn: (fn(), {"server": 1.0}))
    monkeypatch.setattr(reliability, "_one_load", one_load)
    monkeypatch.setattr(reliability.time, "sleep", lambda s: None)
    out = reliability.overload(None, None, [1.5, 3.0], 1.0, 0, "h2load", rounds=1)  # type: ignore[arg-type]
    assert offered == [150.0, 240.0]  # 1.5 x 100, then 3 x 80
    assert out["1.5x"]["offered_of_capacity"] == round(150 / 90, 3)
    assert out["3.0x"]["offered_of_capacity"] == round(240 / 100, 3)
    assert out["3.0x"]["goodput_of_capacity"] == round(120 / 100, 3)


def test_cpu_cores_during_tells_the_generators_cpu_from_the_servers(monkeypatch) -> None:
    """A child process that spins for 0.6 s of CPU counts as the generator's; an idle server's tree counts
    ~0. Checked on the CPU seconds, which a slow or oversubscribed host does not shrink (the cores, CPU
    seconds per wall second, it does: a spinner that gets half a core takes twice as long)."""
    seconds: list[tuple[float, float, float]] = []

    def recorded(server, fn):
        result, server_s, generator_s, wall = cpu_during(server, fn)
        seconds.append((server_s, generator_s, wall))
        return result, server_s, generator_s, wall

    monkeypatch.setattr(reliability, "cpu_during", recorded)
    idle_server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)  # past the interpreter's start-up
        spin = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass"
        _, cores = reliability.cpu_cores_during(
            SimpleNamespace(pid=idle_server.pid),  # type: ignore[arg-type]
            lambda: subprocess.run([sys.executable, "-c", spin], check=True),
        )
    finally:
        idle_server.kill()
        idle_server.wait()
    ((server_s, generator_s, wall),) = seconds
    assert generator_s >= 0.55, "the spinner's 0.6 s of CPU, less rounding"
    assert server_s < 0.1
    assert wall >= generator_s - 0.05  # one single-threaded child: no more CPU than wall time
    assert cores == {"server": round(server_s / wall, 3), "generator": round(generator_s / wall, 3)}
