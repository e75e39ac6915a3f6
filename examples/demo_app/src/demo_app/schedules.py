"""A beat schedule aligned to the wall clock, so every dispatch has a slot."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from celery.schedules import schedstate, schedule


class every(schedule):
    """Run at every multiple of ``seconds`` since the epoch, like cron with seconds.

    Whichever beat is running, a tick is due at the same instants, so a
    dispatch belongs to exactly one slot (``floor(time / seconds)``) and two
    dispatches in one slot are a duplicate, not a coincidence. A beat that
    starts mid-slot does not catch the slot up (another beat may have sent it
    already); it waits for the next boundary.
    """

    # How late after a slot boundary a dispatch still belongs to that slot.
    GRACE_SECONDS = 0.2

    def __init__(self, seconds: float, **kwargs) -> None:
        super().__init__(run_every=timedelta(seconds=seconds), **kwargs)

    def __reduce__(self):
        # Beat pickles its schedule into the state file; rebuild it from the period.
        return self.__class__, (self.run_every.total_seconds(),)

    @property
    def _period(self) -> float:
        return self.run_every.total_seconds()

    def remaining_estimate(self, last_run_at: datetime) -> timedelta:
        now = self.now().timestamp()
        return timedelta(seconds=(math.floor(now / self._period) + 1) * self._period - now)

    def is_due(self, last_run_at: datetime) -> schedstate:
        now = self.now().timestamp()
        slot = math.floor(now / self._period)
        last_slot = math.floor(self.maybe_make_aware(last_run_at).timestamp() / self._period)
        to_next = (slot + 1) * self._period - now
        late = now - slot * self._period
        return schedstate(
            is_due=slot > last_slot and late <= min(self.GRACE_SECONDS, self._period / 4), next=to_next
        )
