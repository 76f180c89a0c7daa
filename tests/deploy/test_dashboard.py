"""The Grafana dashboard queries only metrics the running service exports, in valid PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO_ROOT

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "tome-serve.json"
DATASOURCES = REPO_ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"

# PromQL words that are not metric names: keywords, and what follows `by`/`without`/`on`/`ignoring`.
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}
IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title/refId, PromQL) for every panel target."""
    return [
        (f"{panel['title']}/{target['refId']}", target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    return [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels and literals removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in IDENT.finditer(text):
        rest = text[match.end() :].lstrip()
        word = match.group()
        if rest.startswith("(") or word in KEYWORDS:  # a function or aggregation call
            continue
        names.add(word)
    return names


def label_values_metric(query: str) -> str:
    match = re.fullmatch(r"label_values\((?P<selector>.+),\s*(?P<label>\w+)\)", query.strip())
    assert match, f"unexpected variable query {query!r}"
    return match["selector"].split("{")[0].strip()


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends: its variables substituted by plausible values."""
    return expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$tier", ".*")


def test_metric_extraction_sees_through_promql() -> None:
    expr = 'histogram_quantile(0.9, sum by (le, tier) (rate(a_bucket{tier=~"$tier"}[5m]))) / on (x) b_total'
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert metric_names("sum(rate(tome_images_total[$__rate_interval]))") == {"tome_images_total"}


def test_every_dashboard_metric_is_exported(service_series: set[str]) -> None:
    dashboard = load_dashboard()
    used: dict[str, str] = {}
    for where, expr in panel_exprs(dashboard):
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        used.update(dict.fromkeys(names, where))
    for query in variable_queries(dashboard):
        used[label_values_metric(query)] = "variable"
    cuda_only = {"tome_device_memory_bytes"}  # the CPU demo server has no device memory to report
    # exported once a calibration file backs the tiers (the demo has none); the calibration tests check them
    calibrated_only = {"tome_tier_agreement", "tome_tier_agreement_low", "tome_auto_effective_agreement"}
    allowed = service_series | cuda_only | calibrated_only
    missing = {name: where for name, where in used.items() if name not in allowed}
    assert not missing, f"dashboard queries metrics the service does not export: {missing}"


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = " ".join(expr for _, expr in panel_exprs(load_dashboard()))
    for metric in (
        "tome_requests_total",
        "tome_request_duration_seconds_bucket",
        "tome_queue_depth",
        "tome_batch_size_bucket",
        "tome_images_total",
        "tome_rejections_total",
        "tome_device_memory_bytes",
    ):
        assert metric in exprs, f"no panel shows {metric}"
    for q in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({q}, sum by (le, model, tier) (rate(tome_request_duration_seconds" in exprs
        )
    assert "sum by (reason)" in exprs, "rejections by reason"


def test_dashboard_uses_the_provisioned_datasource() -> None:
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    dashboard = load_dashboard()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (scripts/install-test-deps.sh)"
)
def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """promtool checks every expression, wrapped as a recording rule."""
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(panel_exprs(load_dashboard()))
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
