"""What runs inside ``celery beat`` under the lease supervisor: two fences and a heartbeat.

The supervisor (``celery_fleet.beat_guard``) starts beat with ``--scheduler`` set to
:data:`LeaseScheduler`, built on top of the real scheduler, and tells it, in its environment, the lease
key, this holder's token, the deadline file and the heartbeat file.

1. **The deadline fence.** Before a periodic task leaves beat, ``apply_async`` checks the deadline the
   supervisor publishes in the lease file (a ``CLOCK_MONOTONIC`` value, system-wide on Linux). Past it,
   nothing is sent.
2. **The broker fence.** Beat publishes through :class:`Transport`, kombu's Redis transport whose channel
   pushes each message with one Lua script: the message is enqueued only if the lease key still holds
   this holder's token, checked and pushed in one atomic step. The lease and the queues live in the same
   single-threaded Redis, so a beat frozen between the deadline check and its send, or a send still in
   flight while the lease expired and a standby took over, can no longer enqueue anything.
3. **The heartbeat.** Each scheduler tick writes the time to the heartbeat file, and the interval
   between ticks is capped, so the supervisor can tell a beat that is alive but stuck (a hung publish,
   a deadlock) from one that waits for its next task.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

LOG = logging.getLogger("celery_fleet.beat_guard")

LEASE_FILE_ENV = "CELERY_FLEET_LEASE_FILE"
LEASE_KEY_ENV = "CELERY_FLEET_LEASE_KEY"
LEASE_TOKEN_ENV = "CELERY_FLEET_LEASE_TOKEN"
HEARTBEAT_FILE_ENV = "CELERY_FLEET_HEARTBEAT_FILE"
MAX_INTERVAL_ENV = "CELERY_FLEET_BEAT_MAX_INTERVAL"
INNER_SCHEDULER_ENV = "CELERY_FLEET_BEAT_SCHEDULER"
SCHEDULER_PATH = "celery_fleet.beat_fence:LeaseScheduler"
DEFAULT_INNER_SCHEDULER = "celery.beat:PersistentScheduler"

# KEYS[1] the lease, KEYS[2] the list the message goes to, KEYS[3..] the lists whose expiry it refreshes
# (every priority of an expiring queue). ARGV: the token, the message, the expiry in ms or "".
FENCED_PUSH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED the beat lease is not held by this holder')
end
local length = redis.call('LPUSH', KEYS[2], ARGV[2])
if ARGV[3] ~= '' then
  for i = 3, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
return length
"""
# KEYS[1] the lease. ARGV: the token, the message, then every channel it is published on.
FENCED_PUBLISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED the beat lease is not held by this holder')
end
for i = 3, #ARGV do redis.call('PUBLISH', ARGV[i], ARGV[2]) end
return #ARGV - 2
"""


class LeaseFenced(Exception):
    """The broker refused a message: the lease is not this holder's. Never retried."""


# --- the deadline file and the heartbeat file, shared with the supervisor --------------------------


