"""Budget resolution on made-up figures: interval bound versus point estimate, r=0, speed budgets."""

from __future__ import annotations

import pytest

from models.calibration import BudgetError, agreement_loss_bound, resolve
from tests.calibration.fakes import make_calibration, record

# n=100: 97/100 has a Wilson lower bound of 0.915, 99/100 of 0.946, 100/100 of 0.963
SCHEDULES = [
    record("r0", (0, 0), 1.0, 100),
    record("a", (1, 1), 1.2, 100),
    record("b", (2, 2), 1.4, 99),
    record("c", (3, 3), 1.7, 97),
    record("d", (4, 4), 2.1, 80),
]


def test_agreement_budget_uses_the_interval_lower_end() -> None:
    cal = make_calibration(SCHEDULES)
    assert resolve(cal, max_agreement_loss=0.02).name == "r0"  # even 100/100 is only >= 96.3% at 95%
    assert resolve(cal, max_agreement_loss=0.04).name == "a"
    assert resolve(cal, max_agreement_loss=0.06).name == "b"
    assert resolve(cal, max_agreement_loss=0.09).name == "c"
    assert resolve(cal, max_agreement_loss=1.0).name == "d"
    for budget in (0.0, 0.02, 0.04, 0.06, 0.09, 0.5):
        chosen = resolve(cal, max_agreement_loss=budget)
        assert agreement_loss_bound(chosen) <= budget
        assert chosen.is_exact or 1 - chosen.agreement.ci_low <= budget


def test_point_estimate_rule_is_laxer() -> None:
    cal = make_calibration(SCHEDULES)
    assert resolve(cal, max_agreement_loss=0.04, use_interval=False).name == "c"
    assert resolve(cal, max_agreement_loss=0.04).name == "a"


def test_exact_schedule_meets_any_agreement_budget() -> None:
    cal = make_calibration([record("r0", (0, 0), 1.0, 100), record("a", (1, 1), 1.2, 90)])
    assert resolve(cal, max_agreement_loss=0.0).name == "r0"
    without_r0 = make_calibration([record("a", (1, 1), 1.2, 90)])
    with pytest.raises(BudgetError):
        resolve(without_r0, max_agreement_loss=0.01)


def test_speed_budget_gives_the_most_faithful_fast_enough_schedule() -> None:
    cal = make_calibration(SCHEDULES)
    assert resolve(cal, min_speedup=1.3).name == "b"
    assert resolve(cal, min_speedup=1.5).name == "c"
    assert resolve(cal, min_speedup=1.0).name == "r0"
    with pytest.raises(BudgetError, match=r"fastest, d, measured 2\.10x"):
        resolve(cal, min_speedup=3.0)


def test_equally_faithful_schedules_resolve_to_the_faster() -> None:
    cal = make_calibration(
        [record("r0", (0, 0), 1.0, 100), record("x", (1, 2), 1.3, 97), record("y", (2, 1), 1.5, 97)]
    )
    assert resolve(cal, min_speedup=1.2).name == "y"


@pytest.mark.parametrize(
    "kwargs", [{}, {"max_agreement_loss": 0.1, "min_speedup": 1.2}, {"max_agreement_loss": 1.5}]
)
def test_bad_budgets_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        resolve(make_calibration(SCHEDULES), **kwargs)
