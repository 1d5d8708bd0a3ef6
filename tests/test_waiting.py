"""The poll schedule: notice jobs soon, ask rarely, and learn durations without drifting."""

from __future__ import annotations

import bisect
import math
import random
import statistics

import pytest

from flux_mcp.waiting import Pacer, PollSchedule


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


def learn(lengths: list[float], pacer: Pacer | None = None) -> tuple[list[int], list[float | None]]:
    """Runs jobs of `lengths` one after another through a `Pacer` with the journal's rule (the median of the last
    20 durations it learned, newest first, learned only from jobs that measured theirs: a probe, or one a check
    saw running) and the runner's (the moment the check that found it done was sent, here 1 ms after its moment).
    Returns each job's status checks and the estimate after it."""
    pacer = pacer or Pacer()
    learned: list[float] = []
    asked, estimates = [], []
    for length in lengths:
        schedule, now, checks, running = pacer.schedule(("p", "m"), learned[:20], None), 0.0, 0, False
        while True:
            now += schedule.next_delay(now) + 0.001
            checks += 1
            if now >= length:
                break
            running = True
        if schedule.probing or running:
            learned.insert(0, now)
        asked.append(checks)
        estimates.append(statistics.median(learned[:20]) if len(learned) >= 2 else None)
    return asked, estimates


def test_learning_from_the_schedule_itself_does_not_drift():
    """300 jobs in a row: the estimate stays where the jobs end, steady or spread."""
    rng = random.Random(7)
    for true in (1.0, 3.0, 5.0, 20.0, 60.0):
        for spread in (0.0, 0.1):
            _, estimates = learn([true * rng.uniform(1 - spread, 1 + spread) for _ in range(300)])
            estimate = estimates[-1]
            assert estimate is not None and 0.8 * true <= estimate <= 1.15 * true, (true, spread, estimate)


@pytest.mark.parametrize("length", [3.0, 5.0, 20.0, 60.0])
def test_a_steady_models_jobs_cost_at_most_1_3_status_requests_and_are_noticed_within_a_gap(length):
    asked, estimates = learn([length] * 200)
    assert sum(asked[-100:]) / 100 <= 1.3
    gap = max(0.03 * length, 0.1)
    assert all(e is not None and length <= e <= length + gap + 0.01 for e in estimates[-100:])


def test_a_steady_model_probes_one_job_in_four_and_checks_the_others_once_when_they_are_expected():
    pacer = Pacer()
    schedules = [pacer.schedule(("p", "m"), [5.0] * 20, None) for _ in range(8)]
    assert [s.probing for s in schedules] == [True, False, False, False] * 2
    assert checks(schedules[0], 4.99) == [pytest.approx(4.85), pytest.approx(5.0)]
    assert checks(schedules[1], 4.99) == [pytest.approx(5.0)]
    other = pacer.schedule(("p", "other"), [5.0] * 20, None)
    assert other.probing  # counted per model


def test_a_spread_model_probes_every_job_as_before():
    pacer = Pacer()
    recent = [18.0, 22.0, 19.0, 21.0, 20.0, 20.5, 19.5]
    schedules = [pacer.schedule(("p", "m"), recent, None) for _ in range(4)]
    assert all(s.probing and s.early == 4 for s in schedules)


def test_a_job_expected_within_two_seconds_never_probes():
    pacer = Pacer()
    assert not any(pacer.schedule(("p", "m"), [1.5] * 20, None).probing for _ in range(8))
    assert pacer.schedule(("p", "m"), [0.05] * 20, None).next_delay(0.0) == 0.0  # done as soon as asked
    assert pacer.schedule(("p", "new"), [], 5.0).probing  # a first job searches from the start


def test_after_a_job_that_ended_well_before_the_estimate_the_next_probe_looks_one_doubling_below_it():
    pacer = Pacer()
    probe = pacer.schedule(("p", "m"), [4.7, *[5.0] * 19], None)
    assert checks(probe, 5.0)[0] < 4.7 - 0.1 and checks(probe, 5.0)[0] >= 2.5


