"""The suite's CI rule (tests/conftest.py): under CI=true a skip fails unless it needs CUDA, whether a
test skips while it runs or a whole module skips while it is collected."""

from __future__ import annotations

import pytest

from tests.conftest import _fail_a_skip_in_ci


def _skipped(reason: str, collected: bool) -> pytest.TestReport | pytest.CollectReport:
    longrepr = ("tests/test_x.py", 3, f"Skipped: {reason}")
    if collected:
        return pytest.CollectReport("tests/test_x.py", "skipped", longrepr, [])
    location = ("tests/test_x.py", 3, "t")
    return pytest.TestReport("tests/test_x.py::t", location, {}, "skipped", longrepr, "call")


@pytest.mark.parametrize("collected", [False, True], ids=["while-running", "while-collecting"])
def test_a_skip_fails_under_ci_unless_it_needs_cuda(monkeypatch: pytest.MonkeyPatch, collected: bool) -> None:
    monkeypatch.setenv("CI", "true")
    missing = _skipped("could not import 'sklearn'", collected)
    _fail_a_skip_in_ci(missing)
    assert missing.outcome == "failed" and "allows only CUDA skips" in str(missing.longrepr)
    gpu = _skipped("needs CUDA", collected)
    _fail_a_skip_in_ci(gpu)
    assert gpu.outcome == "skipped"
    monkeypatch.setenv("CI", "false")
    local = _skipped("could not import 'sklearn'", collected)
    _fail_a_skip_in_ci(local)
    assert local.outcome == "skipped"
