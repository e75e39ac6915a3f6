"""The beat lease in the broker's Redis: won, renewed against a deadline, handed back.

The lease is a Redis key set with ``SET NX PX`` through redis-py's :class:`redis.lock.Lock`, whose value
is this holder's token: unique per acquisition, and readable with a plain ``GET`` (host, pid, since).
Renewal is redis-py's atomic compare-and-extend.

Redis expires the key ``ttl`` seconds after it processed the last renewal, and that renewal was
processed after this process sent it, so the lease is certainly ours until ``t_sent + ttl`` (measured
with ``time.monotonic()`` taken *before* the call). A safety margin below that is the *deadline*: past
it the holder must behave as if the lease were gone. A renewal still waiting for Redis at the deadline
is cut off there by an alarm, not left to its socket timeout.

A Redis that restarts without its data (or a replica promoted in its place) forgets the lease while
the old holder still believes in it until its deadline. So no one tries to lead for one TTL after
seeing a new server ``run_id``, nor while a server met for the first time has been up for less than one
TTL; and after winning, the holder reads ``run_id`` again, in case the server changed in between.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from types import FrameType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import LockNotOwnedError, NoPermissionError, RedisError
from redis.retry import Retry

LOG = logging.getLogger("celery_fleet.beat_guard")

RETRY_AFTER_ERROR = 0.5  # how soon a failed renewal is tried again


class LeaseLost(Exception):
    """The lease is gone, or may be: whatever it guards must stop now."""


class _DeadlineAlarm(BaseException):
    """Raised by SIGALRM inside a Redis call still running at the deadline.

    A BaseException so that no library ``except Exception`` swallows it.
    """


def connect(url: str, timeout: float) -> redis.Redis:
    """A client whose every call fails fast: short timeouts and no hidden retries."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def new_token() -> str:
    """A holder token: unique (a random id), and saying who leads and since when."""
    since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return f"host={socket.gethostname()} pid={os.getpid()} since={since} id={uuid.uuid4().hex}"


class Lease:
    """One holder's view of the lease: whether it may try, winning it, keeping it, giving it back."""

    def __init__(
        self, client: redis.Redis, key: str, ttl: float, renew_interval: float, margin: float
    ) -> None:
        self.client = client
        self.key = key
        self.ttl = ttl
        self.renew_interval = renew_interval
        self.margin = margin
        self.lock = client.lock(key, timeout=ttl, thread_local=False)
        self.token = ""
        self.deadline = 0.0
        self.next_renew = 0.0
        self.reachable: bool | None = None
        self.run_id: str | None = None
        self.quarantine_until = 0.0
        self.info_allowed = True
        self._alarm_armed = False

    # the alarm that cuts a renewal off at the deadline

    def install_alarm(self) -> None:
        signal.signal(signal.SIGALRM, self._on_alarm)

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if self._alarm_armed:
            self._alarm_armed = False
            raise _DeadlineAlarm

    @contextlib.contextmanager
    def _alarm_at_deadline(self) -> Iterator[None]:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise _DeadlineAlarm
        self._alarm_armed = True
        signal.setitimer(signal.ITIMER_REAL, remaining)
        try:
            yield
        finally:
            self._alarm_armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    # standby

    def may_try(self) -> bool:
        """False while Redis is unreachable, or while it may have lost a lease that is still in use."""
        if not self.info_allowed:
            return True
        run_id, uptime = self._server()
        if run_id is None:
            return False
        if run_id != self.run_id:
            self._quarantine(uptime, restarted=self.run_id is not None)
            self.run_id = run_id
        return time.monotonic() >= self.quarantine_until

    def _server(self) -> tuple[str | None, int]:
        """The server's run_id and uptime; (None, 0) when Redis does not answer."""
        try:
            info: dict[str, Any] = self.client.info("server")
        except NoPermissionError as exc:
            LOG.warning("cannot read INFO (%s): Redis restarts will not be detected", exc)
            self.info_allowed = False
            return self.run_id or "", 0
        except RedisError as exc:
            self.note_unreachable(exc, leading=False)
            return None, 0
        self.note_reachable()
        return str(info.get("run_id", "")), int(info.get("uptime_in_seconds", 0))

    def _quarantine(self, uptime: int, restarted: bool) -> None:
        """Hold off until no lease granted by a previous server can still be in use.

        ``uptime`` counts whole seconds, so the server has been up for more than ``uptime - 1`` s.
        """
        wait = max(self.ttl if restarted else 0.0, self.ttl - max(0, uptime - 1))
        if wait <= 0:
            return
        self.quarantine_until = max(self.quarantine_until, time.monotonic() + wait)
        LOG.warning(
            "%s (up %ds): waiting %gs before trying to lead, so that a leader holding a lease from a "
            "previous Redis server has surely stopped",
            "Redis restarted or failed over (new run_id)" if restarted else "Redis started recently",
            uptime,
            wait,
        )

    def acquire(self) -> bool:
        """Try once to win the lease with a new token; True when this holder has it now."""
        token = new_token()
        t_sent = time.monotonic()
        try:
            won = self.lock.acquire(blocking=False, token=token)
        except RedisError as exc:
            self.note_unreachable(exc, leading=False)
            return False
        self.note_reachable()
        if not won:
            return False
        self.token = token
        self._extend_deadline(t_sent)
        if self.info_allowed and self._server()[0] != self.run_id:
            # The server changed between the check and the win: the old holder may still lead. The
            # next may_try sees the new run_id as a restart and waits a TTL.
            LOG.warning("Redis changed (new run_id) while this host won the lease: giving it back")
            self.release()
            return False
        return True

    # holder

    def renew_if_due(self) -> None:
        """Extend the lease when a renewal is due. Raises LeaseLost when it is gone or its deadline passed."""
        now = time.monotonic()
        if now >= self.deadline:
            raise LeaseLost("the lease deadline passed without a renewal (Redis unreachable or frozen)")
        if now < self.next_renew:
            return
        t_sent = now
        try:
            with self._alarm_at_deadline():
                self.lock.extend(self.ttl, replace_ttl=True)
        except _DeadlineAlarm:
            raise LeaseLost("the lease deadline passed while waiting for Redis") from None
        except LockNotOwnedError:
            raise LeaseLost("the lease is gone: the key expired or another holder took it") from None
        except RedisError as exc:
            self.note_unreachable(exc, leading=True)
            self.next_renew = time.monotonic() + RETRY_AFTER_ERROR
            return
        self.note_reachable()
        self._extend_deadline(t_sent)

    def _extend_deadline(self, t_sent: float) -> None:
        self.deadline = t_sent + self.ttl - self.margin
        self.next_renew = t_sent + self.renew_interval

    def release(self) -> None:
        """Compare-and-delete the lease if it is still ours; a standby then takes over within its poll."""
        self.deadline = 0.0
        self.token = ""
        with contextlib.suppress(RedisError):
            self.lock.release()

    # reachability, logged once per change

    def note_unreachable(self, exc: Exception, leading: bool) -> None:
        if self.reachable is not False:
            if leading:
                LOG.error(
                    "Redis unreachable while leading: beat stops at the lease deadline, in %.1fs, unless a "
                    "renewal succeeds first (%s)",
                    self.deadline - time.monotonic(),
                    exc,
                )
            else:
                LOG.error("Redis unreachable: no beat runs on this host until the lease is held (%s)", exc)
        self.reachable = False

    def note_reachable(self) -> None:
        if self.reachable is False:
            LOG.info("Redis reachable again")
        self.reachable = True
