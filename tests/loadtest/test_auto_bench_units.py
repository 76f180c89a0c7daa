"""``loadtest.auto_bench``'s per-round summary (the server runs are BENCHMARKS.md's, not tests)."""

from __future__ import annotations

from loadtest.auto_bench import summary


def _round(auto_refused: int) -> dict:
    return {
        "capacity_rps": 36.8,
        "capacity_after_rps": 40.0,
        "phases": [
            {
                "tier": "exact",
                "load": 2.0,
                "load_vs_mean_capacity": 1.92,
                "counts": {"200": 5, "504": 3},
                "refused": 3,
            },
            {
                "tier": "auto",
                "load": 2.0,
                "load_vs_mean_capacity": 1.92,
                "counts": {"200": 9, "503": auto_refused},
                "refused": auto_refused,
                "auto_tier_mix": {"exact": 3.0, "floor": 6.0},
                "effective_agreement_calibrated": 0.75,
            },
            {
                "tier": "auto",
                "load": 0.5,
                "load_vs_mean_capacity": 0.48,
                "counts": {"200": 4},
                "refused": 0,
                "auto_tier_mix": {"exact": 4.0},
                "effective_agreement_calibrated": 1.0,
            },
        ],
    }


def test_the_summary_counts_rounds_whose_overloaded_auto_phase_refused_nothing() -> None:
    text = summary([_round(0), _round(7), _round(0)])
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("round 1: capacity 36.8 req/s before, 40.0 after")
    assert "2x exact (1.92x their mean): 5 served, 3 refused" in lines[0]
    assert "2x auto (1.92x their mean): 9 served, 0 refused (33% at exact, agreement 75.0%)" in lines[0]
    assert "0.5x auto (0.48x their mean): 4 served, 0 refused (100% at exact" in lines[0]
    assert "2x auto (1.92x their mean): 9 served, 7 refused" in lines[1]
    # the light phase refused nothing in every round; only the overloaded one counts
    assert lines[-1] == "rounds whose overloaded auto phase refused nothing: 2 of 3"
