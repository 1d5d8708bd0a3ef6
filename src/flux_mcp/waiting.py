"""When to ask a provider whether a job is done.

Fixed polling (every 2 s, the common practice) asks too often for slow jobs and notices fast ones
late. This schedule does better on both counts (`python -m bench.run` measures it):

* With no history for the model it checks at once (a job can be done already, and the journal
  should learn that), then at 0.5 s, then at steps of a tenth of the time elapsed, never closer than
  0.2 s nor further than 5 s apart: a job is noticed within ~10 % of its length, and the journal
  learns that length. These first jobs of a model ask more often than the learned ones need to.
* Once the journal knows the model's typical duration `m` it stays quiet until just before `m`,
  then checks ever closer to it — `m - 8g, m - 4g, m - 2g, m - g, m` with `g` = 3 % of `m` (at
  least 0.1 s) — and after `m` ever further apart: `g, 2g, 4g, ...` between checks (at most 5 s).
  Early checks are few and only where waiting long enough to afford them (one per 4 s of `m`, at
  most four); a job shorter than 4 s gets one check at `m`, and one that typically takes less than
  0.1 s is checked at once.

Why the first learned check is *at* `m` and never after it: the journal's durations are the moments
the server saw jobs finish, so a schedule that first looks at, say, `1.05 m` teaches the journal
`1.05 m`, and the estimate creeps up job after job (the previous schedule's grew 3-18x over 400
simulated jobs: bench/simulate.py). Looking at `m`, and before it when affordable, keeps the
estimate where the jobs finish — give or take the round trip of one status request, which the
journal counts in the duration.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class PollSchedule:
    """Yields the delay before each status check, given the seconds elapsed since submit."""

    expected: float | None = None
    """Typical seconds from submit to completion for this model, from the journal (None: unknown)."""
    first: float = 0.5
    """No history: the second check (the first is at once), seconds after submit."""
    step: float = 0.1
    """No history: each wait is this fraction of the time elapsed."""
    min_interval: float = 0.2
    max_interval: float = 5.0
    spacing: float = 0.03
    """With history: the closest checks around `expected` are this fraction of it apart."""
    min_spacing: float = 0.1
    seconds_per_early_check: float = 4.0
    max_early_checks: int = 4
    _asked: bool = False

    def next_delay(self, elapsed: float) -> float:
        if self.expected is None or self.expected <= 0:
            return self._exploring(elapsed)
        first_call, self._asked = not self._asked, True
        if first_call and self.expected < self.min_spacing:
            return 0.0  # done about as soon as asked: look at once (waiting for `expected` would teach drift)
        for moment in self._around(self.expected):
            if moment > elapsed:
                return moment - elapsed
        raise AssertionError("unreachable: the schedule is unbounded")  # pragma: no cover

    def _exploring(self, elapsed: float) -> float:
        first_call, self._asked = not self._asked, True
        if first_call and elapsed < self.first / 5:  # a fresh submit, not a check long after it
            return 0.0
        if elapsed < self.first:
            return self.first - elapsed
        return min(max(self.step * elapsed, self.min_interval), self.max_interval)

    def _around(self, m: float) -> Iterator[float]:
        """The moments (seconds after submit) to check at, in order, for a job expected to take `m`."""
        gap = min(max(self.spacing * m, self.min_spacing), self.max_interval)
        early = min(int(m // self.seconds_per_early_check), self.max_early_checks)
        for k in reversed(range(early)):
            yield m - gap * 2**k
        yield m
        moment, wait = m, gap
        while True:
            moment += min(wait, self.max_interval)
            yield moment
            wait *= 2
