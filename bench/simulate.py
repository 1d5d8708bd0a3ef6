"""Long run, simulated: the poll schedule and the journal's learning over hundreds of jobs in a row.

The live figure (bench/completion.py) measures the first jobs after a model is learned; this one asks
what happens after 400 jobs, and after the jobs get faster or slower, which no benchmark can wait for.
It runs the real `Pacer` and `PollSchedule` on a simulated clock with the journal's rule (the median of
the last 20 durations it learned, from 2 on, learned only from jobs that measured theirs: `Record.timed`)
and the runner's: a duration is the moment the status request that found the job done was sent (the job's
clock starts half a round trip after the submit leaves, as the request that finds it arrives half a round
trip after it is sent, so a check sent at the job's length finds it done), and each check leaves a little
after its moment (`LATE`: a timer is never early).

Three schedules beside fixed 2-second polling:
* `flux-mcp`: this revision (a steady model probes one job in four).
* `before`: the schedule before probing was paced (every learned job looked early, one look per 4 s of
  the estimate, and every job taught its duration); kept to show what pacing changed.
* `previous`: the one before that (first learned check at 1.03 x expected + 50 ms); kept to show why it
  was replaced: its estimate grows without bound.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from flux_mcp.waiting import Pacer, PollSchedule

from .common import mean, p50

RTT = 0.004
"""Round trip of one status request on loopback, seconds (the live figure's order of magnitude)."""
LATE = 0.001
"""How late a check leaves after the moment its schedule gave (a timer fires after its deadline)."""
JOBS = 400
TAIL = 200
RECENT = 20
STEADY_BEFORE = 100
"""Step runs: jobs of the old length before the change."""
STEP_AFTER = 200
STEPS = (0.7, 1.5)
FOLLOWED = 0.05
"""A change is followed once the estimate is within this share of the new length (and stays for 10 jobs)."""


class Schedule(Protocol):
    def next_delay(self, elapsed: float) -> float: ...


@dataclass
class PreviousSchedule:
    """The schedule before issue 6: first learned check at 1.03 x expected + 50 ms, then back off."""

    expected: float | None = None
    _interval: float | None = None

    def next_delay(self, elapsed: float) -> float:
        if self.expected is not None and self.expected > 0:
            target = self.expected * 1.03 + 0.05
            if elapsed < target:
                return target - elapsed
            self._interval = (
                max(self.expected * 0.05, 0.1) if self._interval is None else min(self._interval * 1.5, 5)
            )
            return self._interval
        self._interval = 0.5 if self._interval is None else min(self._interval * 1.5, 5.0)
        return self._interval


Planner = Callable[[Sequence[float]], tuple[Schedule, bool]]
"""Recent learned durations (newest first) -> the job's schedule, and whether it probes (teaches even when its
first check finds the job done)."""


def _flux() -> Planner:
    pacer = Pacer()

    def plan(recent: Sequence[float]) -> tuple[Schedule, bool]:
        schedule = pacer.schedule(("sim", "model"), recent, None)
        return schedule, schedule.probing

    return plan


def _before() -> Planner:
    def plan(recent: Sequence[float]) -> tuple[Schedule, bool]:
        return PollSchedule(expected=statistics.median(recent) if len(recent) >= 2 else None), True

    return plan


def _previous() -> Planner:
    def plan(recent: Sequence[float]) -> tuple[Schedule, bool]:
        return PreviousSchedule(expected=statistics.median(recent) if len(recent) >= 2 else None), True

    return plan


PLANNERS: dict[str, Callable[[], Planner]] = {"flux-mcp": _flux, "before": _before, "previous": _previous}


def _job(schedule: Schedule, length: float) -> tuple[float, int, float, bool]:
    """(the moment the check that found the job done was sent, status requests, delay, whether a check saw it
    running) for a job of `length` seconds."""
    now, polls, running = 0.0, 0, False
    while polls < 10_000:
        now += schedule.next_delay(now) + LATE
        polls += 1
        if now >= length:
            return now, polls, now - length + RTT / 2, running
        running = True
        now += RTT  # the next delay is computed when the answer is in
    raise RuntimeError("the schedule never found the job done")


def _fixed(length: float) -> tuple[int, float]:
    polls = math.ceil(length / 2 - 1e-9)
    return polls, 2 * polls - length + RTT / 2


def _series(make: Callable[[], Planner], lengths: list[float]) -> tuple[list[tuple[int, float]], list[float]]:
    """Per job: (status requests, delay), and the journal's estimate after it."""
    plan = make()
    learned: deque[float] = deque(maxlen=RECENT)  # newest first
    out, estimates = [], []
    for length in lengths:
        schedule, probing = plan(list(learned))
        seen, polls, delay, running = _job(schedule, length)
        if probing or running:
            learned.appendleft(seen)
        out.append((polls, delay))
        estimates.append(statistics.median(learned) if len(learned) >= 2 else math.nan)
    return out, estimates


def _follows(estimates: list[float], start: int, target: float) -> int | None:
    """Jobs after `start` until the estimate is within FOLLOWED of `target` for 10 jobs in a row (None: never)."""
    for j in range(start, len(estimates) - 10):
        if all(abs(e / target - 1) <= FOLLOWED for e in estimates[j:j + 10]):
            return j - start
    return None


def _summary(out: list[tuple[int, float]], estimates: list[float], length: float) -> dict[str, Any]:
    tail = out[-TAIL:]
    return {"delay_p50": p50([x[1] for x in tail]), "requests_mean": mean([x[0] for x in tail]),
            "estimate_ratio": estimates[-1] / length}


def run(lengths: list[float], jitter: float = 0.10) -> dict[str, Any]:
    rows = []
    for length in lengths:
        rng = random.Random(7)
        spread = [length * (1 + rng.uniform(-jitter, jitter)) for _ in range(JOBS)]
        row: dict[str, Any] = {"length_s": length}
        for variant, durations in (("jitter", spread), ("exact", [length] * JOBS)):
            cell: dict[str, Any] = {}
            for name, make in PLANNERS.items():
                cell[name] = _summary(*_series(make, durations), length)
            fixed = [_fixed(d) for d in durations[-TAIL:]]
            cell["fixed"] = {"delay_p50": p50([x[1] for x in fixed]), "requests_mean": mean([x[0] for x in fixed])}
            row[variant] = cell
        row["steps"] = {}
        for factor in STEPS:
            durations = [length] * STEADY_BEFORE + [length * factor] * STEP_AFTER
            step: dict[str, Any] = {}
            for name in ("flux-mcp", "before"):
                out, estimates = _series(PLANNERS[name], durations)
                after = out[STEADY_BEFORE:STEADY_BEFORE + 50]
                step[name] = {"jobs_to_follow": _follows(estimates, STEADY_BEFORE, length * factor),
                              "requests_mean": mean([x[0] for x in after]),
                              "delay_p50": p50([x[1] for x in after]),
                              "estimate_ratio": estimates[-1] / (length * factor)}
            row["steps"][f"x{factor:g}"] = step
        rows.append(row)
    return {"jobs": JOBS, "tail": TAIL, "jitter": jitter, "rtt_s": RTT, "late_s": LATE, "followed": FOLLOWED,
            "steady_before": STEADY_BEFORE, "step_after": STEP_AFTER, "rows": rows}


if __name__ == "__main__":
    import json
    import sys

    json.dump(run([float(x) for x in sys.argv[1:]] or [1.0, 3.0, 5.0, 20.0, 60.0]), sys.stdout, indent=1)
