"""Long run, simulated: the poll schedule and the journal's learning over hundreds of jobs in a row.

The live figure (bench/completion.py) measures the first jobs after a model is learned; this one asks
what happens after 400 jobs, which no benchmark can wait for. It runs the real `PollSchedule` on a
simulated clock with the journal's rule (median of the last 20 observed durations, from 2 jobs on)
and its bias (a duration is recorded when the answer that saw the job done arrives, one status round
trip after the request left). The previous schedule (first learned check at 1.03 x expected + 50 ms)
is kept here to show why it was replaced: its estimate grows without bound.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flux_mcp.waiting import PollSchedule

from .common import mean, p50

RTT = 0.004
"""Round trip of one status request on loopback, seconds (the live figure's order of magnitude)."""
JOBS = 400
TAIL = 200


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


def _job(
    make: Callable[[float | None], Any], expected: float | None, length: float
) -> tuple[float, int, float]:
    """(recorded duration, status requests, delay) of one job, as service._wait would run it."""
    done = length - RTT / 2  # the provider's clock started half a round trip before the submit answer arrived
    schedule = make(expected)
    now, polls = 0.001, 0
    while polls < 10_000:
        now += schedule.next_delay(now)
        polls += 1
        seen = now + RTT / 2 >= done
        now += RTT
        if seen:
            return now, polls, now - done
    raise RuntimeError("the schedule never found the job done")


def _fixed(length: float) -> tuple[int, float]:
    polls = math.ceil(length / 2 - 1e-9)
    return polls, 2 * polls - length + RTT


def run(lengths: list[float], jitter: float = 0.10) -> dict[str, Any]:
    schedules: dict[str, Callable[[float | None], Any]] = {
        "flux-mcp": lambda e: PollSchedule(expected=e),
        "previous": lambda e: PreviousSchedule(expected=e),
    }
    rows = []
    for length in lengths:
        rng = random.Random(7)
        durations = [length * (1 + rng.uniform(-jitter, jitter)) for _ in range(JOBS)]
        row: dict[str, Any] = {"length_s": length}
        for name, make in schedules.items():
            history: deque[float] = deque(maxlen=20)
            out = []
            for d in durations:
                expected = statistics.median(history) if len(history) >= 2 else None
                recorded, polls, delay = _job(make, expected, d)
                history.append(recorded)
                out.append((polls, delay))
            tail = out[-TAIL:]
            row[name] = {
                "delay_p50": p50([x[1] for x in tail]),
                "requests_mean": mean([x[0] for x in tail]),
                "estimate_ratio": statistics.median(history) / length,
            }
        fixed = [_fixed(d) for d in durations[-TAIL:]]
        row["fixed"] = {"delay_p50": p50([x[1] for x in fixed]), "requests_mean": mean([x[0] for x in fixed])}
        rows.append(row)
    return {"jobs": JOBS, "tail": TAIL, "jitter": jitter, "rtt_s": RTT, "rows": rows}
