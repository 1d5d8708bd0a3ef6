"""The poll schedule: notice jobs soon, ask rarely, and learn durations without drifting."""

from __future__ import annotations

import random
import statistics

import pytest

from flux_mcp.waiting import PollSchedule


def checks(schedule: PollSchedule, until: float) -> list[float]:
    """The moments (seconds after submit) the schedule asks at, up to `until`."""
    moments, now = [], 0.0
    while now <= until:
        now += schedule.next_delay(now)
        moments.append(now)
    return moments


def test_without_history_the_first_check_is_immediate_and_later_ones_back_off():
    moments = checks(PollSchedule(), 60)
    assert moments[0] == 0.0 and moments[1] == pytest.approx(0.5)
    gaps = [b - a for a, b in zip(moments[1:], moments[2:], strict=False)]
    assert all(0.2 - 1e-9 <= g <= 5.0 for g in gaps)
    assert gaps == sorted(gaps)
    late = [m for m in moments if m > 20]
    assert all(b - a >= 2.0 for a, b in zip(late, late[1:], strict=False))


@pytest.mark.parametrize("expected", [0.5, 1.0, 5.0, 20.0, 60.0, 300.0])
def test_with_history_the_schedule_never_first_looks_after_the_expected_moment(expected):
    moments = checks(PollSchedule(expected=expected), expected * 3)
    assert min(m for m in moments) <= expected + 1e-9
    assert any(abs(m - expected) < 1e-9 for m in moments)
    assert all(b > a for a, b in zip(moments, moments[1:], strict=False))
    after = [m for m in moments if m >= expected - 1e-9]
    assert all(b - a <= 5.0 + 1e-9 for a, b in zip(after, after[1:], strict=False))  # dense after, sparse before


@pytest.mark.parametrize("expected", [1.0, 5.0, 20.0, 60.0])
def test_learned_jobs_ask_less_than_fixed_two_second_polling(expected):
    schedule = PollSchedule(expected=expected)
    asked = sum(1 for m in checks(schedule, expected) if m <= expected + 1e-9)
    assert asked <= max(1, int(expected // 2) + 1)


def test_a_model_that_finishes_instantly_is_checked_at_once():
    assert PollSchedule(expected=0.05).next_delay(0.0) == 0.0


def test_learning_from_the_schedule_itself_does_not_drift():
    """Simulate the journal's rule (median of the last 20 observed durations) over 300 jobs."""
    rng = random.Random(7)
    for true in (1.0, 5.0, 20.0):
        observed: list[float] = []
        for _ in range(300):
            length = true * rng.uniform(0.9, 1.1)
            expected = statistics.median(observed[-20:]) if len(observed) >= 2 else None
            schedule, now = PollSchedule(expected=expected), 0.0
            while True:
                now += schedule.next_delay(now)
                if now >= length:
                    observed.append(now)  # the server records when it asked and found the job done
                    break
        estimate = statistics.median(observed[-20:])
        assert 0.8 * true <= estimate <= 1.3 * true, (true, estimate)
