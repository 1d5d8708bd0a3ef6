"""When to ask a provider whether a job is done.

Fixed polling (every 2 s, the common practice) asks too often for slow jobs and notices fast ones
late. This schedule does better on both counts: with no history it checks soon after submitting
and backs off geometrically; once the journal knows the model's typical duration it stays quiet
until just after that moment, then checks densely (a few percent of the duration apart), backing
off again if the job runs long.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PollSchedule:
    """Yields the delay before each status check, given the time elapsed since submit."""

    expected: float | None = None
    """Typical seconds from submit to completion for this model, from the journal (None: unknown)."""
    first: float = 0.5
    growth: float = 1.5
    max_interval: float = 5.0
    min_interval: float = 0.1
    _interval: float | None = None

    def next_delay(self, elapsed: float) -> float:
        if self.expected is not None and self.expected > 0:
            target = self.expected * 1.03 + 0.05
            if elapsed < target:
                return target - elapsed
            if self._interval is None:
                self._interval = max(self.expected * 0.05, self.min_interval)
            else:
                self._interval = min(self._interval * self.growth, self.max_interval)
            return self._interval
        if self._interval is None:
            self._interval = self.first
        else:
            self._interval = min(self._interval * self.growth, self.max_interval)
        return self._interval
