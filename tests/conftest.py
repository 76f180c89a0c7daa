"""Suite-wide rules. Under ``CI=true`` a skipped test is a failure unless it needs CUDA: CI never has a
GPU, but it has everything else (../shared, Debian's prometheus), so any other skip hides a broken setup."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.shared_data import in_ci

ALLOWED_CI_SKIP_WORDS = ("CUDA", "GPU")


def _fail_a_skip_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(word in reason for word in ALLOWED_CI_SKIP_WORDS):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which allows only CUDA skips: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    _fail_a_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """A whole module skipped while it is collected (``pytest.importorskip`` at its top) counts too."""
    outcome = yield
    _fail_a_skip_in_ci(outcome.get_result())
