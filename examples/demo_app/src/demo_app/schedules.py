"""A beat schedule aligned to the wall clock, so every dispatch has a slot."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from celery.schedules import schedstate, schedule


class every(schedule):
    """Run at every multiple of ``seconds`` since the epoch.

    Whichever beat is running, a tick is due at the same instants, so a
    dispatch belongs to exactly one slot (``floor(time / seconds)``) and two
    dispatches in one slot are a duplicate, not a coincidence.
    """

    def __init__(self, seconds: float, **kwargs) -> None:
        super().__init__(run_every=timedelta(seconds=seconds), **kwargs)

    def _next_slot(self, last_run_at: datetime) -> float:
        period = self.run_every.total_seconds()
        return (math.floor(last_run_at.timestamp() / period) + 1) * period

    def remaining_estimate(self, last_run_at: datetime) -> timedelta:
        now = self.now().timestamp()
        return timedelta(seconds=max(0.0, self._next_slot(self.maybe_make_aware(last_run_at)) - now))

    def is_due(self, last_run_at: datetime) -> schedstate:
        remaining = self.remaining_estimate(last_run_at).total_seconds()
        if remaining > 0:
            return schedstate(is_due=False, next=remaining)
        now = self.now()
        return schedstate(is_due=True, next=self._next_slot(now) - now.timestamp())