@pytest.mark.parametrize("length", [5.0, 20.0, 60.0])
@pytest.mark.parametrize("factor", [0.7, 1.5])
def test_the_estimate_follows_jobs_that_get_faster_or_slower(length, factor):
    asked, estimates = learn([length] * 100 + [length * factor] * 200)
    new = length * factor
    followed = next(i for i in range(100, 290)
                    if all(abs(e / new - 1) <= 0.05 for e in estimates[i:i + 10] if e is not None))
    assert followed - 100 <= 60, (length, factor, followed - 100)
    assert sum(asked[-50:]) / 50 <= 1.3  # steady again at the new length


# --- first jobs of a documented model ----------------------------------------------------------------


def asked_until_done(schedule: PollSchedule, length: float) -> tuple[int, float]:
    """(status checks, the moment of the one that found the job done) for a job of `length` seconds."""
    now, asked = 0.0, 0
    while True:
        now += schedule.next_delay(now)
        asked += 1
        if now >= length:
            return asked, now


def fixed_polling(length: float) -> int:
    """What fixed 2-second polling sends for a job of `length` seconds: a check at 2, 4, 6, ..."""
    return max(1, math.ceil(length / 2 - 1e-9))


def found_by(moments: list[float], length: float) -> tuple[int, float]:
    """(checks, the moment of the one that finds it) for a job of `length`, from a schedule's moments."""
    index = bisect.bisect_left(moments, length)
    return index + 1, moments[index]


@pytest.mark.parametrize("documented", [2.0, 3.0, 5.0, 8.0, 10.0, 20.0, 25.0, 60.0, 120.0])
def test_first_jobs_of_a_documented_model_never_ask_more_than_fixed_two_second_polling(documented):
    moments = checks(PollSchedule(documented=documented), 200)
    for length in [i * 0.01 for i in range(1, 15000)]:
        asked, _ = found_by(moments, length)
        assert asked <= fixed_polling(length), (documented, length, asked)


def test_a_model_documented_under_two_seconds_costs_at_most_one_request_more_and_only_when_late():
    moments = checks(PollSchedule(documented=1.0), 60)
    for length in [i * 0.01 for i in range(1, 6000)]:
        asked, seen = found_by(moments, length)
        if length <= 1.1:
            assert (asked, seen) == (1, pytest.approx(1.1))
        assert asked <= fixed_polling(length) + (1 if 1.1 < length <= 2 else 0), (length, asked)


@pytest.mark.parametrize("documented", [1.0, 5.0, 20.0, 60.0])
def test_a_job_that_takes_its_documented_time_is_noticed_a_tenth_of_a_second_after(documented):
    assert PollSchedule(documented=documented).next_delay(0.0) > 0  # never at once: it cannot be done yet
    asked, seen = asked_until_done(PollSchedule(documented=documented), documented)
    assert seen == pytest.approx(documented + 0.1)
    assert asked <= fixed_polling(documented)


@pytest.mark.parametrize("documented", [20.0, 60.0])
def test_where_the_budget_allows_a_job_off_its_documented_time_is_noticed_within_a_tenth(documented):
    for length in [documented * (0.5 + i / 100) for i in range(250)]:
        _, seen = asked_until_done(PollSchedule(documented=documented), length)
        assert seen - length <= 0.1 * length + 0.1 + 1e-9, (length, seen)


def test_what_the_journal_learned_replaces_the_documented_figure():
    learned = checks(PollSchedule(expected=5.0, documented=50.0), 10)
    assert learned == checks(PollSchedule(expected=5.0), 10)


@pytest.mark.parametrize("error", [0.7, 1.0, 1.4])
def test_learning_after_documented_first_jobs_settles_on_the_true_length(error):
    """Documented figures off by -30 % to +40 %: two first jobs polled by the documented figure, then
    the journal's rule (median of the last 20) over 100 learned jobs."""
    rng = random.Random(11)
    for true in (5.0, 20.0, 60.0):
        observed: list[float] = []
        for _ in range(100):
            length = true * rng.uniform(0.95, 1.05)
            expected = statistics.median(observed[-20:]) if len(observed) >= 2 else None
            _, seen = asked_until_done(PollSchedule(expected=expected, documented=true * error), length)
            observed.append(seen)
        estimate = statistics.median(observed[-20:])
        assert 0.9 * true <= estimate <= 1.25 * true, (true, error, estimate)
