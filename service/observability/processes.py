"""CPU time and resident memory of each process of the service, labelled by its role.

prometheus_client's own ``process_*`` series describe only the process that answers the scrape, which
with several front-ends is a different one each time; these cover all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry


class ProcessTreeCollector(Collector):
    """``tome_process_cpu_seconds_total{role}`` and ``tome_process_resident_memory_bytes{role}``."""

    def __init__(
        self, roles: Callable[[], dict[str, int]], registry: CollectorRegistry | None = None
    ) -> None:
        self.roles = roles
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        cpu = CounterMetricFamily(
            "tome_process_cpu_seconds", "User + system CPU time of each service process", labels=["role"]
        )
        rss = GaugeMetricFamily(
            "tome_process_resident_memory_bytes", "Resident memory of each service process", labels=["role"]
        )
        for role, pid in sorted(self.roles().items()):
            try:
                process = psutil.Process(pid)
                with process.oneshot():
                    times = process.cpu_times()
                    memory = process.memory_info().rss
            except psutil.Error:  # exited since it registered
                continue
            cpu.add_metric([role], times.user + times.system)
            rss.add_metric([role], memory)
        yield cpu
        yield rss
