"""When to ask a provider whether a job is done.

Fixed polling (every 2 s, the common practice) asks too often for slow jobs and notices fast ones
late. This schedule does better on both counts (`python -m bench.run` measures it):

* Once the journal knows the model's typical duration `m` it stays quiet until just before `m`,
  then checks ever closer to it — `m - 8g, m - 4g, m - 2g, m - g, m` with `g` = 3 % of `m` (at
  least 0.1 s) — and after `m` ever further apart: `g, 2g, 4g, ...` between checks (at most 5 s).
  Early checks are few and only where waiting long enough to afford them (one per 4 s of `m`, at
  most four); a job shorter than 4 s gets one check at `m`, and one that typically takes less than
  0.1 s is checked at once.
* Before the journal knows the model, the provider's documented typical duration `d` (when it has
  one) stands in for it, less trusted: documentation is rough, so the checks search around `d` —
  steps of a tenth below it down to `d / 2`, one just after it (`d + 0.1 s`), then steps of a tenth of
  the time elapsed (at most 5 s) — but never more of them than fixed 2-second polling would have sent
  by the same moment: the `k`-th check comes no earlier than `2k` seconds after submit. So a first
  job sends no more status requests than fixed polling would, however long it takes; the one
  exception is a model documented under 2 s, whose first check is at `d + 0.1 s` (a job that then
  runs past it costs one request more than fixed polling, and is noticed at 4 s). A job that ends
  between the checks is noticed within a tenth of its length where the budget allows that many
  checks (documented figures of 20 s and more), otherwise at the next check.
* With neither, it checks at once (a job can be done already, and the journal should learn that),
  then at 0.5 s, then at steps of a tenth of the time elapsed, never closer than 0.2 s nor further
  than 5 s apart: a job is noticed within ~10 % of its length, and the journal learns that length.
  These first jobs of an undocumented model ask more often than fixed polling: the price of
  learning their length precisely.

Why the first learned check is *at* `m` and never after it: the journal's durations are the moments
the server saw jobs finish, so a schedule that first looks at, say, `1.05 m` teaches the journal
`1.05 m`, and the estimate creeps up job after job (the previous schedule's grew 3-18x over 400
simulated jobs: bench/simulate.py). Looking at `m`, and before it when affordable, keeps the
estimate where the jobs finish — give or take the round trip of one status request, which the
journal counts in the duration. The same holds for what the first jobs teach: a documented figure
that is too long is learned as the first check that found the job (at worst `d / 2` for a job much
shorter than documented) and only slowly corrected by the learned schedule's early checks, which
is why the search reaches below `d` first; one that is too short costs nothing but polite checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class PollSchedule:
    """Yields the delay before each status check, given the seconds elapsed since submit."""

    expected: float | None = None
    """Typical seconds from submit to completion for this model, from the journal (None: unknown)."""
    documented: float | None = None
    """The provider's documented typical seconds for this model: the starting point while `expected`
    is unknown (None: undocumented)."""
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
    polite_period: float = 2.0
    """Documented only: the period of the fixed polling that first jobs never ask more often than."""
    lowest_share: float = 0.5
    """Documented only: the earliest check is at this share of the documented duration."""
    _asked: bool = False

    def next_delay(self, elapsed: float) -> float:
        if self.expected is not None and self.expected > 0:
            first_call, self._asked = not self._asked, True
            if first_call and self.expected < self.min_spacing:
                return 0.0  # done about as soon as asked: look at once (waiting for `expected` would teach drift)
            return _after(self._around(self.expected), elapsed)
        if self.documented is not None and self.documented > 0:
            return _after(self._searching(self.documented), elapsed)
        return self._exploring(elapsed)

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

    def _searching(self, d: float) -> Iterator[float]:
        """The moments to check at for a first job documented to take `d`: the k-th no earlier than k
        polite periods after submit (except a first check at `d` + 0.1 s under one period)."""
        period, ratio = self.polite_period, 1 + self.step
        at = d + self.min_spacing
        below = []
        moment = d / ratio
        while moment >= d * self.lowest_share:
            below.append(moment)
            moment /= ratio
        below.reverse()
        fits = max(int(at // period) - 1, 0)  # checks affordable before `at`, which takes the next place
        below = below[len(below) - min(fits, len(below)):]
        while any(m < period * (i + 1) for i, m in enumerate(below)):
            below.pop(0)  # the earliest would come before its place: drop it (the others move up one)
        yield from below
        k = len(below) + 1
        moment = at if k == 1 and at < period else max(at, period * k)
        yield moment
        while True:
            k += 1
            wanted = min(max(moment * ratio, moment + self.min_interval), moment + self.max_interval)
            moment = max(wanted, period * k)
            yield moment


def _after(moments: Iterator[float], elapsed: float) -> float:
    """The delay until the first of `moments` (ascending, unbounded) after `elapsed`."""
    for moment in moments:
        if moment > elapsed:
            return moment - elapsed
    raise AssertionError("unreachable: the schedules are unbounded")  # pragma: no cover
