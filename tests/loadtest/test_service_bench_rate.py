"""The service benchmark's throughput estimator must not depend on where the window cuts the batch cycle."""

import pytest

from loadtest.service_bench import completion_rate


@pytest.mark.parametrize("phase", [0.0, 0.3, 0.6, 0.9, 1.05])
def test_completion_rate_of_bursts_is_the_true_rate_whatever_the_window_phase(phase: float) -> None:
    # batches of 16 answered every 1.1 s (responses 1 ms apart), seen through a 10 s window
    true_rate = 16 / 1.1
    times = [phase + 1.1 * k + i * 0.001 for k in range(10) for i in range(16)]
    times = [t for t in times if t < 10.0]
    assert completion_rate(times) == pytest.approx(true_rate, rel=0.02)
    window_count_rate = len(times) / 10.0  # 9 or 10 bursts, depending on the phase
    assert abs(window_count_rate - true_rate) > 2 * abs(completion_rate(times) - true_rate)


def test_completion_rate_of_a_steady_stream() -> None:
    assert completion_rate([0.05 * k for k in range(200)]) == pytest.approx(20.0)


def test_completion_rate_needs_two_distinct_times() -> None:
    with pytest.raises(ValueError):
        completion_rate([1.0, 1.0])
