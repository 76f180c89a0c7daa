"""Schema-driven fuzzing of the real server: no generated request, however odd, gets a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from service.api.app import create_app
from service.ipc.rundir import RunDir
from service.settings import load_settings
from tests.processes import serving

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "service" / "configs" / "cpu-demo.toml"

# A raw BMP body is sent like any binary one (schemathesis knows the other image types it takes).
schemathesis.serializer.alias("image/bmp", "application/octet-stream")

# The app's own OpenAPI document (building the app connects to nothing); cases go to a live server.
schema = schemathesis.openapi.from_dict(
    create_app(load_settings(DEMO_CONFIG), RunDir(Path("/nonexistent"))).openapi()
)


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    with serving(DEMO_CONFIG, log, timeout_s=120) as (url, _, _):
        yield url


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case: schemathesis.Case, live_url: str) -> None:
    response = case.call(base_url=live_url, timeout=30)
    if response.status_code == 504 and "X-Deadline-Ms" in (case.headers or {}):
        # The client's own deadline (X-Deadline-Ms, fuzzed down to 1e-50 ms) passed: documented, not a fault.
        assert response.json()["error"]["code"] == "deadline"
        return
    case.validate_response(response, checks=[not_a_server_error])