def read_stamp(path: str | os.PathLike[str] | None) -> float:
    """The monotonic time last written to ``path``; 0.0 when there is none or it is unreadable.

    Anything unexpected reads as "no lease" (or "no tick"): the fence must fail closed.
    """
    if not path:
        return 0.0
    try:
        value = float(Path(path).read_text(encoding="ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


def write_atomically(path: Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` by temp file and rename, so no reader sees half of it (``mode``: its permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="ascii")
    if mode is not None:
        tmp.chmod(mode)
    os.replace(tmp, path)


def write_stamp(path: Path, stamp: float) -> None:
    """Write a monotonic time atomically, so no reader sees half a number."""
    write_atomically(path, "0\n" if stamp <= 0 else f"{stamp!r}\n")


def lease_deadline() -> float:
    """The deadline from the lease file named by ``CELERY_FLEET_LEASE_FILE``, as beat's fence sees it."""
    return read_stamp(os.environ.get(LEASE_FILE_ENV))


def lease_is_valid() -> bool:
    """Whether this host may dispatch now: exactly the check :data:`LeaseScheduler` makes before sending."""
    return time.monotonic() < lease_deadline()


def heartbeat() -> None:
    """Tell the supervisor that beat's loop is alive (a no-op outside the supervisor)."""
    path = os.environ.get(HEARTBEAT_FILE_ENV)
    if path:
        write_stamp(Path(path), time.monotonic())


# --- the broker fence: kombu's Redis transport, pushing only under the lease -------------------------


def _redis_channel() -> type:
    from kombu.transport import redis as kombu_redis  # noqa: PLC0415 -- only beat imports kombu

    class Channel(kombu_redis.Channel):
        """Pushes and publishes with :data:`FENCED_PUSH` / :data:`FENCED_PUBLISH`, never plain LPUSH."""

        @functools.cached_property
        def _fence(self) -> tuple[str, str]:
            key, token = os.environ.get(LEASE_KEY_ENV, ""), os.environ.get(LEASE_TOKEN_ENV, "")
            if not key or not token:
                raise LeaseFenced(
                    f"{LEASE_KEY_ENV} and {LEASE_TOKEN_ENV} are not set: this beat holds no lease"
                )
            return key, token

        def _fenced(self, script: str, keys: list[str], args: list[Any]) -> Any:
            import redis  # noqa: PLC0415

            key, token = self._fence
            with self.conn_or_acquire() as client:
                # A plain client on the same connections: the keys below carry their prefix already,
                # where kombu's prefixed client would prefix only the first key of a script.
                plain = redis.Redis(connection_pool=client.connection_pool)
                try:
                    return plain.register_script(script)(keys=[key, *keys], args=[token, *args])
                except redis.ResponseError as exc:
                    if str(exc).startswith("FENCED"):
                        raise LeaseFenced(f"the broker refused the message: {exc}") from None
                    raise

        def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
            kwargs.pop("_publish_batch", None)  # one fenced push per message, never a batch
            prefix = self.global_keyprefix
            pri = self._get_message_priority(message, reverse=False)
            expires = self._expires.get(queue) if self._expires else None
            refreshed = [prefix + self._q_for_pri(queue, p) for p in self.priority_steps] if expires else []
            self._fenced(
                FENCED_PUSH,
                [prefix + self._q_for_pri(queue, pri), *refreshed],
                [kombu_redis.dumps(message), "" if expires is None else str(int(expires))],
            )

        def _put_fanout(self, exchange: str, message: Any, routing_key: str, **kwargs: Any) -> None:
            kwargs.pop("_publish_batch", None)
            topics = [self.global_keyprefix + t for t in self._get_publish_topics(exchange, routing_key)]
            self._fenced(FENCED_PUBLISH, [], [kombu_redis.dumps(message), *topics])

    return Channel


@functools.cache
def transport_class() -> type:
    """kombu's Redis transport with the fenced channel; ``rediss://`` URLs keep their TLS settings."""
    from kombu.transport import redis as kombu_redis  # noqa: PLC0415

    return type("Transport", (kombu_redis.Transport,), {"Channel": _redis_channel(), "__module__": __name__})


def __getattr__(name: str) -> Any:
    """``LeaseScheduler`` and ``Transport``, built on first use (PEP 562).

    Built lazily so that the supervisor, which imports this module too, never imports celery, kombu or
    the inner scheduler (django-celery-beat would need Django settings there).
    """
    if name == "LeaseScheduler":
        return lease_scheduler_class(os.environ.get(INNER_SCHEDULER_ENV, ""))
    if name == "Transport":
        return transport_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- the scheduler: the deadline fence, the fenced connection and the heartbeat -----------------------


class _LeaseFence:
    """Mixed in before the real scheduler class (see :func:`lease_scheduler_class`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cap = env_seconds(MAX_INTERVAL_ENV)
        if cap:
            # Beat sleeps at most this long between ticks, so a missing heartbeat means a stuck beat.
            self.max_interval = min(self.max_interval, cap)

    @functools.cached_property
    def connection(self) -> Any:
        """Beat's producer connection: the broker URL and settings of the app, over the fenced transport."""
        return self.app.connection_for_write(transport=transport_class())

    def tick(self, *args: Any, **kwargs: Any) -> Any:
        heartbeat()
        return super().tick(*args, **kwargs)  # type: ignore[misc]

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        # The last step before a message leaves beat (tick -> apply_entry -> apply_async), so gating it
        # covers every scheduler that builds on celery.beat.Scheduler.
        deadline, now = lease_deadline(), time.monotonic()
        if now >= deadline:
            LOG.error(
                "not sending %s: this host does not hold the beat lease (deadline %.3f, now %.3f, file %s)",
                getattr(entry, "name", entry),
                deadline,
                now,
                os.environ.get(LEASE_FILE_ENV),
            )
            return None
        # Always the fenced producer: without one, Celery would publish through the app's own pool.
        return super().apply_async(entry, producer or self.producer, advance, **kwargs)  # type: ignore[misc]


def env_seconds(name: str) -> float:
    """A positive number from the environment variable ``name``; 0.0 when unset or not one."""
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


@functools.cache
def lease_scheduler_class(inner: str) -> type:
    """Build the fenced scheduler on top of ``inner`` (``module:Class``; empty: PersistentScheduler).

    Subclassing at run time lets redbeat or django-celery-beat keep working under the fence.
    """
    from kombu.utils.imports import symbol_by_name  # noqa: PLC0415 -- only beat needs kombu/celery

    base = symbol_by_name(inner or DEFAULT_INNER_SCHEDULER)
    return type(
        "LeaseScheduler",
        (_LeaseFence, base),
        {"__module__": __name__, "__doc__": f"{base.__name__} that sends only while the lease is held."},
    )
