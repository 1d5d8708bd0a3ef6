"""When to ask a provider whether a job is done.

Fixed polling (every 2 s, the common practice) asks too often for slow jobs and notices fast ones
late. This schedule does better on both counts (`python -m bench.run` measures it):

* Once the journal knows the model's typical duration `m` — the median of what its recent jobs taught
  it — a job is checked at `m` and, when not done yet, ever further apart: `g, 2g, 4g, ...` after `m`
  (`g` = 3 % of `m`, at least 0.1 s; at most 5 s between checks). Some jobs also *probe*: they look
  before `m` too, at `m - g`, or `m - 8g, m - 4g, m - 2g, m - g` (one per 4 s of `m`, at most four).
  `Pacer` decides which jobs probe (below); a job that typically takes less than 0.1 s is checked at
  once.
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

What a job teaches. The journal's durations are the moments the server saw jobs finish, and a check
that finds a job done says only that it ended by then. A job whose first look at `m` finds it done
says "no longer than `m`": learning `m` from it would hold the estimate where it is however much
faster the jobs got, and learning the moment of a look after `m` teaches the lateness of that look
(a schedule that first looks at `1.05 m` teaches `1.05 m`, and the estimate creeps up job after job:
the schedule before this one grew 3-18x over 400 simulated jobs, bench/simulate.py). So a job
teaches its duration only when its checks bracket its end — one found it running, the next found it
done, and the duration learnt is the latter, late by at most that gap — or when it probed, so that
its first look came before `m` on purpose (`PollSchedule.probing`). Every first job of a model
teaches: its checks start early by design. A documented figure that is too long is learned as the
first check that found the job (at worst `d / 2` for a job much shorter than documented) and then
corrected by the probes; one that is too short costs nothing but polite checks.

Which jobs probe (`Pacer`). A probe's early looks are wasted while jobs end when expected, and they
are the only way to learn that jobs got faster, so:

* A *steady* model — its recent durations, all but the lowest and the highest, within one gap below
  `m` and one and a half above — probes one job in four (per model, on this server), with one early
  look at `m - g`; the other three are checked once, at `m`. So a steady model's job costs 1.25
  status requests, and the probes keep the estimate within a gap of where the jobs end (one at
  `m - g` that finds the job done teaches `m - g`).
* Any other model probes every job, with one early look per 4 s of `m` (at most four): its early
  finishers are noticed soon, and every job teaches. Under 4 s, where an early look on every job
  would cost more than fixed polling, one job in four probes, with one early look.
* A job expected within one polite period (2 s), which fixed polling answers with one request, never
  probes: it is checked at `m`. Such a model learns that its jobs got slower (they are seen running
  at `m`) but not that they got faster.
* After a job that ended well before `m` (more than half a gap), the next probe looks deeper: its
  earliest look comes one doubling below that job's end (never before `m / 2`). When jobs get
  faster each probe then finds them earlier than the last, and the estimate follows within a few
  dozen jobs instead of creeping down a gap at a time (bench/simulate.py measures both directions).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

PROBE_EVERY = 4
"""A steady model probes one of this many jobs."""


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
    early: int | None = None
    """With history: how many checks come before `expected` (None: one per `seconds_per_early_check` of it,
    at most `max_early_checks`; 0: the first check is at `expected`)."""
    polite_period: float = 2.0
    """Documented only: the period of the fixed polling that first jobs never ask more often than."""
    lowest_share: float = 0.5
    """Documented only: the earliest check is at this share of the documented duration."""
    _asked: bool = False

    @property
    def probing(self) -> bool:
        """Whether the first check comes before the job is expected to be done, on purpose: then the check
        that finds it done measures its duration, even when it is the first (see the module docstring)."""
        if self.expected is None or self.expected <= 0 or self.expected < self.min_spacing:
            return True  # searching from the start, or checked at once
        return self.early_checks(self.expected) > 0

    def gap(self, m: float) -> float:
        """The spacing of the checks closest to `m` (seconds)."""
        return min(max(self.spacing * m, self.min_spacing), self.max_interval)

    def early_checks(self, m: float) -> int:
        """How many checks come before `m`, for a job expected to take `m`."""
        if self.early is not None:
            return self.early
        return min(int(m // self.seconds_per_early_check), self.max_early_checks)

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
        gap = self.gap(m)
        for k in reversed(range(self.early_checks(m))):
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


@dataclass
class Pacer:
    """Chooses each job's schedule from what the journal learned of its model, and which jobs probe (see the
    module docstring). One per server: it counts each model's learned jobs, so that a steady model probes
    every `every`-th of them."""

    every: int = PROBE_EVERY
    polite_period: float = 2.0
    """A job expected within this many seconds never probes (fixed polling answers it with one request)."""
    lowest_share: float = 0.5
    """A probe looks no earlier than this share of the expected duration."""
    _jobs: dict[tuple[str, str], int] = field(default_factory=dict)

    def schedule(self, key: tuple[str, str], recent: Sequence[float], documented: float | None) -> PollSchedule:
        """The schedule of a new job of model `key`: `recent` are the durations the journal learned from its
        latest jobs, newest first (fewer than two: not learned yet), `documented` the provider's figure."""
        if len(recent) < 2:
            return PollSchedule(documented=documented)
        base = PollSchedule(expected=statistics.median(recent))
        m = base.expected
        assert m is not None
        if m < base.min_spacing:
            return base  # checked at once
        nth = self._jobs.get(key, 0)
        self._jobs[key] = nth + 1
        if m <= self.polite_period:
            return PollSchedule(expected=m, early=0)
        steady = self.steady(recent, m, base.gap(m))
        every_job = not steady and base.early_checks(m) > 0
        if not every_job and nth % self.every:
            return PollSchedule(expected=m, early=0)
        early = 1 if steady else max(base.early_checks(m), 1)
        return PollSchedule(expected=m, early=max(early, self._reach(m, base.gap(m), recent[0])))

    @staticmethod
    def steady(recent: Sequence[float], m: float, gap: float) -> bool:
        """Whether the recent durations, but for the lowest and the highest, lie within half a gap below `m` and
        one and a half above (a job found a gap late is still on time: that is where its check came)."""
        ordered = sorted(recent)
        inner = ordered[1:-1] if len(ordered) >= 5 else ordered
        return inner[0] >= m - gap and inner[-1] <= m + 1.5 * gap

    def _reach(self, m: float, gap: float, newest: float) -> int:
        """Early checks enough for the earliest to come one doubling below `newest` when that job ended more
        than half a gap before `m` (1 otherwise), never before `lowest_share` of `m`."""
        if newest >= m - gap / 2:
            return 1
        early = 1
        while m - gap * 2 ** (early - 1) >= newest - gap / 4 and m - gap * 2**early >= self.lowest_share * m:
            early += 1
        return early
