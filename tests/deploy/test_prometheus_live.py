"""A real Prometheus, with the repo's scrape config pointed at a real tome-serve, sees the requests sent.

Needs Debian's prometheus (`scripts/install-test-deps.sh` installs it); skipped, saying so, without it.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import free_port, http_get, running
from tests.shared_data import sample_images

from .conftest import REPO_ROOT, LiveServer

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not installed (run scripts/install-test-deps.sh as root)"
)
SCRAPE_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
TIER = "fast"
WAIT_S = 60.0


def scrape_config_for(target: str) -> dict[str, Any]:
    """The repo's config with its tome-serve target rewritten and a 1 s scrape interval."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "tome-serve")
    assert job["static_configs"] == [{"targets": ["tome-serve:8000"]}]
    job["static_configs"] = [{"targets": [target]}]
    config["global"]["scrape_interval"] = "1s"
    return config


@pytest.fixture(scope="module")
def prometheus(live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert PROMETHEUS is not None
    work = tmp_path_factory.mktemp("prometheus")
    shutil.copytree(SCRAPE_CONFIG.parent / "rules", work / "rules")  # rule_files are relative to the config
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config_for(f"127.0.0.1:{live_server.port}")))
    port = free_port()
    log = work / "prometheus.log"
    cmd = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    url = f"http://127.0.0.1:{port}"
    with running(cmd, url + "/-/ready", log, WAIT_S):
        yield url


def query(prom_url: str, promql: str) -> list[dict[str, Any]]:
    status, body = http_get(f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert status == 200, body[:300]
    data = json.loads(body)
    assert data["status"] == "success", data
    return data["data"]["result"]


def scalar(prom_url: str, promql: str) -> float | None:
    result = query(prom_url, promql)
    return float(result[0]["value"][1]) if result else None


def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


def service_value(server: LiveServer, name: str, **labels: str) -> float:
    """Sum of one sample name over the series matching ``labels``, read from the service's /metrics."""
    total = 0.0
    for family in text_string_to_metric_families(server.metrics()):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def images() -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sample_images(4)]


def classify(client: httpx.Client, pictures: list[tuple[str, bytes]]) -> None:
    files = [("file", (name, data, "image/jpeg")) for name, data in pictures]
    r = client.post("/classify", params={"tier": TIER}, files=files)
    assert r.status_code == 200, r.text


def test_prometheus_scrapes_requests_just_sent(live_server: LiveServer, prometheus: str) -> None:
    wait_for("target up", lambda: scalar(prometheus, 'up{job="tome-serve"}') == 1.0)
    pictures = images()
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        classify(client, pictures[:1])  # the tier's series exist from here on
    before_requests = service_value(live_server, "tome_request_duration_seconds_count", tier=TIER)
    before_images = service_value(live_server, "tome_batch_size_sum", tier=TIER)
    # Let Prometheus record the "before" values, so rate() over the window sees the increase.
    scrapes_q = 'count_over_time(up{job="tome-serve"}[1m])'
    wait_for("two scrapes before the requests", lambda: (scalar(prometheus, scrapes_q) or 0) >= 2)

    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        for i in range(6):
            classify(client, [pictures[i % len(pictures)]])
        classify(client, pictures[:3])
    sent_images = 6 + 3

    after_requests = service_value(live_server, "tome_request_duration_seconds_count", tier=TIER)
    after_images = service_value(live_server, "tome_batch_size_sum", tier=TIER)
    assert after_requests - before_requests == 7
    assert after_images - before_images == sent_images

    count_q = f'sum(tome_request_duration_seconds_count{{job="tome-serve", tier="{TIER}"}})'
    wait_for("the latency histogram count", lambda: scalar(prometheus, count_q) == after_requests)
    images_q = f'sum(tome_batch_size_sum{{job="tome-serve", tier="{TIER}"}})'
    wait_for("the batch size series", lambda: scalar(prometheus, images_q) == after_images)
    batches_q = f'sum(tome_batch_size_count{{job="tome-serve", tier="{TIER}"}})'
    batches = scalar(prometheus, batches_q)
    assert batches is not None and batches == service_value(live_server, "tome_batch_size_count", tier=TIER)

    # The dashboard's latency query answers with a real number for the requests just sent.
    p95_q = (
        "histogram_quantile(0.95, sum by (le) "
        f'(rate(tome_request_duration_seconds_bucket{{tier="{TIER}"}}[1m])))'
    )
    wait_for("a p95 latency", lambda: (scalar(prometheus, p95_q) or 0.0) > 0)
    p95 = scalar(prometheus, p95_q)
    assert p95 is not None and 0 < p95 < 30, p95
    # And per-request bucket counts: every request landed in some latency bucket.
    inf_q = f'sum(tome_request_duration_seconds_bucket{{tier="{TIER}", le="+Inf"}})'
    assert scalar(prometheus, inf_q) == after_requests


def test_scrape_config_is_the_repo_one() -> None:
    """The config the live test runs differs from the committed one only in target and interval."""
    original = yaml.safe_load(SCRAPE_CONFIG.read_text())
    rewritten = scrape_config_for("127.0.0.1:1")
    rewritten["scrape_configs"][0]["static_configs"] = original["scrape_configs"][0]["static_configs"]
    rewritten["global"]["scrape_interval"] = original["global"]["scrape_interval"]
    assert rewritten == original
    assert Path(SCRAPE_CONFIG).is_file()


def test_alerting_rules_load_and_evaluate_against_the_live_service(prometheus: str) -> None:
    """The rules file the config names loads, and its expressions evaluate without error."""

    def loaded() -> bool:
        status, body = http_get(f"{prometheus}/api/v1/rules")
        groups = json.loads(body)["data"]["groups"] if status == 200 else []
        rules = [r for g in groups if g["name"] == "tome-serve-fidelity" for r in g["rules"]]
        return len(rules) == 2 and all(r["health"] == "ok" and r.get("lastEvaluation") for r in rules)

    wait_for("the fidelity alerting rules to be evaluated", loaded)
